"""Turning a user's ``attention`` call into what backends see: validated 4-D views.

Shapes: ``q (..., Lq, D)``, ``k (..., Lk, D)``, ``v (..., Lk, Dv)``. Their leading
axes broadcast to the call's *batch* shape; the scores ``q @ k^T`` have shape
``batch + (Lq, Lk)`` and the mask, bias and mask strategies are interpreted on
that shape exactly as :func:`fastmask.masked_softmax` interprets its logits.

Grouped-query attention: when q's head axis (axis -3) has ``Hq`` entries and
k/v's has ``Hk`` with ``Hq`` a multiple of ``Hk``, query head ``h`` reads kv
head ``h // (Hq // Hk)``. k and v are never repeated in memory for it: after
folding the leading axes into ``(B, H)``, the flat query head ``h`` reads the
flat kv head ``h // group`` (this holds for any number of leading axes), and
the backends index accordingly.

Layout of a request (``(B, H)`` is the canonical ``(batch, heads)`` split of
:func:`fastmask.masks.base.canonical_dims`, except that 3-D scores
``(X, Lq, Lk)`` are laid out as ``B = 1, H = X`` so that grouping always runs
along ``H``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import outputs
from .masks import MaskStrategy
from .masks.base import MaskPlan, canonical_dims
from .masks.custom import prepare as prepare_user_functions
from .request import (
    as_array,
    bounds4,
    compute_dtype,
    fold,
    host_bias,
    host_float,
    mask_key,
    mask_strategy,
)
from .rules import (
    QKV_HINT,
    Operand,
    attention_dims,
)
from .threads import get_num_threads

__all__ = [
    "AttentionRequest",
    "AttentionSizes",
    "build_attention_requests",
    "plan_keep_and_bounds",
    "with_operands",
]


class AttentionSizes:
    """Derived sizes of an attention request whose ``q4``/``k4`` are 4-D (host or device)."""

    @property
    def scores_shape4(self) -> tuple[int, int, int, int]:
        b, h, q, _ = self.q4.shape
        return b, h, q, self.k4.shape[2]

    @property
    def rows(self) -> int:
        b, h, q, _ = self.q4.shape
        return b * h * q

    @property
    def size(self) -> int:
        """Elements of the full scores ``(B, Hq, Lq, Lk)``."""
        return self.rows * self.k4.shape[2]


@dataclass(frozen=True)
class AttentionRequest(AttentionSizes):
    """One attention call (or one part of a split call), as backends see it.

    Attributes
    ----------
    op : str
        ``"attention"``.
    q4 : ndarray, (B, Hq, Lq, D)
        Queries in ``compute_dtype`` (broadcast views: zero strides, never expanded).
    k4, v4 : ndarray, (B, Hk, Lk, D) and (B, Hk, Lk, Dv)
        Keys and values in ``compute_dtype``; ``Hq == Hk * group``.
    out4 : ndarray, (B, Hq, Lq, Dv)
        The output, in ``dtype``, zero-filled: a backend may leave the rows and
        tiles it skips untouched.
    weights4 : ndarray or None, (B, Hq, Lq, Lk)
        Where to write the attention weights (``return_weights=True``), in ``dtype``,
        zero-filled.
    keep4 : ndarray of bool or None
        Dense keep mask view of the scores' shape ``(B, Hq, Lq, Lk)``.
    bias4 : ndarray or None
        Additive bias view of the scores' shape, in ``compute_dtype``.
    bounds4 : ndarray of int64 or None
        ``(B, Hq, Lq, 2)``: the keys a row may keep are ``[lo, hi)``, clipped to
        ``[0, Lk]``. It combines the strategy's intervals with the first and last
        kept key of each row of a dense mask, so ``lo >= hi`` means the row keeps
        nothing; backends may skip any key outside it.
    scale : float
        Multiplies the scores first (``1/sqrt(D)`` unless the user gave one).
    group : int
        Query heads per kv head (1 without grouped-query attention).
    h0 : int
        Global index of this request's first head (non-zero only for split calls).
    compute_dtype : dtype
        float32 for float16/bfloat16/float32 inputs, float64 for float64.
    strategy : MaskStrategy or None
        The user's mask strategy.
    key : tuple
        Routing signature: requests with equal keys route to the same backend.
    predicate, score : object or None
        The mask's user predicate / score function (:mod:`fastmask.masks.custom`),
        compiled for ``compute_dtype``; they see the indices of the scores as
        ``masked_softmax`` defines them (``b``, ``h0 + h``, ``q``, ``k``).
    swap_bh : bool
        3-D scores ``(X, Lq, Lk)``, laid out as ``B = 1, H = X``: the user functions'
        ``b`` is this request's ``h`` and their ``h`` is 0.
    family : tuple or None
        ``key`` with ``Lq`` and ``Lk`` rounded to their power-of-two range: calls of
        one family may share a routing decision (:func:`fastmask.router.choose`).
    """

    op: str
    q4: np.ndarray
    k4: np.ndarray
    v4: np.ndarray
    out4: np.ndarray
    weights4: np.ndarray | None
    keep4: np.ndarray | None
    bias4: np.ndarray | None
    bounds4: np.ndarray | None
    scale: float
    group: int
    h0: int
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    predicate: Any = None
    score: Any = None
    swap_bh: bool = False
    family: tuple | None = None

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the inputs and outputs."""
        return self.out4.dtype


