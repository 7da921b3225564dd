"""Device arrays: validating and routing ``masked_softmax`` and ``attention`` calls on GPU memory.

:func:`fastmask.masked_softmax` and :func:`fastmask.explain` come here when ``x``
exposes ``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch
CUDA tensors); :func:`fastmask.attention` and :func:`fastmask.explain_attention`
when ``q``, ``k`` or ``v`` does (through :mod:`fastmask.device_attention`). The
core never reads or writes device memory. It reads the arrays' interfaces
(pointer, shape, strides, dtype), applies the rules of host calls
(:mod:`fastmask.request`: dtypes, mask conventions, bias, scale, ``out``,
``axis``), and describes every operand as a :class:`Strided` brought to the
canonical ``(B, H, Q, N)`` layout: softmax axis last, zero strides on broadcast
axes, nothing expanded or copied.

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
from .masks.dense import DenseMask
from .request import (
    FLOAT_DTYPES,
    Rows4D,
    _bounds4,
    _check_float,
    _mask_key,
    as_array,
    check_scale,
    compute_dtype,
    device_array_error,
    mask_dtype_error,
    softmax_axis,
    structured_axis_error,
)

__all__ = [
    "DEVICE_ATTENTION_OP",
    "DEVICE_OP",
    "DeviceCall",
    "DeviceSoftmaxRequest",
    "Strided",
    "any_device_array",
    "bias_operand",
    "check_device_float",
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


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class Strided:
    """Where an operand's elements live: element ``(i0, i1, ...)`` at ``ptr + sum(i * strides)``.

    Attributes
    ----------
    ptr : int
        Address of element ``(0, ..., 0)`` (a device pointer when ``on_device``).
    shape, strides : tuple of int
        Strides in bytes; 0 on broadcast axes, negative on reversed ones.
    dtype : numpy.dtype
    owner : object
        The object owning the memory (kept alive while the request is).
    on_device : bool
        Device memory (reached through ``__cuda_array_interface__``) or host memory.
    stream : int or None
        The producer's stream from ``__cuda_array_interface__`` (device operands),
        for consumers that synchronise on it.
    readonly : bool
    """

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype
    owner: Any
    on_device: bool
    stream: int | None = None
    readonly: bool = False

    @classmethod
    def of_device(cls, obj: Any, what: str) -> Strided:
        """Describe a device array from its ``__cuda_array_interface__``."""
        try:
            iface = obj.__cuda_array_interface__
            shape = tuple(int(d) for d in iface["shape"])
            dtype = np.dtype(iface["typestr"])
            ptr, readonly = iface["data"]
            strides = iface.get("strides")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TypeError(f"{what}: unusable __cuda_array_interface__ ({exc})") from exc
        if iface.get("mask") is not None:
            raise TypeError(
                f"{what} is a masked device array (__cuda_array_interface__ 'mask'); "
                "pass the mask as mask= instead"
            )
        if strides is None:
            strides = _c_strides(shape, dtype.itemsize)
        strides = tuple(int(s) for s in strides)
        if len(strides) != len(shape):
            raise TypeError(f"{what}: __cuda_array_interface__ has {len(strides)} strides "
                            f"for {len(shape)} axes")  # fmt: skip
        return cls(int(ptr or 0), shape, strides, dtype, obj, True, iface.get("stream"),
                   bool(readonly))  # fmt: skip

    @classmethod
    def of_host(cls, a: np.ndarray) -> Strided:
        """Describe a host ndarray (or view)."""
        ptr = a.__array_interface__["data"][0]
        return cls(int(ptr), a.shape, a.strides, a.dtype, a, False, None, not a.flags.writeable)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def broadcast_to(self, shape: tuple[int, ...]) -> Strided:
        """View of ``shape`` (zero strides where broadcast); ValueError if it does not broadcast."""
        pad = len(shape) - self.ndim
        if pad < 0:
            raise ValueError(f"{self.ndim} dimensions, more than {len(shape)}")
        strides = []
        for i, d in enumerate(shape):
            if i < pad:
                strides.append(0)
                continue
            own = self.shape[i - pad]
            if own == d:
                strides.append(self.strides[i - pad] if d != 1 else 0)
            elif own == 1:
                strides.append(0)
            else:
                raise ValueError(f"shape {self.shape} does not broadcast to {shape}")
        return replace(self, shape=tuple(shape), strides=tuple(strides))

    def moveaxis(self, source: int, destination: int) -> Strided:
        order = [i for i in range(self.ndim) if i != source]
        order.insert(destination % self.ndim, source)
        return replace(
            self,
            shape=tuple(self.shape[i] for i in order),
            strides=tuple(self.strides[i] for i in order),
        )

    def index1(self, i: int) -> Strided:
        """``a[:, i]``."""
        return replace(
            self,
            ptr=self.ptr + i * self.strides[1],
            shape=self.shape[:1] + self.shape[2:],
            strides=self.strides[:1] + self.strides[2:],
        )

    def fold(self) -> Strided | None:
        """``(..., Q, N)`` -> ``(B, H, Q, N)``, or None if the middle axes do not merge."""
        nd = self.ndim
        if nd <= 4:
            pad = 4 - nd
            if nd == 3:  # (B, Q, N) -> (B, 1, Q, N)
                return replace(self, shape=(self.shape[0], 1, *self.shape[1:]),
                               strides=(self.strides[0], 0, *self.strides[1:]))  # fmt: skip
            return replace(self, shape=(1,) * pad + self.shape, strides=(0,) * pad + self.strides)
        mid = list(zip(self.shape[1:-2], self.strides[1:-2], strict=True))
        stride = None
        inner = 0
        for d, s in reversed(mid):
            if d == 1:
                continue
            if stride is None:
                inner, stride = s, s * d
            elif s == stride:
                stride = s * d
            else:
                return None
        h = 1
        for d, _ in mid:
            h *= d
        if stride is None or h == 0:
            inner = 0
        return replace(
            self,
            shape=(self.shape[0], h, self.shape[-2], self.shape[-1]),
            strides=(self.strides[0], inner, self.strides[-2], self.strides[-1]),
        )

    def extent(self) -> tuple[int, int]:
        """Byte range ``[lo, hi)`` touched, relative to ``ptr`` (``(0, 0)`` when empty)."""
        if any(d == 0 for d in self.shape):
            return 0, 0
        lo = sum(min(0, (d - 1) * s) for d, s in zip(self.shape, self.strides, strict=True))
        hi = sum(max(0, (d - 1) * s) for d, s in zip(self.shape, self.strides, strict=True))
        return lo, hi + self.dtype.itemsize


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


def check_device_float(s: Strided, what: str, hint: str) -> None:
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be float16, float32 or float64 on a device; got {s.dtype}. {hint}"
            + (" (bfloat16 runs on the host only, for now)" if "bfloat16" in str(s.dtype) else "")
        )


def _overlaps(a: Strided, b: Strided) -> bool:
    alo, ahi = a.extent()
    blo, bhi = b.extent()
    if ahi == alo or bhi == blo:
        return False
    return a.ptr + alo < b.ptr + bhi and b.ptr + blo < a.ptr + ahi


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
    mask: Any, shape: tuple[int, ...], target: str
) -> tuple[MaskStrategy | None, Strided | None, str | None]:
    """``(strategy, keep, keep_where)`` for ``mask=``: a boolean device array becomes
    ``keep`` broadcast to ``shape`` (``keep_where == "device"``); a host boolean array a
    :class:`DenseMask` strategy; ``target`` names ``shape`` in errors."""
    if mask is None or isinstance(mask, MaskStrategy):
        return mask, None, None
    if is_device_array(mask):
        ms = Strided.of_device(mask, "mask")
        if ms.dtype != np.bool_:
            raise mask_dtype_error(ms.dtype)
        try:
            keep = ms.broadcast_to(shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {ms.shape} does not broadcast to {target} {shape}"
            ) from None
        return None, keep, "device"
    m = as_array(mask, "mask")
    if m.dtype != np.bool_:
        raise mask_dtype_error(m.dtype)
    return DenseMask(m, "keep"), None, None


def bias_operand(bias: Any, shape: tuple[int, ...], cdt: np.dtype, target: str) -> Strided | None:
    """``bias=`` broadcast to ``shape``: a device array read in place (its own float
    dtype), or a host array in ``cdt``; ``target`` names ``shape`` in errors."""
    if bias is None:
        return None
    hint = "Pass an additive float mask (e.g. -inf or -1e9 at masked positions)."
    if is_device_array(bias):
        b0 = Strided.of_device(bias, "bias")
        check_device_float(b0, "bias", hint)
        if not b0.dtype.isnative:
            raise TypeError(f"bias is a non-native byte order device array ({b0.dtype})")
    else:
        ba = _check_float(as_array(bias, "bias"), "bias", hint)
        b0 = host_operand(ba.astype(cdt, copy=False))
    nd = len(shape)
    if b0.ndim > nd:
        raise ValueError(f"bias has {b0.ndim} dimensions, more than {target} {nd}")
    try:
        return b0.broadcast_to(shape)
    except ValueError:
        raise ValueError(
            f"bias of shape {b0.shape} does not broadcast to {target} shape {shape}"
        ) from None


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

    Same rules as :func:`fastmask.request.build_softmax_requests`; in addition
    ``out`` must be a device array. Reads no device memory.
    """
    xs = Strided.of_device(x, "x")
    check_device_float(xs, "x (the logits)", "Convert first, e.g. x.astype(float32).")
    if not xs.dtype.isnative:
        raise TypeError(f"x is a non-native byte order device array ({xs.dtype})")
    nd = xs.ndim
    ax = softmax_axis(axis, nd)
    s = check_scale(scale)
    shape = xs.shape

    strategy, keep, keep_where = mask_operand(mask, shape, "the logits' shape")
    if strategy is not None and strategy.structured and ax != nd - 1:
        raise structured_axis_error(strategy, axis)
    plan = strategy.plan(shape) if strategy is not None else None
    if plan is not None and plan.keep is not None:
        keep = host_operand(plan.keep).broadcast_to(shape)
        keep_where = "host"

    cdt = compute_dtype(xs.dtype)
    bs = bias_operand(bias, shape, cdt, "x's")

    os_: Strided | None = None
    inplace = False
    if out is not None:
        if not is_device_array(out):
            raise ValueError(
                "out must be a device array (exposing __cuda_array_interface__) when x is one; "
                f"got {type(out).__name__}"
            )
        os_ = Strided.of_device(out, "out")
        if os_.shape != shape:
            raise ValueError(f"out has shape {os_.shape}; it must match x's shape {shape}")
        if os_.dtype != xs.dtype:
            raise ValueError(f"out has dtype {os_.dtype}; it must match x's dtype {xs.dtype}")
        if os_.readonly:
            raise ValueError("out is read-only; pass a writable array (or x itself for in place)")
        if os_.ptr == xs.ptr and os_.strides == xs.strides:
            inplace = True
        elif _overlaps(os_, xs):
            raise ValueError(
                "out overlaps x without being x itself; pass out=x for in place, or a "
                "separate array"
            )

    if ax != nd - 1:
        xs, keep, bs, os_ = (None if a is None else a.moveaxis(ax, -1) for a in (xs, keep, bs, os_))
    assert xs is not None
    b, h, q, n = canonical_dims(xs.shape)
    bounds = None if plan is None or plan.lo is None else _bounds4(plan, b, h, q, n)

    key = (
        DEVICE_OP,
        shape,
        xs.dtype.char,
        ax,
        xs.strides[-1] == xs.dtype.itemsize,
        keep_where,
        None if bs is None else (bs.dtype.char, bs.on_device),
        bounds is not None,
        _mask_key(strategy),
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
