"""fastmask as an attention implementation of Hugging Face ``transformers``.

>>> import fastmask.integrations.transformers as fmt          # doctest: +SKIP
>>> fmt.register()                                             # doctest: +SKIP
>>> model = AutoModel.from_pretrained(path, attn_implementation="fastmask")  # doctest: +SKIP

:func:`register` adds two functions under one name: :func:`attention_forward` to
``transformers.AttentionInterface`` (what the model's attention layers call) and
:func:`mask_function` to ``transformers.AttentionMaskInterface`` (what the model
calls once per forward pass to build its mask). The mask function does not build a
mask: it returns a :class:`StructuredMask`, which carries the mask's structure --
the queries' and keys' positions (KV-cache offsets), causal or not, the sliding
window, and the 2-D padding ``attention_mask`` -- and the attention function hands
that to ``torch.ops.fastmask.attention`` (:mod:`fastmask.integrations.torch_ops`)
as plain integers and the ``(B, n)`` padding tensor. A causal prefill of 8192
tokens therefore never allocates an ``8192 x 8192`` mask.

To know the structure, the mask function evaluates the model's ``mask_function``
(transformers' ``causal_mask_function``, ``sliding_window_overlay``, ...) on
symbolic positions: it reads ``kv_idx <= q_idx`` as "at most 0 keys ahead" and
``kv_idx > q_idx - w`` as "at most ``w - 1`` keys behind". A function it cannot
read that way (packed sequences, chunked attention, image-token overlays, anything
indexing a tensor) falls back to transformers' own dense boolean mask, which the
attention function serves exactly as ``sdpa`` would -- slower, never different.

Nothing is registered on import; ``import fastmask`` does not import this module.
"""

from __future__ import annotations

from typing import Any

import torch

from . import torch_ops

__all__ = [
    "StructuredMask",
    "attention_forward",
    "is_registered",
    "mask_function",
    "register",
    "unregister",
]

NAME = "fastmask"


# ----------------------------------------------------------- reading a mask function


class _Unreadable(Exception):
    """The mask function does something a band of relative positions cannot express."""


