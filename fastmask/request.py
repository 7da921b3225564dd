"""Turning a user's call into what backends see: validated, canonical 4-D views.

Every operand is checked by the rules all paths share (:mod:`fastmask.rules`),
brought to the logits' shape by broadcasting *views* (zero strides, nothing
expanded in memory), the softmax axis is moved last, and the leading axes are
folded into ``(B, H, Q)``. Backends receive a
:class:`SoftmaxRequest` and never see user input directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import dtypes as _dtypes
from . import outputs
from .dtypes import ACCEPTED, compute_dtype
from .masks import MaskStrategy
from .masks.base import AllOf, MaskPlan, canonical_dims
from .masks.custom import prepare as prepare_user_functions
from .masks.dense import DenseMask
from .rules import (
    BIAS_HINT,
    HOST,
    LOGITS_HINT,
    Operand,
    check_bool_mask,
    check_broadcast,
    check_float_dtype,
    check_not_aliased,
    check_out,
    check_scale,
    check_structured_axis,
    device_array_error,
    softmax_axis,
)
from .strided import fold4
from .threads import get_num_threads

__all__ = [
    "SoftmaxRequest",
    "as_array",
    "bounds4",
    "build_softmax_requests",
    "compute_dtype",
    "fold",
    "host_bias",
    "host_float",
    "mask_key",
    "mask_strategy",
]


class Rows4D:
    """Derived sizes of a request whose logits ``x4`` are ``(B, H, Q, N)`` (host or device)."""

    @property
    def dtype(self) -> np.dtype:
        return self.x4.dtype

    @property
    def shape4(self) -> tuple[int, int, int, int]:
        return self.x4.shape  # type: ignore[return-value]

    @property
    def rows(self) -> int:
        b, h, q, _ = self.x4.shape
        return b * h * q

    @property
    def size(self) -> int:
        return self.x4.size


@dataclass(frozen=True)
class SoftmaxRequest(Rows4D):
    """One masked-softmax call, as backends see it.

    Attributes
    ----------
    x4, out4 : ndarray
        ``(B, H, Q, N)`` views of the logits and the output (same dtype; ``out4``
        is either exactly ``x4``'s memory or disjoint from it).
    keep4 : ndarray of bool or None
        Dense keep-mask view of shape ``(B, H, Q, N)``, zero strides where broadcast.
    bias4 : ndarray or None
        Additive bias view of shape ``(B, H, Q, N)`` in ``compute_dtype``.
    bounds4 : ndarray of int64 or None
        ``(B, H, Q, 2)`` view: kept keys of each row are ``[lo, hi)``, clipped to ``[0, N]``.
    scale : float
        Multiplies the logits first (1.0 when none).
    h0 : int
        Global index of this request's first head (non-zero only for split calls).
    compute_dtype : dtype
        float32 for float16/bfloat16/float32 logits, float64 for float64.
    strategy : MaskStrategy or None
        The user's mask strategy (for backends that evaluate strategies themselves).
    key : tuple
        Routing signature: requests with equal keys route to the same backend.
    predicate, score : object or None
        The mask's user predicate / score function (:mod:`fastmask.masks.custom`),
        already compiled for ``compute_dtype``. Backends that cannot run them
        must decline requests that have them.
    """

    op: str
    x4: np.ndarray
    out4: np.ndarray
    keep4: np.ndarray | None
    bias4: np.ndarray | None
    bounds4: np.ndarray | None
    scale: float
    h0: int
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    predicate: Any = None
    score: Any = None


def as_array(obj: Any, what: str) -> np.ndarray:
    """An ndarray view of ``obj`` (zero-copy for NumPy arrays and CPU tensors)."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        raise device_array_error(what)
    bits = _dtypes.from_torch_bfloat16(obj)
    if bits is not None:  # NumPy has no bfloat16 of its own: view the bits as ml_dtypes'
        if obj.requires_grad:  # the int16 view would drop it silently
            raise TypeError(
                f"{what} could not be viewed as a NumPy array: it is a tensor that requires "
                "grad; fastmask is for inference: pass x.detach()"
            )
        return as_array(bits, what).view(_dtypes.bfloat16())
    try:
        if hasattr(obj, "__array__"):
            return np.asarray(obj)
        if hasattr(obj, "__dlpack__"):
            return np.from_dlpack(obj)
        return np.asarray(obj)
    except (RuntimeError, BufferError) as exc:
        raise TypeError(f"{what} could not be viewed as a NumPy array: {exc}") from exc
    except TypeError as exc:  # e.g. a torch dtype NumPy has no counterpart for
        raise TypeError(
            f"{what} could not be viewed as a NumPy array ({exc}); fastmask takes {ACCEPTED}: "
            "convert first, e.g. x.float() for a torch tensor"
        ) from exc


def host_float(a: np.ndarray, what: str, hint: str) -> np.ndarray:
    """``a``, in native byte order and aligned, once the rules accept its dtype."""
    check_float_dtype(a.dtype, HOST, what, hint)
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    if not a.flags.aligned:  # e.g. unpickled or np.frombuffer at an odd offset
        return a.copy()
    return a


def host_bias(bias: Any, shape: tuple[int, ...], cdt: np.dtype, whose: str) -> np.ndarray:
    """``bias=`` (a host array) checked by the rules and broadcast to ``shape`` as a view in
    the compute dtype ``cdt``; ``whose`` names ``shape`` in errors ("x's", "the scores'")."""
    ba = host_float(as_array(bias, "bias"), "bias", BIAS_HINT)
    check_broadcast(Operand.of_host(ba, "bias"), shape, whose)
    return np.broadcast_to(ba.astype(cdt, copy=False), shape)


def fold(a: np.ndarray) -> np.ndarray | None:
    """``(..., Q, N)`` -> ``(B, H, Q, N)`` view; None if the middle axes don't fold as a view."""
    nd = a.ndim
    if nd == 4:
        return a
    if nd == 3:
        return a[:, None]
    if nd == 2:
        return a[None, None]
    if nd == 1:
        return a[None, None, None]
    folded = fold4(a.shape, a.strides)
    if folded is None:
        return None
    return np.lib.stride_tricks.as_strided(a, *folded)


def bounds4(plan: MaskPlan, b: int, h: int, q: int, n: int) -> np.ndarray:
    """The plan's ``[lo, hi)`` clipped to ``[0, n]``, as a read-only ``(b, h, q, 2)`` view.

    Built on the plan's small arrays with zero strides on broadcast axes; written
    with ufuncs and the ndarray constructor because this runs on every call
    (``np.clip`` and ``np.broadcast_to`` cost microseconds each at this size).
    """
    lo, hi = plan.lo, plan.hi
    nd = max(lo.ndim, hi.ndim)
    ls = (1,) * (nd - lo.ndim) + lo.shape
    hs = (1,) * (nd - hi.ndim) + hi.shape
    small = (1,) * (3 - nd) + tuple(x if y == 1 else y for x, y in zip(ls, hs, strict=True))
    both = np.empty((*small, 2), np.int64)
    both[..., 0] = lo
    both[..., 1] = hi
    np.minimum(both, n, out=both)
    np.maximum(both, 0, out=both)
    shape = (b, h, q, 2)
    strides = tuple(0 if d == 1 else st for d, st in zip(small, both.strides, strict=False))
    view = np.ndarray(shape, np.int64, buffer=both, strides=(*strides, both.strides[-1]))
    view.flags.writeable = False
    return view


def _plan(
    strategy: MaskStrategy | None, shape: tuple[int, ...]
) -> tuple[MaskPlan | None, np.ndarray | None]:
    """The strategy's plan for logits of ``shape`` and its ``(B, H, Q, 2)`` bounds.

    Remembered on an ``immutable`` strategy for its last shape: a decoder or a
    server calls with one mask object over and over, and planning costs a few
    microseconds. (Interval plans only come from structured strategies, so
    the softmax axis is the last one whenever there are bounds.)
    """
    if strategy is None:
        return None, None
    memo = strategy.__dict__.get("_fastmask_plan")
    if memo is not None and memo[0] == shape:
        return memo[1], memo[2]
    plan = strategy.plan(shape)
    bounds = None if plan.lo is None else bounds4(plan, *canonical_dims(shape))
    if strategy.immutable:
        with contextlib.suppress(AttributeError):  # e.g. a plugin class with __slots__
            strategy._fastmask_plan = (shape, plan, bounds)
    return plan, bounds


def mask_strategy(mask: Any, shape: tuple[int, ...], whose: str) -> MaskStrategy | None:
    """``mask=`` as a strategy: a boolean host array becomes a :class:`DenseMask` (True =
    keep). Dense masks (arrays, ``masks.keep``/``drop`` alone or in ``&``) must broadcast
    to ``shape``, which ``whose`` names in errors ("x's", "the scores'")."""
    if mask is None:
        return None
    if isinstance(mask, MaskStrategy):
        for part in mask.parts if isinstance(mask, AllOf) else (mask,):
            if isinstance(part, DenseMask):
                check_broadcast(Operand.of_host(part.array, "mask"), shape, whose)
        return mask
    m = as_array(mask, "mask")
    op = Operand.of_host(m, "mask")
    check_bool_mask(op)
    check_broadcast(op, shape, whose)
    return DenseMask(m, "keep")


def mask_key(mask: MaskStrategy | None) -> Any:
    return None if mask is None else mask.key


def build_softmax_requests(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    axis: Any = -1,
    out: Any = None,
) -> tuple[list[SoftmaxRequest], np.ndarray]:
    """Validate a ``masked_softmax`` call and build its request(s).

    Returns
    -------
    requests : list of SoftmaxRequest
        Usually one; several when the middle axes of some operand cannot be folded
        into one head axis without a copy (the call is then split along axis 1).
    out : ndarray
        The array the result is written to (``x``'s shape and dtype).
    """
    xa = host_float(as_array(x, "x"), "x (the logits)", LOGITS_HINT)
    nd = xa.ndim
    ax = softmax_axis(axis, nd)
    s = check_scale(scale)

    strategy = mask_strategy(mask, xa.shape, "x's")
    check_structured_axis(strategy, ax, nd, axis)
    plan, bounds = _plan(strategy, xa.shape)

    cdt = compute_dtype(xa.dtype)
    user_fns = prepare_user_functions(plan, cdt)  # (predicate, score), compiled
    operands: list[np.ndarray | None] = [xa, None, None, None]  # x, out, keep, bias
    if plan is not None and plan.keep is not None:
        operands[2] = np.broadcast_to(plan.keep, xa.shape)
    if bias is not None:
        operands[3] = host_bias(bias, xa.shape, cdt, "x's")

    inplace = False
    if out is None:
        oa = outputs.empty(xa.shape, xa.dtype)
    else:
        oa = as_array(out, "out")
        o = Operand.of_host(oa, "out")
        inplace = check_out(o, Operand.of_host(xa, "x"))
        for a, name in ((operands[2], "mask"), (operands[3], "bias")):
            if a is not None:
                check_not_aliased(o, Operand.of_host(a, name))
    operands[1] = oa

    if ax != nd - 1:
        operands = [None if a is None else np.moveaxis(a, ax, -1) for a in operands]

    key = (
        "masked_softmax",
        xa.shape,
        xa.dtype.char,
        ax,
        operands[0].strides[-1] == xa.itemsize,  # type: ignore[union-attr]
        operands[2] is not None,
        operands[3] is not None,
        bounds is not None,
        mask_key(strategy),
        tuple(None if f is None else f.key for f in user_fns),
        inplace,
        get_num_threads(),
    )
    folded = [None if a is None else fold(a) for a in operands]
    if any(f is None and a is not None for f, a in zip(folded, operands, strict=True)):
        requests = _split(operands, bounds, s, cdt, strategy, key, 0, user_fns)
    else:
        requests = [
            SoftmaxRequest(
                "masked_softmax", folded[0], folded[1], folded[2], folded[3], bounds,
                s, 0, cdt, strategy, key, *user_fns,
            )
        ]  # fmt: skip
    return requests, oa


def _split(
    operands: list[np.ndarray | None],
    bounds: np.ndarray | None,
    s: float,
    cdt: np.dtype,
    strategy: MaskStrategy | None,
    key: tuple,
    h0: int,
    user_fns: tuple = (None, None),
) -> list[SoftmaxRequest]:
    """Split along axis 1 until every operand folds to 4-D as a view."""
    x = operands[0]
    assert x is not None
    inner_h = canonical_dims(x.shape)[1] // max(x.shape[1], 1)
    requests: list[SoftmaxRequest] = []
    for i in range(x.shape[1]):
        sub = [None if a is None else a[:, i] for a in operands]
        sub_bounds = None if bounds is None else bounds[:, i * inner_h : (i + 1) * inner_h]
        folded = [None if a is None else fold(a) for a in sub]
        if any(f is None and a is not None for f, a in zip(folded, sub, strict=True)):
            requests += _split(sub, sub_bounds, s, cdt, strategy, key, h0 + i * inner_h, user_fns)
        else:
            requests.append(
                SoftmaxRequest(
                    "masked_softmax", folded[0], folded[1], folded[2], folded[3], sub_bounds,
                    s, h0 + i * inner_h, cdt, strategy, key, *user_fns,
                )
            )  # fmt: skip
    return requests