def _keys(q_shape, k_shape, v_shape, dtype, rest: tuple) -> tuple[tuple, tuple]:
    """A request's routing ``key`` and ``family`` (the key with Lq, Lk as bit lengths)."""
    key = ("attention", q_shape, k_shape, v_shape, dtype.char, *rest)
    lq, lk = q_shape[-2], k_shape[-2]
    family = ("attention", q_shape[:-2], q_shape[-1], lq.bit_length(), k_shape[:-2],
              v_shape[:-2], k_shape[-1], v_shape[-1], lk.bit_length(), dtype.char,
              *rest)  # fmt: skip
    return key, family


def with_operands(
    template: AttentionRequest, q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray
) -> AttentionRequest:
    """``template`` (one 4-D request without a dense mask or a bias) with new 4-D
    operands of the same dtype whose shapes may differ in ``Lk`` only (a decode
    step's growing KV cache); a new ``Lk`` re-plans the strategy's intervals for it."""
    if k.shape == template.key[2] and v.shape == template.key[3]:
        return dataclasses.replace(template, q4=q, k4=k, v4=v, out4=out)
    key, family = _keys(q.shape, k.shape, v.shape, q.dtype, template.key[5:])
    bounds = template.bounds4
    if bounds is not None:
        shape = (*q.shape[:3], k.shape[2])
        bounds = plan_keep_and_bounds(template.strategy.plan(shape), shape)[1]
    return dataclasses.replace(template, q4=q, k4=k, v4=v, out4=out, key=key, family=family,
                               bounds4=bounds)  # fmt: skip


