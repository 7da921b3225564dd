"""Where an operand's elements live: a strided description of host or device memory.

:class:`Strided` is what every call path knows of an array's memory without reading
it: the address of its first element, its shape and byte strides, its dtype. Device
calls (:mod:`fastmask.device`) lay out their operands with it; the rules of
:mod:`fastmask.rules` test it for aliasing; backends (the CUDA plugin) read it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = ["Strided", "c_strides", "fold4", "overlaps_itself"]


def fold4(
    shape: tuple[int, ...], strides: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(..., Q, N)`` as ``(B, H, Q, N)``: the shape and strides that view the same
    elements, the axes between the first and ``Q`` merged into ``H`` (a missing ``B``
    or ``H`` has stride 0); None when those axes do not merge into one stride."""
    nd = len(shape)
    if nd <= 4:
        if nd == 3:  # (B, Q, N) -> (B, 1, Q, N)
            return (shape[0], 1, *shape[1:]), (strides[0], 0, *strides[1:])
        pad = 4 - nd
        return (1,) * pad + tuple(shape), (0,) * pad + tuple(strides)
    stride = None
    inner = 0
    for d, s in zip(reversed(shape[1:-2]), reversed(strides[1:-2]), strict=True):
        if d == 1:
            continue
        if stride is None:
            inner, stride = s, s * d
        elif s == stride:
            stride = s * d
        else:
            return None
    h = 1
    for d in shape[1:-2]:
        h *= d
    if stride is None or h == 0:
        inner = 0
    return (shape[0], h, shape[-2], shape[-1]), (strides[0], inner, strides[-2], strides[-1])


def c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """The byte strides of a C-contiguous array of ``shape``."""
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
            strides = c_strides(shape, dtype.itemsize)
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
        folded = fold4(self.shape, self.strides)
        if folded is None:
            return None
        return replace(self, shape=folded[0], strides=folded[1])

    def extent(self) -> tuple[int, int]:
        """Byte range ``[lo, hi)`` touched, relative to ``ptr`` (``(0, 0)`` when empty)."""
        if any(d == 0 for d in self.shape):
            return 0, 0
        lo = sum(min(0, (d - 1) * s) for d, s in zip(self.shape, self.strides, strict=True))
        hi = sum(max(0, (d - 1) * s) for d, s in zip(self.shape, self.strides, strict=True))
        return lo, hi + self.dtype.itemsize

    def overlaps(self, other: Strided) -> bool:
        """Whether the byte ranges the two operands span intersect (same address space)."""
        alo, ahi = self.extent()
        blo, bhi = other.extent()
        if ahi == alo or bhi == blo:
            return False
        return self.ptr + alo < other.ptr + bhi and other.ptr + blo < self.ptr + ahi

    def overlaps_itself(self) -> bool:
        """Whether two of its elements may share memory (see :func:`overlaps_itself`)."""
        return overlaps_itself(self.shape, self.strides, self.dtype.itemsize)


def overlaps_itself(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> bool:
    """Whether two elements of a strided array may share memory: each axis' stride must step
    over everything the smaller-strided axes span (sufficient; the layouts NumPy makes pass)."""
    dims = sorted((abs(st), n) for st, n in zip(strides, shape, strict=True) if n > 1)
    span = itemsize
    for stride, n in dims:
        if stride < span:
            return True
        span = stride * n
    return False
