"""The rules every call path applies to its operands, written once.

Host calls (:mod:`fastmask.request`, :mod:`fastmask.attention_request`), device calls
(:mod:`fastmask.device`, :mod:`fastmask.device_attention`) and Dask calls
(:mod:`fastmask.dask`) describe each operand as an :class:`Operand`: what a NumPy
view, a ``__cuda_array_interface__`` or a dask array says of itself (shape, dtype,
and, where the memory is known, where its bytes lie). The checks below take those
descriptions, so that one input gets one verdict on every path, before any backend
runs. Error types follow ``docs/api.md``: ``TypeError`` for an operand of the wrong
kind or dtype, ``ValueError`` for a wrong shape, axis, value or memory layout.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from .dtypes import ACCEPTED, FLOAT16, FLOAT32, FLOAT64, is_bfloat16, is_float
from .strided import Strided, overlaps_itself

__all__ = [
    "BIAS_HINT",
    "DASK",
    "DEVICE",
    "FLOAT_DTYPES",
    "HOST",
    "LOGITS_HINT",
    "QKV_HINT",
    "AttentionDims",
    "Operand",
    "attention_dims",
    "attention_shapes",
    "broadcast_error",
    "check_bool_mask",
    "check_broadcast",
    "check_float",
    "check_float_dtype",
    "check_not_aliased",
    "check_out",
    "check_scale",
    "check_structured_axis",
    "device_array_error",
    "float_dtype_error",
    "mask_dtype_error",
    "ndim_error",
    "softmax_axis",
]

HOST, DEVICE, DASK = "host", "device", "dask"

#: The dtypes device arrays may have (bfloat16 is host-only for now).
FLOAT_DTYPES = (FLOAT16, FLOAT32, FLOAT64)

#: What the dtype errors of the logits, of q/k/v and of a bias suggest.
LOGITS_HINT = "Convert first, e.g. x.astype(numpy.float32)."
QKV_HINT = "Convert first, e.g. a.astype(numpy.float32)."
BIAS_HINT = "Pass an additive float mask (e.g. -inf or -1e9 at masked positions)."


class Operand(NamedTuple):
    """One operand of a call, as the rules see it.

    Attributes
    ----------
    what : str
        Its name in error messages ("x (the logits)", "bias", "out").
    shape : tuple of int
    dtype : numpy.dtype
    where : str
        :data:`HOST`, :data:`DEVICE` or :data:`DASK`.
    source : object
        The NumPy array (host), the :class:`~fastmask.strided.Strided` description
        (device) or the dask array (Dask).
    """

    what: str
    shape: tuple[int, ...]
    dtype: np.dtype
    where: str
    source: Any

    @classmethod
    def of_host(cls, a: np.ndarray, what: str) -> Operand:
        return cls(what, a.shape, a.dtype, HOST, a)

    @classmethod
    def of_device(cls, obj: Any, what: str) -> Operand:
        """Describe a device array from its ``__cuda_array_interface__`` (TypeError if unusable)."""
        s = obj if isinstance(obj, Strided) else Strided.of_device(obj, what)
        return cls(what, s.shape, s.dtype, DEVICE, s)

    @classmethod
    def of_dask(cls, a: Any, what: str) -> Operand:
        return cls(what, tuple(int(d) for d in a.shape), np.dtype(a.dtype), DASK, a)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def memory(self) -> Strided | None:
        """Where its bytes lie (None for a dask array: its chunks are not in memory yet)."""
        if self.where == HOST:
            return Strided.of_host(self.source)
        return self.source if self.where == DEVICE else None

    @property
    def readonly(self) -> bool:
        return not self.source.flags.writeable if self.where == HOST else self.source.readonly

    @property
    def aligned(self) -> bool:
        if self.where == HOST:
            return bool(self.source.flags.aligned)
        s = self.source
        n = s.dtype.itemsize
        return s.ptr % n == 0 and all(st % n == 0 for st in s.strides)


# --- errors shared by every path ---


def device_array_error(what: str) -> TypeError:
    """The error for a GPU device array that no registered backend can serve."""
    return TypeError(
        f"{what} is a GPU device array; no installed backend serves device arrays. "
        "Install the CUDA plugin (pip install ./plugins/fastmask-cuda) or copy it to the host."
    )


def float_dtype_error(dtype: Any, what: str, hint: str, accepted: str = ACCEPTED) -> TypeError:
    """The error for an operand of a dtype fastmask does not compute with."""
    return TypeError(f"{what} must be {accepted}; got {dtype}. {hint}")


def ndim_error(what: str, ndim: int, whose: str, nd: int) -> ValueError:
    """The error for an operand with more axes than its target (``whose``: "x's", "the scores'")."""
    return ValueError(f"{what} has {ndim} dimensions, more than {whose} {nd}")


def broadcast_error(what: str, shape: tuple, whose: str, target: tuple) -> ValueError:
    """The error for an operand that does not broadcast to its target's shape."""
    return ValueError(f"{what} of shape {shape} does not broadcast to {whose} shape {target}")