class _Band:
    """The keys a mask function keeps, as limits on ``kv - q`` (key minus query position):
    ``-behind <= kv - q <= ahead`` (None: no limit), or nothing at all."""

    __slots__ = ("ahead", "behind", "empty")
    device = None  # transformers' and_masks calls ``.to(result.device)`` on each part

    def __init__(self, ahead: int | None = None, behind: int | None = None, empty: bool = False):
        self.ahead, self.behind, self.empty = ahead, behind, empty

    def to(self, *args: Any, **kwargs: Any) -> _Band:
        return self

    def __and__(self, other: object) -> _Band:
        if not isinstance(other, _Band):
            raise _Unreadable(f"and with {type(other).__name__}")
        if self.empty or other.empty:
            return _Band(empty=True)

        def tighter(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else min(a, b)

        return _Band(tighter(self.ahead, other.ahead), tighter(self.behind, other.behind))

    def __or__(self, other: object) -> _Band:
        # Only or_masks' starting value (nothing) joins: a union of two bands has holes.
        if isinstance(other, _Band) and self.empty:
            return other
        if isinstance(other, _Band) and other.empty:
            return self
        raise _Unreadable("union of masks")

    def __bool__(self) -> bool:  # data-dependent control flow in a mask function
        raise _Unreadable("truth value of a mask")


class _Pos:
    """A symbolic position ``a * q + b * kv + c`` (``q``, ``kv``: query and key positions)."""

    __slots__ = ("a", "b", "c")

    def __init__(self, a: int, b: int, c: int = 0) -> None:
        self.a, self.b, self.c = a, b, c

    @staticmethod
    def _of(x: object) -> _Pos:
        if isinstance(x, _Pos):
            return x
        if isinstance(x, int) and not isinstance(x, bool):
            return _Pos(0, 0, x)
        raise _Unreadable(f"arithmetic with {type(x).__name__}")

    def __add__(self, other: object) -> _Pos:
        o = _Pos._of(other)
        return _Pos(self.a + o.a, self.b + o.b, self.c + o.c)

    __radd__ = __add__

    def __neg__(self) -> _Pos:
        return _Pos(-self.a, -self.b, -self.c)

    def __sub__(self, other: object) -> _Pos:
        return self + -_Pos._of(other)

    def __rsub__(self, other: object) -> _Pos:
        return _Pos._of(other) + -self

    def __abs__(self) -> _Abs:
        return _Abs(self)

    # ``x <= y`` is ``x - y <= 0``; positions are integers, so ``x < y`` is ``x - y <= -1``.
    def __le__(self, other: object) -> _Band:
        return _at_most(self - other, 0)

    def __lt__(self, other: object) -> _Band:
        return _at_most(self - other, -1)

    def __ge__(self, other: object) -> _Band:
        return _at_most(_Pos._of(other) - self, 0)

    def __gt__(self, other: object) -> _Band:
        return _at_most(_Pos._of(other) - self, -1)

    def new_ones(self, *args: Any, **kwargs: Any) -> _Band:  # and_masks' starting value
        return _Band()

    def new_zeros(self, *args: Any, **kwargs: Any) -> _Band:  # or_masks' starting value
        return _Band(empty=True)


class _Abs:
    """``abs(e)`` of a position difference: only ``abs(e) <= w`` (and ``<``) are read."""

    __slots__ = ("e",)

    def __init__(self, e: _Pos) -> None:
        self.e = e

    def __le__(self, w: object) -> _Band:
        return _at_most(self.e - w, 0) & _at_most(-self.e - w, 0)

    def __lt__(self, w: object) -> _Band:
        return _at_most(self.e - w, -1) & _at_most(-self.e - w, -1)


def _at_most(e: _Pos, bound: int) -> _Band:
    """The band of ``e <= bound``, for ``e = +-(kv - q) + c`` or a constant/``q``-only ``e``."""
    if (e.a, e.b) == (-1, 1):  # kv - q <= bound - c
        return _Band(ahead=bound - e.c)
    if (e.a, e.b) == (1, -1):  # q - kv <= bound - c
        return _Band(behind=bound - e.c)
    if e.b == 0 and e.a in (0, -1):  # c <= bound, or -q + c <= bound: positions are >= 0
        return _Band() if e.c <= bound else _Band(empty=True) if e.a == 0 else _unreadable()
    return _unreadable()


def _unreadable() -> _Band:
    raise _Unreadable("not a band of relative positions")


class _Opaque:
    """The batch and head indices: a band does not depend on them, so any use is unreadable
    (indexing a tensor with it raises, arithmetic with it raises)."""

    __slots__ = ()


def read_band(fn: Any) -> tuple[int | None, int | None] | None:
    """``(max_ahead, max_behind)`` of a transformers mask function, or None if unreadable.

    The function is called once on symbolic indices. ``causal_mask_function`` gives
    ``(0, None)``, ``sliding_window_causal_mask_function(w)`` gives ``(0, w - 1)``,
    ``bidirectional_mask_function`` gives ``(None, None)``. A function keeping nothing
    is read as ``(-1, 0)`` (an empty band).
    """
    try:
        band = fn(_Opaque(), _Opaque(), _Pos(1, 0), _Pos(0, 1))
    except Exception:  # anything it does that a band cannot express
        return None
    if not isinstance(band, _Band):
        return None
    if band.empty:
        return (-1, 0)
    return band.ahead, band.behind


# ----------------------------------------------------------- the mask function


class StructuredMask:
    """The mask of one forward pass, as structure (what :func:`mask_function` returns).

    Query ``i`` sits at position ``q_offset + i`` and key ``j`` at ``kv_offset + j``;
    key ``j`` is kept when ``-max_behind <= (kv_offset + j) - (q_offset + i) <= max_ahead``
    (None: no limit) and ``padding[b, kv_offset + j]`` is true (if given).

    Attributes
    ----------
    padding : Tensor of bool, shape (B, n), or None
        The model's 2-D ``attention_mask`` (True = a real token), by key position.
    q_offset : int or Tensor
        The KV cache's length before this pass (a 0-d tensor for static caches).
    kv_offset : int or Tensor
        Position of the first key (non-zero once a sliding-window cache drops keys).
    max_ahead, max_behind : int or None
        0 and None: causal; 0 and ``w - 1``: a causal window of ``w`` keys.
    batch_size, q_length, kv_length : int
        The sizes transformers asked the mask for.
    """

    # Only what transformers' own code reads of a mask that comes back to it (generate
    # builds masks ahead of a static-cache forward pass and passes them in again): a mask
    # that is "4-D" is not rebuilt from a 2-D one. ``shape`` is the dense mask's.
    ndim = 4

    def __init__(self, padding, q_offset, kv_offset, max_ahead, max_behind, batch_size,
                 q_length, kv_length) -> None:  # fmt: skip
        self.padding = padding
        self.q_offset = q_offset
        self.kv_offset = kv_offset
        self.max_ahead = max_ahead
        self.max_behind = max_behind
        self.batch_size = batch_size
        self.q_length = q_length
        self.kv_length = kv_length
        self._strategies: dict = {}

    def strategy(self, lq: int, lk: int) -> Any:
        """The :mod:`fastmask.masks` strategy for ``lq`` queries and ``lk`` keys (None:
        every key kept); computed once and shared by every layer of the forward pass."""
        got = self._strategies.get((lq, lk), self)
        if got is self:
            pad = self.padding
            got = torch_ops.structured_mask(
                lq, lk, key_padding=None if pad is None else pad.numpy(),
                q_start=int(self.q_offset), k_start=int(self.kv_offset),
                max_ahead=self.max_ahead, max_behind=self.max_behind,
            )  # fmt: skip
            self._strategies[(lq, lk)] = got
        return got

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def __repr__(self) -> str:
        pad = None if self.padding is None else tuple(self.padding.shape)
        return (
            f"StructuredMask(q_offset={self.q_offset}, kv_offset={self.kv_offset}, "
            f"max_ahead={self.max_ahead}, max_behind={self.max_behind}, padding={pad}, "
            f"shape={self.shape})"
        )


def mask_function(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> StructuredMask | torch.Tensor | None:
    """fastmask's entry in ``transformers.AttentionMaskInterface`` (``sdpa_mask``'s arguments).

    Returns a :class:`StructuredMask` when ``mask_function`` reads as a band of relative
    positions (causal, bidirectional, sliding windows); otherwise transformers' own
    dense boolean mask (``sdpa_mask`` with no shortcuts), which is always right.
    """
    from transformers import masking_utils

    if isinstance(attention_mask, StructuredMask):  # built ahead by generate, passed back in
        return attention_mask
    fn = masking_utils.causal_mask_function if mask_function is None else mask_function
    legacy = q_length is None and kwargs.get("cache_position") is not None  # transformers < 5
    if legacy:  # the queries' positions: an arange from the cache's length
        positions = kwargs["cache_position"]
        q_length, q_offset = positions.shape[0], positions[0]
    band = None if kwargs.get("use_vmap") else read_band(fn)
    if band is None or q_length is None or kv_length is None:
        dense = dict(kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        if not legacy:
            dense.update(q_length=q_length, q_offset=q_offset)
        return masking_utils.sdpa_mask(batch_size=batch_size, kv_length=kv_length,
                                       kv_offset=kv_offset, mask_function=fn,
                                       attention_mask=attention_mask, **dense)  # fmt: skip
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.bool()
    return StructuredMask(attention_mask, q_offset, kv_offset, band[0], band[1], batch_size,
                          q_length, kv_length)  # fmt: skip


# ----------------------------------------------------------- the attention function


def _refuse(dropout: float, kwargs: dict) -> None:
    """Errors for what fastmask does not compute, instead of a different result."""
    if dropout:
        raise ValueError(
            f"fastmask attention has no attention dropout (got dropout={dropout}: is the model "
            "in training mode?). Call model.eval() for inference, or train with "
            "attn_implementation='sdpa' or 'eager'."
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"fastmask attention does not support logit soft-capping (softcap="
            f"{kwargs['softcap']}, e.g. Gemma 2): use attn_implementation='eager'."
        )
    for sinks in ("s_aux", "sinks"):
        if kwargs.get(sinks) is not None:
            raise ValueError(
                f"fastmask attention does not support attention sinks ({sinks}=..., e.g. "
                "gpt-oss): use attn_implementation='eager'."
            )


def _mask_arguments(mask: Any, query: torch.Tensor, is_causal: bool) -> dict:
    """The model's mask as :func:`torch_ops.attention` arguments."""
    if isinstance(mask, StructuredMask):
        return {"key_padding": mask.padding, "q_start": mask.q_offset, "k_start": mask.kv_offset,
                "max_ahead": mask.max_ahead, "max_behind": mask.max_behind}  # fmt: skip
    if mask is None:
        # As sdpa: no mask and a causal module means causal from the top-left corner,
        # except for one query (a decode step), which sees every key.
        return {"max_ahead": 0} if is_causal and query.shape[2] > 1 else {}
    if isinstance(mask, torch.Tensor):
        if mask.dtype == torch.bool:
            return {"keep": mask}
        if mask.is_floating_point():
            return {"bias": mask}
        raise TypeError(
            f"fastmask attention takes a boolean (True = attend) or an additive float mask; "
            f"got a {mask.dtype} tensor of shape {tuple(mask.shape)}"
        )
    raise TypeError(
        f"fastmask attention got a {type(mask).__name__} as the attention mask; it takes "
        "fastmask's own structured masks, boolean or float tensors, or None. Was the model "
        "built with attn_implementation='fastmask' after fastmask...transformers.register()?"
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fastmask's entry in ``transformers.AttentionInterface`` (``sdpa``'s arguments).

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (its ``is_causal`` is the default for ``is_causal``).
    query, key, value : Tensor, shapes (B, H, Lq, D), (B, Hk, Lk, D), (B, Hk, Lk, Dv)
        ``H`` a multiple of ``Hk`` (GQA: k and v are not repeated).
    attention_mask : StructuredMask, Tensor or None
        From :func:`mask_function`; a boolean (True = attend) or additive float tensor
        the model built itself; or None.
    dropout : float
        Must be 0 (inference only).
    scaling : float, optional
        Multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
    is_causal : bool, optional
        Used only when ``attention_mask`` is None, as ``sdpa`` does.
    position_bias : Tensor, optional
        An additive position bias (T5-style), broadcastable to ``(B, H, Lq, Lk)``.
    **kwargs
        ``output_attentions=True`` returns the weights (materialised) as well.
        ``softcap`` and attention sinks raise ``ValueError``.

    Returns
    -------
    attn_output : Tensor, shape (B, Lq, H, Dv)
        Contiguous, in the inputs' dtype.
    attn_weights : Tensor or None
        ``(B, H, Lq, Lk)`` with ``output_attentions=True``, else None.
    """
    _refuse(dropout, kwargs)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    args = _mask_arguments(attention_mask, query, causal)
    if position_bias is not None:
        bias = args.pop("bias", None)
        if "keep" in args:  # one additive term: the model materialised both anyway
            keep = args.pop("keep")
            bias = torch.where(keep, 0.0, float("-inf")).to(position_bias.dtype)
        args["bias"] = position_bias if bias is None else position_bias + bias
    if kwargs.get("output_attentions"):
        return torch_ops.attention_with_weights(query, key, value, scale=scaling, **args)
    direct = torch_ops._direct(query)
    if direct and isinstance(attention_mask, StructuredMask) and "bias" not in args:
        # Eager: the strategy is built once per forward pass, not once per layer.
        torch_ops._check(query, key, value, None, None, attention_mask.padding)
        mask = attention_mask.strategy(query.shape[2], key.shape[2])
        return torch_ops._run(query, key, value, mask, None, scaling), None
    return torch_ops.attention(query, key, value, scale=scaling, **args), None


# ----------------------------------------------------------- registration


def register(name: str = NAME) -> None:
    """Make ``name`` an ``attn_implementation`` of transformers.

    Registers :func:`attention_forward` in ``transformers.AttentionInterface`` and
    :func:`mask_function` in ``transformers.AttentionMaskInterface``, so that
    ``AutoModel.from_pretrained(path, attn_implementation=name)`` and
    ``model.set_attn_implementation(name)`` use fastmask. Calling it again is harmless.

    Parameters
    ----------
    name : str
        The implementation's name (default ``"fastmask"``).

    Raises
    ------
    ImportError
        transformers is not installed (``pip install "fastmask[transformers]"``).
    ValueError
        ``name`` is one of transformers' own implementations (``"sdpa"``, ``"eager"``...).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(
            "fastmask.integrations.transformers needs transformers: "
            'pip install "fastmask[transformers]"'
        ) from exc
    builtin = {"eager", "sdpa", "flex_attention", "paged|eager"}
    if name in builtin or name.startswith("flash_attention"):
        raise ValueError(f"{name!r} is one of transformers' own attention implementations")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_function)


def _mappings() -> list[dict]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # transformers has no unregister: its registry is this class-level dict.
    return [AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping]


def unregister(name: str = NAME) -> None:
    """Remove what :func:`register` added under ``name`` (entries of others stay)."""
    for mapping, ours in zip(_mappings(), (attention_forward, mask_function), strict=True):
        if mapping.get(name) is ours:
            del mapping[name]


def is_registered(name: str = NAME) -> bool:
    """Whether :func:`register` has made ``name`` fastmask's, in both interfaces."""
    try:
        attn, masks = _mappings()
    except ImportError:
        return False
    return attn.get(name) is attention_forward and masks.get(name) is mask_function
