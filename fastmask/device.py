"""Device arrays: validating and routing ``masked_softmax`` and ``attention`` calls on GPU memory.

:func:`fastmask.masked_softmax` and :func:`fastmask.explain` come here when ``x``
exposes ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch
CUDA tensors); :func:`fastmask.attention` and :func:`fastmask.explain_attention`
when ``q``, ``k`` or ``v`` does (through :mod:`fastmask.device_attention`). The
core never reads or writes device memory. It reads the arrays' interfaces
(pointer, shape, strides, dtype), applies the rules every path shares
(:mod:`fastmask.rules`: dtypes, mask conventions, bias, scale, ``out`` and
aliasing, ``axis``), and describes every operand as a
:class:`~fastmask.strided.Strided` brought to the canonical ``(B, H, Q, N)``
layout: softmax axis last, zero strides on broadcast axes, nothing expanded or
copied.

Operands are on the device (``x``, ``out``, and ``mask``/``bias`` when given as
device arrays) or are small host arrays (a structured mask's per-row bounds, a
dense mask or bias given as a NumPy array). A backend copies host operands to the
device at their own, un-broadcast size.

The device-backend protocol
---------------------------
A backend serves device calls when its ``ops`` include :data:`DEVICE_OP`. It then
implements, beside ``check``/``status``:

- ``masked_softmax_device(request)``: compute a :class:`DeviceSoftmaxRequest`
  (``request.x4`` into ``request.out4``), asynchronously if it likes;
- ``empty(shape, dtype)``: allocate an output on the device. It is what
  :func:`masked_softmax` returns when the caller passes no ``out``.

A backend serves device attention when its ``ops`` include
:data:`DEVICE_ATTENTION_OP`; those calls are validated and routed by
:mod:`fastmask.device_attention`, which shares this module's operand rules.

Routing goes through the same router as host calls: CPU backends do not list
the device operations and so decline ("does not implement masked_softmax_device").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import plugins, router
from .masks import MaskStrategy
from .masks.base import canonical_dims
from .request import Rows4D, as_array, bounds4, compute_dtype, host_float, mask_key, mask_strategy
from .rules import (
    BIAS_HINT,
    LOGITS_HINT,
    Operand,
    check_bool_mask,
    check_broadcast,
    check_float,
    check_not_aliased,
    check_out,
    check_scale,
    check_structured_axis,
    device_array_error,
    softmax_axis,
)
from .strided import Strided

__all__ = [
    "DEVICE_ATTENTION_OP",
    "DEVICE_OP",
    "DeviceCall",
    "DeviceSoftmaxRequest",
    "Strided",
    "any_device_array",
    "bias_operand",
    "explain",
    "host_operand",
    "is_device_array",
    "mask_operand",
    "masked_softmax",
    "operand_notes",
    "prepare",
    "require_backend",
]

#: The router's operation name for masked softmax on device arrays.
DEVICE_OP = "masked_softmax_device"
#: The router's operation name for attention on device arrays.
DEVICE_ATTENTION_OP = "attention_device"


def is_device_array(obj: Any) -> bool:
    """True when ``obj`` exposes ``__cuda_array_interface__`` (lives in GPU memory)."""
    return hasattr(obj, "__cuda_array_interface__")


def any_device_array(*objs: Any) -> bool:
    """True when any of ``objs`` is a device array (an ``attention`` call goes to the device)."""
    return any(is_device_array(o) for o in objs)


@dataclass(frozen=True)
class DeviceSoftmaxRequest(Rows4D):
    """One masked-softmax call on device arrays, as backends see it.

    The device twin of :class:`fastmask.request.SoftmaxRequest`: the same fields,
    each operand a 4-D ``(B, H, Q, N)`` :class:`Strided` instead of a NumPy view.
    ``x4`` and ``out4`` are device memory (``out4`` is None only while routing,
    before the output is allocated); ``keep4`` and ``bias4`` are device or host
    memory; ``bounds4`` (``(B, H, Q, 2)`` int64, kept keys ``[lo, hi)``) is host memory.
    ``bias4`` keeps the caller's float dtype: backends convert on load.
    """

    op: str
    x4: Strided
    out4: Strided | None
    keep4: Strided | None
    bias4: Strided | None
    bounds4: Strided | None
    scale: float
    h0: int
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    device: str = "cuda"


@dataclass(frozen=True)
class DeviceCall:
    """A validated device call, before the output is allocated.

    Operands are at ``x``'s shape with the softmax axis already moved last.
    """

    x: Strided
    keep: Strided | None
    bias: Strided | None
    out: Strided | None
    bounds: np.ndarray | None
    axis: int
    scale: float
    compute_dtype: np.dtype
    strategy: MaskStrategy | None
    key: tuple
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def with_out(self, out: Any) -> DeviceCall:
        """The same call writing into the device array ``out`` (of ``x``'s original shape)."""
        o = Strided.of_device(out, "out")
        nd = len(self.shape)
        if self.axis != nd - 1:
            o = o.moveaxis(self.axis, -1)
        return replace(self, out=o)

    def requests(self) -> list[DeviceSoftmaxRequest]:
        """The 4-D request(s); several when the middle axes don't fold (split along axis 1)."""
        ops = [self.x, self.out, self.keep, self.bias]
        return self._requests(ops, self.bounds, 0)

    def _requests(
        self, ops: list[Strided | None], bounds: np.ndarray | None, h0: int
    ) -> list[DeviceSoftmaxRequest]:
        folded = [None if a is None else a.fold() for a in ops]
        if all(f is not None or a is None for f, a in zip(folded, ops, strict=True)):
            x4, out4, keep4, bias4 = folded
            assert x4 is not None
            b4 = None if bounds is None else Strided.of_host(bounds)
            return [
                DeviceSoftmaxRequest(
                    DEVICE_OP, x4, out4, keep4, bias4, b4, self.scale, h0,
                    self.compute_dtype, self.strategy, self.key,
                )
            ]  # fmt: skip
        x = ops[0]
        assert x is not None
        inner_h = canonical_dims(x.shape)[1] // max(x.shape[1], 1)
        out: list[DeviceSoftmaxRequest] = []
        for i in range(x.shape[1]):
            sub = [None if a is None else a.index1(i) for a in ops]
            sub_bounds = None if bounds is None else bounds[:, i * inner_h : (i + 1) * inner_h]
            out += self._requests(sub, sub_bounds, h0 + i * inner_h)
        return out


def _compact(a: np.ndarray) -> np.ndarray:
    """``a`` itself when the memory it spans is no larger than its elements (broadcast
    views included), else a contiguous copy: backends copy host operands by span."""
    s = Strided.of_host(a)
    lo, hi = s.extent()
    return a if hi - lo <= max(a.nbytes, a.itemsize) else np.ascontiguousarray(a)


def host_operand(a: np.ndarray) -> Strided:
    """A host array as a backend copies it to the device: compacted when it spans more
    memory than its elements (broadcast views are kept as they are)."""
    return Strided.of_host(_compact(a))


def _serving_backends(op: str = DEVICE_OP) -> list[Any]:
    return [b for b in plugins.backends().values() if op in b.ops]


def mask_operand(
    mask: Any, shape: tuple[int, ...], whose: str
) -> tuple[MaskStrategy | None, Strided | None, str | None]:
    """``(strategy, keep, keep_where)`` for ``mask=``: a boolean device array becomes
    ``keep`` broadcast to ``shape`` (``keep_where == "device"``); a host boolean array a
    :class:`DenseMask` strategy; ``whose`` names ``shape`` in errors ("x's", "the scores'")."""
    if is_device_array(mask):
        op = Operand.of_device(mask, "mask")
        check_bool_mask(op)
        check_broadcast(op, shape, whose)
        return None, op.source.broadcast_to(shape), "device"
    return mask_strategy(mask, shape, whose), None, None


def bias_operand(bias: Any, shape: tuple[int, ...], cdt: np.dtype, whose: str) -> Strided | None:
    """``bias=`` broadcast to ``shape``: a device array read in place (its own float
    dtype), or a host array in ``cdt``; ``whose`` names ``shape`` in errors."""
    if bias is None:
        return None
    if is_device_array(bias):
        op = Operand.of_device(bias, "bias")
        check_float(op, BIAS_HINT)
        b0 = op.source
    else:
        ba = host_float(as_array(bias, "bias"), "bias", BIAS_HINT)
        op = Operand.of_host(ba, "bias")
        b0 = host_operand(ba.astype(cdt, copy=False))
    check_broadcast(op, shape, whose)
    return b0.broadcast_to(shape)


def prepare(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    axis: Any = -1,
    out: Any = None,
) -> DeviceCall:
    """Validate a ``masked_softmax`` call whose ``x`` is a device array.

    The rules of :mod:`fastmask.rules`, as for host calls; ``out`` must be a device
    array too. Reads no device memory.
    """
    xo = Operand.of_device(x, "x (the logits)")
    check_float(xo, LOGITS_HINT)
    xs = xo.source
    nd = xs.ndim
    ax = softmax_axis(axis, nd)
    s = check_scale(scale)
    shape = xs.shape

    strategy, keep, keep_where = mask_operand(mask, shape, "x's")
    check_structured_axis(strategy, ax, nd, axis)
    plan = strategy.plan(shape) if strategy is not None else None
    if plan is not None and plan.keep is not None:
        keep = host_operand(plan.keep).broadcast_to(shape)
        keep_where = "host"

    cdt = compute_dtype(xs.dtype)
    bs = bias_operand(bias, shape, cdt, "x's")

    os_: Strided | None = None
    inplace = False
    if out is not None:
        if is_device_array(out):
            oo = Operand.of_device(out, "out")
        else:
            oo = Operand.of_host(as_array(out, "out"), "out")
        inplace = check_out(oo, xo)
        for a, name in ((keep, "mask"), (bs, "bias")):
            if a is not None and a.on_device:
                check_not_aliased(oo, Operand.of_device(a, name))
        os_ = oo.source

    if ax != nd - 1:
        xs, keep, bs, os_ = (None if a is None else a.moveaxis(ax, -1) for a in (xs, keep, bs, os_))
    assert xs is not None
    b, h, q, n = canonical_dims(xs.shape)
    bounds = None if plan is None or plan.lo is None else bounds4(plan, b, h, q, n)

    key = (
        DEVICE_OP,
        shape,
        xs.dtype.char,
        ax,
        xs.strides[-1] == xs.dtype.itemsize,
        keep_where,
        None if bs is None else (bs.dtype.char, bs.on_device),
        bounds is not None,
        mask_key(strategy),
        inplace,
    )
    return DeviceCall(xs, keep, bs, os_, bounds, ax, s, cdt, strategy, key, shape)


def require_backend(what: str = "x", op: str = DEVICE_OP) -> None:
    if not _serving_backends(op):
        raise device_array_error(what)


def masked_softmax(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    axis: Any = -1,
    out: Any = None,
    backend: str | None = None,
) -> Any:
    """:func:`fastmask.masked_softmax` for a device array ``x``.

    Returns ``out`` when given, else a new device array allocated by the chosen
    backend (a Numba ``DeviceNDArray`` for the ``cuda`` plugin). Nothing is copied
    to the host; the backend may return before the kernels finish.
    """
    require_backend()
    call = prepare(x, mask, bias=bias, scale=scale, axis=axis, out=out)
    first = call.requests()[0]
    chosen = router.choose(first) if backend is None else router.forced(backend, first)
    if out is None:
        out = chosen.empty(call.shape, call.dtype, x)
        call = call.with_out(out)
    if call.x.size:
        for request in call.requests():
            router.run(chosen, request)
    return out


def _summary(call: DeviceCall, mask: Any, bias: Any, scale: Any, axis: Any) -> str:
    head = f"masked_softmax(x: {call.shape} {call.dtype} on device, axis={axis}"
    return ", ".join([head, *operand_notes(mask, bias, scale)]) + ")"


def operand_notes(mask: Any, bias: Any, scale: Any) -> list[str]:
    """How an explanation's summary describes ``mask``, ``bias`` and ``scale``."""
    parts = []
    if mask is not None:
        if isinstance(mask, MaskStrategy):
            parts.append(f"mask={mask!r}")
        else:
            parts.append(
                "mask=<bool device array>" if is_device_array(mask) else "mask=<bool array>"
            )
    if bias is not None:
        if is_device_array(bias):
            parts.append(f"bias={tuple(bias.__cuda_array_interface__['shape'])} (device)")
        else:
            parts.append(f"bias={np.shape(bias)} (host)")
    if scale is not None:
        parts.append(f"scale={scale}")
    return parts


def explain(
    x: Any,
    mask: Any = None,
    *,
    bias: Any = None,
    scale: Any = None,
    axis: Any = -1,
    out: Any = None,
    backend: str | None = None,
) -> router.Explanation:
    """:func:`fastmask.explain` for a device array ``x``; validates the same way, runs nothing."""
    require_backend()
    call = prepare(x, mask, bias=bias, scale=scale, axis=axis, out=out)
    return router.explain(call.requests()[0], _summary(call, mask, bias, scale, axis), backend)