def mask_dtype_error(dtype: np.dtype) -> TypeError:
    """The error for a non-boolean array passed as ``mask=``."""
    return TypeError(
        f"mask= takes a boolean array (True = keep/attend) or a fastmask.masks strategy; "
        f"got a {dtype} array. fastmask never guesses a mask convention: use "
        "mask=fastmask.masks.keep(a) if nonzero means attend, "
        "mask=fastmask.masks.drop(a) if nonzero means masked out (TF tutorial, "
        "PyTorch key_padding_mask), or bias=a for an additive float mask (-inf/-1e9)."
    )


# --- operands ---


def check_float(op: Operand, hint: str) -> None:
    """TypeError unless fastmask computes with ``op``'s dtype where it lives.

    Host and Dask operands may be float16, bfloat16, float32 or float64 in either
    byte order (the host path converts); device operands float16, float32 or
    float64 in native byte order (the core never touches device memory).
    """
    check_float_dtype(op.dtype, op.where, op.what, hint)


def check_float_dtype(dt: np.dtype, where: str, what: str, hint: str) -> None:
    """:func:`check_float` for a dtype and where it lives (the host path's hot call)."""
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        if where == DEVICE and not dt.isnative:
            raise TypeError(f"{what} is a non-native byte order device array ({dt})")
        return
    if where != DEVICE:
        if not is_float(dt):
            raise float_dtype_error(dt, what, hint)
        return
    note = " (bfloat16 runs on the host only, for now)" if is_bfloat16(dt) else ""
    accepted = "float16, float32 or float64 on a device"
    raise TypeError(str(float_dtype_error(dt, what, hint, accepted)) + note)


def check_bool_mask(op: Operand) -> None:
    """TypeError unless an array given as ``mask=`` is boolean (True = keep)."""
    if op.dtype != np.bool_:
        raise mask_dtype_error(op.dtype)


def check_broadcast(op: Operand, target: tuple[int, ...], whose: str) -> None:
    """ValueError unless ``op`` broadcasts to ``target`` without gaining axes on the right.

    ``whose`` names the target in the message: "x's", "the logits'", "the scores'".
    """
    shape = op.shape
    nd, n = len(target), len(shape)
    if n > nd:
        raise ndim_error(op.what, n, whose, nd)
    for i in range(n):
        d = shape[i]
        if d != 1 and d != target[nd - n + i]:
            raise broadcast_error(op.what, tuple(shape), whose, tuple(target))


def _same_memory(a: Operand, b: Operand) -> bool:
    """Whether two operands share an element (exact on the host, by span on the device)."""
    if a.where != b.where or a.where == DASK:
        return False
    if a.where == HOST:
        if not np.may_share_memory(a.source, b.source):
            return False
        try:
            return bool(np.shares_memory(a.source, b.source, max_work=10**6))
        except np.exceptions.TooHardError:
            return True  # undecided: refuse rather than risk wrong values
    return a.source.overlaps(b.source)


def _overlaps_itself(op: Operand) -> bool:
    a = op.source
    if op.where == HOST:
        if a.flags.c_contiguous or a.flags.f_contiguous:
            return False
        return overlaps_itself(a.shape, a.strides, a.itemsize)
    return a.overlaps_itself()


def check_out(out: Operand, x: Operand) -> bool:
    """Validate ``out=`` against the logits ``x``; return whether it is ``x`` itself (in place).

    ``out`` must live where ``x`` does, match its shape and dtype, be writable and
    aligned, have no two elements at one address, and be either exactly ``x`` or
    disjoint from it. Raises ValueError.
    """
    if out.where != x.where:
        raise ValueError(
            f"out must be a {x.where} array when x is one"
            + (" (exposing __cuda_array_interface__)" if x.where == DEVICE else "")
            + f"; got a {out.where} array ({type(out.source).__name__})"
        )
    if out.shape != x.shape:
        raise ValueError(f"out has shape {out.shape}; it must match x's shape {x.shape}")
    if out.dtype != x.dtype:
        raise ValueError(f"out has dtype {out.dtype}; it must match x's dtype {x.dtype}")
    if out.readonly:
        raise ValueError("out is read-only; pass a writable array (or x itself for in place)")
    if not out.aligned:
        raise ValueError("out is not aligned to its itemsize; pass an aligned array")
    if _overlaps_itself(out):
        raise ValueError(
            "out has elements that share memory (a zero or overlapping stride, e.g. from "
            "broadcast_to or as_strided); pass a fresh array, e.g. numpy.empty_like(x)"
        )
    # This runs on every call with out=, so host arrays take the cheap tests (a few
    # microseconds matter to a decode step's tiny calls).
    if out.where == HOST:
        o, a = out.source, x.source
        if not np.may_share_memory(o, a):
            return False
        here = o.__array_interface__["data"][0] == a.__array_interface__["data"][0]
        if here and o.strides == a.strides:
            return True
    elif out.source.ptr == x.source.ptr and out.source.strides == x.source.strides:
        return True
    if _same_memory(out, x):
        raise ValueError(
            "out overlaps x without being x itself; pass out=x for in place, or a separate array"
        )
    return False


