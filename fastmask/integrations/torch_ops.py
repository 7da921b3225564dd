"""fastmask's attention as a PyTorch operator: ``torch.ops.fastmask.attention``.

:func:`attention` takes torch CPU tensors in the ``(B, H, L, D)`` layout of
``torch.nn.functional.scaled_dot_product_attention`` and returns the output as a
``(B, Lq, H, Dv)`` tensor -- the layout a transformer's output projection reads,
so nothing has to be transposed and copied after it. The operands are viewed as
NumPy arrays without a copy, and the fused engine writes straight into the returned
tensor through a transposed view.

The mask is passed as its *structure*, never as an ``Lq x Lk`` tensor: positions
(``q_start``, ``k_start``: query ``i`` sits at ``q_start + i``, key ``j`` at
``k_start + j``), how far ahead and behind a query may look (``max_ahead=0`` is
causal; ``max_behind=w - 1`` with it a causal sliding window of ``w`` keys) and the
keys' padding as a ``(B, n)`` boolean tensor indexed by key position (Hugging Face's
2-D ``attention_mask``). Inside the operator these become :mod:`fastmask.masks`
strategies: ``causal``, ``sliding_window`` and ``padding`` intervals, which the
engine skips by blocks. A dense boolean ``keep`` mask and an additive ``bias``
(position biases, float masks) are accepted too.

The operator is registered with :func:`torch.library.custom_op` (with a fake
implementation), so ``torch.compile`` traces models that call it without a graph
break. It is for inference: it has no backward pass, and tensors that require grad
under grad mode are refused with a message that says so.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from .. import masks
from ..attention import _attention_into
from ..attention import attention as _fm_attention
from ..masks.base import MaskPlan, canonical_dims
from ..request import as_array

__all__ = ["attention", "attention_with_weights", "structured_mask"]

# Positions are SymInts: under torch.compile they may be symbolic (a decode step's cache
# length), and the op must take them without specialising the graph on each value.
_SCHEMA_ARGS = (
    "Tensor query, Tensor key, Tensor value, Tensor? keep, Tensor? bias, Tensor? key_padding, "
    "SymInt q_start, SymInt k_start, Tensor? starts, SymInt? max_ahead, SymInt? max_behind, "
    "float? scale"
)


# ----------------------------------------------------------- masks: structure -> strategies


@functools.lru_cache(maxsize=256)
def _band(lq: int, lk: int, diag: int, ahead: int | None, behind: int | None) -> Any:
    """The strategy keeping keys ``j`` with ``-behind <= j - (i + diag) <= ahead``, or
    None when no interval strategy expresses it (see :func:`_dense_band`).

    Cached: equal calls get the same (immutable) strategy object, whose plan fastmask
    reuses, so the layers of a model (and repeated decode shapes) do not re-plan it.
    """
    if behind is None:
        return masks.causal(offset=diag + ahead)
    if ahead is None:
        return None
    hi = diag + ahead  # the last key kept is i + hi, the first i + lo
    lo = diag - behind
    shift = lk - lq  # where "bottom-right" puts the diagonal
    if hi < lo:
        return masks.keep(np.zeros((1, 1), bool))  # an empty band keeps nothing
    if hi == 0:
        return masks.sliding_window(hi - lo + 1)
    if hi == shift:
        return masks.sliding_window(hi - lo + 1, align="bottom-right")
    # Otherwise a window whose diagonal lies at or past the causal limit gives the lower
    # bound (a static cache: queries at an offset into a longer buffer of keys).
    if hi < 0:
        return masks.causal(offset=hi) & masks.sliding_window(1 - lo)
    if hi < shift:
        return masks.causal(offset=hi) & masks.sliding_window(shift - lo + 1, align="bottom-right")
    return None


def _dense_band(lq: int, lk: int, diag: int, ahead: int | None, behind: int) -> Any:
    """The band as a dense ``(Lq, Lk)`` keep-mask: queries beyond the last key, or a lower
    limit without an upper one. Models do not build these; the result is still exact."""
    d = np.arange(lk)[None, :] - np.arange(lq)[:, None] - diag  # key position - query position
    keep = d >= -behind
    if ahead is not None:
        keep &= d <= ahead
    return masks.keep(keep)


class KeysFrom(masks.MaskStrategy):
    """Keep keys ``j >= first[b]`` (left padding, by where each sequence starts).

    Unlike ``masks.padding(lengths, side="left")``, whose lengths grow with every
    generated token, this does not depend on the key count: the same object serves
    every decode step of a batched generation, and fastmask reuses its request
    (``plans_any_lk``) instead of rebuilding it on each step.
    """

    immutable = True
    plans_any_lk = True  # plan() is the same for any Lk (clipped to it by the caller)

    def __init__(self, first: np.ndarray) -> None:
        self.first = first.astype(np.int64).reshape(-1, 1, 1)
        self.first.flags.writeable = False
        self._hi = np.full((1, 1, 1), np.iinfo(np.int64).max // 2)

    def plan(self, shape: tuple[int, ...]) -> MaskPlan:
        b = canonical_dims(shape)[0]
        if self.first.shape[0] not in (1, b):
            raise ValueError(f"KeysFrom has {self.first.shape[0]} rows; the scores {shape} "
                             f"have a batch of {b}")  # fmt: skip
        return MaskPlan(lo=self.first, hi=self._hi)

    def _dense(self, shape: tuple[int, ...]) -> np.ndarray:
        b, h, q, n = canonical_dims(shape)
        keep = np.arange(n)[None, :] >= self.first.reshape(-1, 1)
        return np.broadcast_to(keep[:, None, None, :], (b, h, q, n)).reshape(shape)

    def __repr__(self) -> str:
        return f"KeysFrom({self.first.ravel().tolist()})"


@functools.lru_cache(maxsize=64)
def _keys_from(first: bytes) -> KeysFrom:
    """One :class:`KeysFrom` per padding pattern (the decode steps of one batch share it)."""
    return KeysFrom(np.frombuffer(first, np.int64))


def _padding(key_padding: np.ndarray, k_start: int, lk: int) -> Any:
    """``padding`` strategies for a ``(B, n)`` keep-mask of key positions, from ``k_start``.

    Each row that keeps one run of keys ``[lo, hi)`` (right padding, left padding, both,
    or a static cache's unused tail) becomes intervals; a row with holes makes the
    whole mask a dense ``(B, 1, 1, Lk)`` keep-mask (still never ``Lq x Lk``).
    """
    pm = key_padding[:, k_start : k_start + lk]
    if pm.dtype != np.bool_:
        pm = pm != 0
    if pm.shape[1] < lk:  # keys past the 2-D mask are padding (as transformers pads it)
        pm = np.concatenate([pm, np.zeros((pm.shape[0], lk - pm.shape[1]), bool)], axis=1)
    count = pm.sum(axis=1)
    if not pm.size or count.min() == lk:
        return None
    first = np.argmax(pm, axis=1)
    if pm[:, -1].all() and np.array_equal(count, lk - first):
        # Left padding only (batched generation: every row runs to the newest key).
        return _keys_from(first.astype(np.int64).tobytes())
    last = lk - np.argmax(pm[:, ::-1], axis=1)
    any_ = count > 0
    lo = np.where(any_, first, 0)
    hi = np.where(any_, last, 0)
    if not np.array_equal(hi - lo, count):  # a row with holes: not an interval
        return masks.keep(pm[:, None, None, :])
    parts = []
    if (hi < lk).any():
        parts.append(masks.padding(hi, side="right"))
    if (lo > 0).any():
        parts.append(masks.padding(lk - lo, side="left"))
    if len(parts) == 1:
        return parts[0]
    return parts[0] & parts[1]


def structured_mask(
    lq: int,
    lk: int,
    *,
    key_padding: np.ndarray | None = None,
    q_start: int = 0,
    k_start: int | torch.Tensor = 0,
    max_ahead: int | None = None,
    max_behind: int | None = None,
) -> Any:
    """The :mod:`fastmask.masks` strategy for a mask given by its structure.

    Key ``j`` (at position ``k_start + j``) is kept for query ``i`` (at ``q_start + i``)
    when ``-max_behind <= (k_start + j) - (q_start + i) <= max_ahead`` (a missing limit
    is no limit) and ``key_padding[b, k_start + j]`` is true (if given).

    Parameters
    ----------
    lq, lk : int
        Queries and keys of the call.
    key_padding : ndarray of bool, shape (B, n), optional
        True = a real key, by position; positions past ``n`` are padding.
    q_start, k_start : int
        Position of the first query and of the first key.
    max_ahead, max_behind : int, optional
        ``max_ahead=0``: causal. ``max_behind=w - 1`` with it: a causal window of ``w``.

    Returns
    -------
    MaskStrategy or None
        ``causal``, ``sliding_window`` and ``padding`` strategies combined with ``&``
        (None: every key is kept).
    """
    band = None
    diag = q_start - k_start
    keeps_all = (max_ahead is None or diag + max_ahead >= lk - 1) and (
        max_behind is None or diag + lq - 1 - max_behind <= 0
    )  # every query sees every key (a decode step): no band to plan or route on
    if not keeps_all:
        band = _band(lq, lk, diag, max_ahead, max_behind)
        if band is None:
            band = _dense_band(lq, lk, diag, max_ahead, max_behind)
    pad = None if key_padding is None else _padding(key_padding, k_start, lk)
    if band is None or pad is None:
        return band if pad is None else pad
    return band & pad


# ----------------------------------------------------------- the operator


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """A zero-copy NumPy view of a CPU tensor (bfloat16 through fastmask's own view)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return as_array(t, "tensor")
    return t.numpy()


def _out_shape(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple:
    b = max(query.shape[0], key.shape[0], value.shape[0])  # a batch of 1 broadcasts
    return (b, query.shape[2], query.shape[1], value.shape[3])


def _mask_of(keep, key_padding, lq, lk, q_start, k_start, starts, max_ahead, max_behind):
    if starts is not None:  # positions the model keeps as tensors (static caches)
        q_start, k_start = (int(x) for x in starts.tolist())
    strategy = structured_mask(
        lq, lk, key_padding=_np(key_padding), q_start=q_start, k_start=k_start,
        max_ahead=max_ahead, max_behind=max_behind,
    )  # fmt: skip
    if keep is not None:
        dense = masks.keep(_np(keep))
        strategy = dense if strategy is None else strategy & dense
    return strategy


def _run(query, key, value, mask, bias, scale) -> torch.Tensor:
    """Attention with a fastmask mask (strategy, array or None) into a new (B, Lq, H, Dv)."""
    out = torch.empty(_out_shape(query, key, value), dtype=query.dtype)
    # (B, Lq, H, Dv) seen as (B, H, Lq, Dv): the engine writes the caller's layout directly.
    _attention_into(_np(out).transpose(0, 2, 1, 3), _np(query), _np(key), _np(value), mask,
                    bias=_np(bias), scale=scale)  # fmt: skip
    return out


def _attention_impl(query, key, value, keep, bias, key_padding, q_start, k_start,
                    starts, max_ahead, max_behind, scale):  # fmt: skip
    mask = _mask_of(keep, key_padding, query.shape[2], key.shape[2], q_start, k_start,
                    starts, max_ahead, max_behind)  # fmt: skip
    return _run(query, key, value, mask, bias, scale)


def _weights_impl(query, key, value, keep, bias, key_padding, q_start, k_start,
                  starts, max_ahead, max_behind, scale):  # fmt: skip
    mask = _mask_of(keep, key_padding, query.shape[2], key.shape[2], q_start, k_start,
                    starts, max_ahead, max_behind)  # fmt: skip
    q, k, v = (t.detach() for t in (query, key, value))
    out, weights = _fm_attention(q, k, v, mask, bias=None if bias is None else bias.detach(),
                                 scale=scale, return_weights=True)  # fmt: skip
    return out.transpose(1, 2).contiguous(), weights


_attention_op = torch.library.custom_op(
    "fastmask::attention", _attention_impl, mutates_args=(), device_types="cpu",
    schema=f"({_SCHEMA_ARGS}) -> Tensor",
)  # fmt: skip
_weights_op = torch.library.custom_op(
    "fastmask::attention_with_weights", _weights_impl, mutates_args=(), device_types="cpu",
    schema=f"({_SCHEMA_ARGS}) -> (Tensor, Tensor)",
)  # fmt: skip


@_attention_op.register_fake
def _attention_fake(query, key, value, *args):
    return query.new_empty(_out_shape(query, key, value))


@_weights_op.register_fake
def _weights_fake(query, key, value, *args):
    b, lq, h, _ = _out_shape(query, key, value)
    weights = query.new_empty((b, h, lq, key.shape[2]))
    return query.new_empty(_out_shape(query, key, value)), weights


# ----------------------------------------------------------- the public functions


def _check(query, key, value, keep, bias, key_padding) -> None:
    """Refuse what the operator cannot serve, before any work (called on every layer:
    cheap attribute reads only)."""
    tensors = [t for t in (query, key, value, keep, bias, key_padding) if t is not None]
    for t in tensors:
        if not t.is_cpu and not t.is_meta:
            raise ValueError(
                f"fastmask computes on the CPU; got a tensor on {t.device}. On that device use "
                "torch.nn.functional.scaled_dot_product_attention (attn_implementation='sdpa')."
            )
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            "fastmask attention is for inference only (it has no backward pass), and a tensor "
            "requires grad here: run the model under torch.no_grad() or torch.inference_mode(), "
            "or use attn_implementation='sdpa' to train."
        )
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, L, D); got {tuple(t.shape)}")


def _direct(query: torch.Tensor) -> bool:
    """Run the implementation directly, skipping the dispatcher (about 10 us a call):
    eager calls on plain tensors. Tracing (torch.compile, export, FX) goes through the op."""
    return type(query) is torch.Tensor and not torch.compiler.is_compiling()


def _arguments(query, key, value, keep, bias, key_padding, q_start, k_start, max_ahead,
               max_behind, scale) -> tuple:  # fmt: skip
    _check(query, key, value, keep, bias, key_padding)
    starts = None
    if isinstance(q_start, torch.Tensor) or isinstance(k_start, torch.Tensor):
        # A 0-d tensor position is read inside the op: reading it here would be a
        # data-dependent value (a graph break, or an unbacked symbol) under torch.compile.
        starts = torch.stack([torch.as_tensor(x, dtype=torch.int64).reshape(())
                              for x in (q_start, k_start)])  # fmt: skip
        q_start = k_start = 0
    return (query, key, value, keep, bias, key_padding, q_start, k_start, starts,
            max_ahead, max_behind, None if scale is None else float(scale))  # fmt: skip


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    q_start: int | torch.Tensor = 0,
    k_start: int | torch.Tensor = 0,
    max_ahead: int | None = None,
    max_behind: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of torch CPU tensors, returned as ``(B, Lq, H, Dv)``.

    Parameters
    ----------
    query : Tensor, shape (B, H, Lq, D)
        float16, bfloat16, float32 or float64, on the CPU.
    key, value : Tensor, shape (B, Hk, Lk, D) and (B, Hk, Lk, Dv)
        Same dtype. ``H`` a multiple of ``Hk``: grouped-query attention, without
        repeating k and v. A batch of 1 broadcasts.
    keep : Tensor of bool, optional
        A dense mask broadcastable to ``(B, H, Lq, Lk)``, True = attend.
    bias : Tensor, optional
        Additive float mask or position bias, broadcastable to ``(B, H, Lq, Lk)``.
    key_padding : Tensor of bool, shape (B, n), optional
        True = a real key, indexed by key *position* (``k_start + j``); positions past
        ``n`` count as padding. Hugging Face's 2-D ``attention_mask``.
    q_start : int or 0-d Tensor
        Position of the first query (the KV cache's length before this call).
    k_start : int or 0-d Tensor
        Position of the first key (non-zero when a cache dropped the oldest keys).
    max_ahead : int, optional
        Keep keys at most this many positions after the query: 0 is causal. None: no
        limit.
    max_behind : int, optional
        Keep keys at most this many positions before the query (a causal sliding window
        of ``w`` keys: ``max_ahead=0, max_behind=w - 1``). None: no limit.
    scale : float, optional
        Multiplies ``q @ k^T``; default ``1 / sqrt(D)``.

    Returns
    -------
    Tensor, shape (B, Lq, H, Dv)
        In the inputs' dtype; a query that keeps no key gets a zero row.

    Raises
    ------
    RuntimeError
        A tensor requires grad while grad mode is on (inference only).
    ValueError
        Tensors off the CPU, wrong ranks or shapes.
    TypeError
        Unsupported dtypes.

    Examples
    --------
    >>> import torch
    >>> from fastmask.integrations import torch_ops
    >>> q = torch.ones(1, 2, 3, 4)
    >>> v = torch.arange(6.0).reshape(1, 1, 3, 2).expand(1, 2, 3, 2)
    >>> torch_ops.attention(q, q, v, max_ahead=0)[0, :, 0]  # causal, head 0
    tensor([[0., 1.],
            [1., 2.],
            [2., 3.]])
    """
    args = _arguments(query, key, value, keep, bias, key_padding, q_start, k_start, max_ahead,
                      max_behind, scale)  # fmt: skip
    if _direct(query):
        return _attention_impl(*args)
    return _attention_op(*args)


def attention_with_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` and its weights ``(B, H, Lq, Lk)`` (which this materialises).

    Takes the same arguments; for ``output_attentions=True``.
    """
    names = ("keep", "bias", "key_padding", "q_start", "k_start", "max_ahead", "max_behind",
             "scale")  # fmt: skip
    unknown = set(kwargs) - set(names)
    if unknown:
        raise TypeError(f"unexpected argument(s) {sorted(unknown)}; takes {', '.join(names)}")
    defaults = {"q_start": 0, "k_start": 0}
    args = _arguments(query, key, value, *(kwargs.get(n, defaults.get(n)) for n in names))
    if _direct(query):
        return _weights_impl(*args)
    return _weights_op(*args)