def _dense_row_bounds(keep: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """First kept key and one past the last of every row of a dense keep mask.

    Computed on the mask's own (possibly broadcast-small) shape, then laid out as
    ``(B, H, Q)``; rows keeping nothing get ``[0, 0)``.
    """
    nd = len(shape)
    n = shape[-1]
    kp = keep.reshape((1,) * (nd - keep.ndim) + keep.shape)
    if n == 0 or kp.shape[-1] == 0:
        lo = hi = np.zeros(kp.shape[:-1], np.int64)
    elif kp.shape[-1] == 1:
        any_ = kp[..., 0]
        lo = np.zeros(any_.shape, np.int64)
        hi = np.where(any_, n, 0).astype(np.int64)
    else:
        any_ = kp.any(axis=-1)
        first = np.argmax(kp, axis=-1)
        last = n - np.argmax(kp[..., ::-1], axis=-1)
        lo = np.where(any_, first, 0).astype(np.int64)
        hi = np.where(any_, last, 0).astype(np.int64)
    b, h, q, _ = canonical_dims(shape)
    rows = shape[:-1]
    lo = np.broadcast_to(lo, rows).reshape(b, h, q)
    hi = np.broadcast_to(hi, rows).reshape(b, h, q)
    return lo, hi


def plan_keep_and_bounds(
    plan: MaskPlan | None, scores_shape: tuple[int, ...]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A mask plan's dense keep mask (at its own shape) and the rows' kept intervals.

    The intervals, ``(B, H, Q, 2)`` int64 (a broadcast view), combine the plan's
    ``[lo, hi)`` with the first and last kept key of each row of its dense mask;
    None when the plan has neither. Shared by host and device attention calls.
    """
    if plan is None:
        return None, None
    nd = len(scores_shape)
    lo, hi = plan.lo, plan.hi
    if plan.keep is not None:
        if plan.keep.ndim > nd:
            raise ValueError(
                f"mask has {plan.keep.ndim} dimensions, more than the scores' {nd} "
                f"(scores: {scores_shape})"
            )
        dlo, dhi = _dense_row_bounds(plan.keep, scores_shape)
        lo = dlo if lo is None else np.maximum(lo, dlo)
        hi = dhi if hi is None else np.minimum(hi, dhi)
    if lo is None:
        return plan.keep, None
    return plan.keep, bounds4(MaskPlan(lo=lo, hi=hi), *canonical_dims(scores_shape))


def build_attention_requests(
    q: Any,
    k: Any,
    v: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    return_weights: bool = False,
    zeroed: bool = True,
) -> tuple[list[AttentionRequest], np.ndarray, np.ndarray | None]:
    """Validate an ``attention`` call and build its request(s).

    With ``zeroed=False`` the output is left uninitialised (a recycled block for large
    outputs, see :mod:`fastmask.outputs`): the caller zero-fills it unless the backend
    that runs the call writes every element (:meth:`Backend.fills_output`).

    Returns
    -------
    requests : list of AttentionRequest
        Usually one; several when the leading axes of some operand cannot be
        folded into one head axis without a copy (the call is then split along
        axis 1).
    out : ndarray
        The output ``batch + (Lq, Dv)`` in the inputs' dtype (zeros until run).
    weights : ndarray or None
        The weights ``batch + (Lq, Lk)`` when ``return_weights`` (zeros until run).
    """
    qa = host_float(as_array(q, "q"), "q", QKV_HINT)
    ka = host_float(as_array(k, "k"), "k", QKV_HINT)
    va = host_float(as_array(v, "v"), "v", QKV_HINT)
    ops = (Operand.of_host(a, name) for a, name in ((qa, "q"), (ka, "k"), (va, "v")))
    batch, group, hk, lq, d, lk, dv, s = attention_dims(*ops, scale, return_weights)
    dtype = qa.dtype
    cdt = compute_dtype(dtype)

    scores_shape = (*batch, lq, lk)
    strategy = mask_strategy(mask, scores_shape, "the scores'")
    plan = strategy.plan(scores_shape) if strategy is not None else None
    nd = len(scores_shape)
    plan_keep, bounds = plan_keep_and_bounds(plan, scores_shape)
    user_fns = prepare_user_functions(plan, cdt)  # (predicate, score), compiled: TypeError here
    keep = None if plan_keep is None else np.broadcast_to(plan_keep, scores_shape)

    bias_view = None if bias is None else host_bias(bias, scores_shape, cdt, "the scores'")

    # Operands in the compute dtype (float16/bfloat16 are converted once, before broadcasting).
    qc = qa.astype(cdt, copy=False)
    kc = ka.astype(cdt, copy=False)
    vc = va.astype(cdt, copy=False)
    kv_batch = (*batch[:-1], hk) if group > 1 else batch
    q_b = np.broadcast_to(qc, (*batch, lq, d))
    k_b = np.broadcast_to(kc, (*kv_batch, lk, d))
    v_b = np.broadcast_to(vc, (*kv_batch, lk, dv))
    if zeroed:
        out = np.zeros((*batch, lq, dv), dtype)
    else:
        out = outputs.empty((*batch, lq, dv), dtype)
    weights = np.zeros(scores_shape, dtype) if return_weights else None

    key, family = _keys(qa.shape, ka.shape, va.shape, dtype, (
        keep is not None,
        bias_view is not None,
        bounds is not None,
        mask_key(strategy),
        bool(return_weights),
        get_num_threads(),
    ))  # fmt: skip
    operands = [q_b, k_b, v_b, out, weights, keep, bias_view]
    requests: list[AttentionRequest] = []
    _assemble(operands, bounds, s, group, cdt, strategy, key, 0, nd, requests, user_fns)
    if len(requests) == 1:  # a split call's parts are routed together, by the first
        requests[0] = dataclasses.replace(requests[0], family=family)
    return requests, out, weights


def _assemble(
    operands: list[np.ndarray | None],
    bounds: np.ndarray | None,
    s: float,
    group: int,
    cdt: np.dtype,
    strategy: MaskStrategy | None,
    key: tuple,
    h0: int,
    nd: int,
    requests: list[AttentionRequest],
    user_fns: tuple[Any, Any] = (None, None),
) -> None:
    """Fold the operands to 4-D views, splitting along axis 1 where a fold needs a copy."""
    folded = [None if a is None else fold(a) for a in operands]
    if any(f is None and a is not None for f, a in zip(folded, operands, strict=True)):
        out = operands[3]
        assert out is not None
        inner_h = canonical_dims(out.shape)[1] // max(out.shape[1], 1)
        for i in range(out.shape[1]):
            sub = [None if a is None else a[:, i] for a in operands]
            sub_bounds = None if bounds is None else bounds[:, i * inner_h : (i + 1) * inner_h]
            _assemble(sub, sub_bounds, s, group, cdt, strategy, key, h0 + i * inner_h, nd - 1,
                      requests, user_fns)  # fmt: skip
        return
    q4, k4, v4, out4, w4, keep4, bias4 = folded
    b4 = bounds
    if nd == 3:
        # (X, 1, ...) -> (1, X, ...): the head axis of 3-D inputs is their first axis.
        q4, k4, v4, out4 = (a.swapaxes(0, 1) for a in (q4, k4, v4, out4))  # type: ignore[union-attr]
        w4, keep4, bias4, b4 = (None if a is None else a.swapaxes(0, 1)
                                for a in (w4, keep4, bias4, b4))  # fmt: skip
    assert q4 is not None and k4 is not None and v4 is not None and out4 is not None
    requests.append(
        AttentionRequest(
            "attention", q4, k4, v4, out4, w4, keep4, bias4, b4, s, group, h0, cdt,
            strategy, key, *user_fns, nd == 3,
        )
    )  # fmt: skip