def check_not_aliased(out: Operand, operand: Operand | None) -> None:
    """``out`` must not share memory with an operand the kernels read (the mask, the bias):
    they would read what they have already written. Raises ValueError."""
    if operand is not None and _same_memory(out, operand):
        name = operand.what
        raise ValueError(
            f"out shares memory with the {name}; the kernels would read values they have "
            f"already written. Pass a separate out (or copy the {name} first)"
        )


# --- the other arguments ---


def softmax_axis(axis: Any, nd: int) -> int:
    """Validate ``axis`` for logits with ``nd`` dimensions; return it as 0..nd-1."""
    if nd == 0:
        raise ValueError("x must have at least one axis (the softmax axis); got a 0-d array")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int; got {axis!r}")
    ax = int(axis)
    if not -nd <= ax < nd:
        raise np.exceptions.AxisError(ax, nd)
    return ax % nd


def check_scale(scale: Any) -> float:
    """Validate ``scale`` (None, or a finite real number); return it as a float (None: 1.0)."""
    if scale is None:
        return 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number; got {scale!r}")
    s = float(scale)
    if not np.isfinite(s):
        raise ValueError(f"scale must be finite; got {s}")
    return s


def check_structured_axis(strategy: Any, ax: int, nd: int, axis: Any) -> None:
    """ValueError for a structured mask strategy when the softmax axis is not the last."""
    if strategy is not None and strategy.structured and ax != nd - 1:
        raise ValueError(
            f"{strategy!r} is defined on (..., Lq, Lk) with the softmax axis last; "
            f"got axis={axis}. Move the softmax axis last, or pass a dense mask "
            "(strategy.to_dense(shape))."
        )


# --- attention ---


def attention_shapes(q: Any, k: Any, v: Any) -> tuple[tuple[int, ...], int, int]:
    """Validate q/k/v shapes; return ``(batch shape, Hq, Hk)`` (``(batch, 1, 1)`` without
    grouped-query attention).

    Reads only ``shape`` and ``ndim``: NumPy, device and dask arrays alike.
    """
    for a, name, dims in ((q, "q", "(..., Lq, D)"), (k, "k", "(..., Lk, D)"),
                          (v, "v", "(..., Lk, Dv)")):  # fmt: skip
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape {dims}; got a {a.ndim}-d array {a.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last axis D; got q {q.shape} and k {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of keys (axis -2); got k {k.shape} and v {v.shape}"
        )
    qb, kb, vb = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    try:
        kvb = np.broadcast_shapes(kb, vb)
    except ValueError:
        raise ValueError(
            f"the leading axes of k {k.shape} and v {v.shape} do not broadcast"
        ) from None
    hq = qb[-1] if qb else 1
    hk = kvb[-1] if kvb else 1
    grouped = bool(qb) and bool(kvb) and hq != hk and hk != 1 and hq != 1
    if grouped and hq % hk:
        raise ValueError(
            f"q has {hq} heads (axis -3) and k/v have {hk}: for grouped-query attention "
            f"q's head count must be a multiple of k/v's (or either must be 1 to broadcast)"
        )
    try:
        if grouped:
            batch = np.broadcast_shapes(qb, (*kvb[:-1], hq))
        else:
            batch = np.broadcast_shapes(qb, kvb)
    except ValueError:
        raise ValueError(
            f"the leading axes of q {q.shape} and k/v {kvb} do not broadcast"
        ) from None
    if not grouped:
        return batch, 1, 1
    return batch, hq, hk


class AttentionDims(NamedTuple):
    """The sizes of a validated ``attention`` call (every path alike)."""

    batch: tuple[int, ...]  # the scores' leading axes
    group: int  # query heads per kv head (1 without grouped-query attention)
    hk: int  # kv heads (axis -3 of k/v; 1 when there is none)
    lq: int
    d: int
    lk: int
    dv: int
    scale: float  # the user's, else 1/sqrt(D)


def attention_dims(
    q: Operand, k: Operand, v: Operand, scale: Any, return_weights: Any, hint: str = QKV_HINT
) -> AttentionDims:
    """Validate ``q``, ``k``, ``v`` (their dtypes and what they must agree on), ``scale``
    and ``return_weights``; return the call's sizes."""
    for op in (q, k, v):
        check_float(op, hint)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(
            f"q, k and v must have the same dtype; got {q.dtype}, {k.dtype} and {v.dtype}. "
            "Convert them first, e.g. k.astype(q.dtype)."
        )
    if not isinstance(return_weights, (bool, np.bool_)):
        raise TypeError(f"return_weights must be a bool; got {return_weights!r}")
    batch, hq, hk = attention_shapes(q, k, v)
    batch = tuple(int(d) for d in batch)
    lq, d = (int(n) for n in q.shape[-2:])
    lk, dv = (int(n) for n in v.shape[-2:])
    s = (1.0 / math.sqrt(d) if d > 0 else 1.0) if scale is None else check_scale(scale)
    return AttentionDims(batch, hq // hk, hk, lq, d, lk, dv, s)
