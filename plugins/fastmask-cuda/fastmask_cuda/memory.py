"""Device memory for the kernels: what runs where, and how arrays reach the kernels.

- :func:`probe` says whether a GPU (or Numba's CUDA simulator) is usable,
  without importing ``numba.cuda`` on machines that have no CUDA driver.
- :func:`flat` turns a :class:`fastmask.device.Strided` operand into what the
  kernels take: a 1-D device array over the memory the operand touches, plus
  the element offset of its element ``(0, 0, 0, 0)`` and its element strides.
  Device operands are wrapped without a copy (``numba.cuda.from_cuda_array_interface``,
  synchronising on the producer's stream when it names one); host operands
  (structured bounds, masks and biases given as NumPy arrays) are copied to the
  device at their own, un-broadcast size.
- :func:`empty` and :func:`to_device` make device arrays that expose
  ``__cuda_array_interface__``: ``numba.cuda`` ``DeviceNDArray`` on a GPU and, in
  the simulator (whose arrays lack the interface), :class:`SimDeviceArray`.

Importing this module imports nothing from Numba.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
from typing import Any

import numpy as np

__all__ = [
    "empty",
    "flat",
    "launch_stream",
    "probe",
    "simulated",
    "sm_count",
    "to_device",
    "to_host",
]


def _cuda():
    from numba import cuda

    return cuda


def simulated() -> bool:
    """True when ``numba.cuda`` is (or will be, once imported) Numba's CUDA simulator."""
    mod = sys.modules.get("numba.cuda")
    if mod is not None and hasattr(mod, "config"):
        return bool(mod.config.ENABLE_CUDASIM)
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _driver_present() -> bool:
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.cache
def probe() -> tuple[bool, str]:
    """``(usable, note)``: can the ``cuda`` backend run here, and on what."""
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed"
    if simulated():
        return True, "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct, very slow; for tests"
    if not _driver_present():
        return False, (
            "no CUDA driver (libcuda) on this machine, so no GPU; "
            "set NUMBA_ENABLE_CUDASIM=1 to run on Numba's CUDA simulator"
        )
    try:
        cuda = _cuda()
    except ImportError as exc:
        return False, f"numba.cuda cannot be imported ({exc}); install numba-cuda"
    try:
        if not cuda.is_available() or len(cuda.gpus) == 0:
            return False, "numba.cuda found no usable GPU (numba.cuda.detect() says why)"
        dev = cuda.gpus[0]  # the driver's view: no context is created here
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return True, f"{name}, compute capability {dev.compute_capability}"
    except Exception as exc:  # a broken driver must not take routing down
        return False, f"numba.cuda failed to initialise: {type(exc).__name__}: {exc}"


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of the current device (1 in the simulator)."""
    if simulated():
        return 1
    return int(_cuda().get_current_device().MULTIPROCESSOR_COUNT)


class _HostInterface:
    """An ``__array_interface__`` over raw host memory (kept alive through ``owner``)."""

    def __init__(self, ptr: int, count: int, dtype: np.dtype, owner: Any) -> None:
        self.__array_interface__ = {
            "shape": (count,),
            "typestr": dtype.str,
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }
        self.owner = owner


def _host_view(ptr: int, count: int, dtype: np.dtype, owner: Any) -> np.ndarray:
    return np.asarray(_HostInterface(ptr, count, dtype, owner))


@functools.cache
def _sim_array_type() -> type:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    class SimDeviceArray(FakeCUDAArray):
        """A simulator device array that exposes ``__cuda_array_interface__``.

        The simulator's own arrays do not; its "device" pointers are host pointers.
        """

        @property
        def __cuda_array_interface__(self) -> dict:
            ai = self._ary.__array_interface__
            return {
                "shape": ai["shape"],
                "strides": ai["strides"],
                "typestr": ai["typestr"],
                "data": ai["data"],
                "version": 3,
                "stream": None,
            }

    return SimDeviceArray


def _sim_wrap(a: np.ndarray) -> Any:
    return _sim_array_type()(a)


def launch_stream(stream_ptr: int | None) -> Any:
    """The Numba stream for a ``__cuda_array_interface__`` stream value (None: default stream)."""
    if stream_ptr is None or simulated():
        return 0
    return _external_stream(int(stream_ptr))


@functools.lru_cache(maxsize=64)
def _external_stream(ptr: int) -> Any:
    return _cuda().external_stream(ptr)


def empty(shape: tuple[int, ...], dtype: Any, stream_ptr: int | None = None) -> Any:
    """A new C-contiguous device array (exposing ``__cuda_array_interface__``).

    ``stream_ptr``: the stream it is associated with (its interface then names it).
    """
    if simulated():
        return _sim_wrap(np.empty(shape, dtype))
    return _cuda().device_array(shape, dtype, stream=launch_stream(stream_ptr))


def to_device(a: Any, stream: Any = 0) -> Any:
    """Copy a host array to a new device array (exposing ``__cuda_array_interface__``)."""
    a = np.asarray(a)
    if simulated():
        return _sim_wrap(np.array(a, copy=True))
    return _cuda().to_device(np.ascontiguousarray(a), stream=stream)


def to_host(a: Any) -> np.ndarray:
    """Copy a device array (anything exposing ``__cuda_array_interface__``) to a host ndarray."""
    if simulated():
        iface = a.__cuda_array_interface__
        view = np.asarray(_ViewInterface(iface, a))
        return np.array(view, copy=True)
    return _cuda().as_cuda_array(a).copy_to_host()


class _ViewInterface:
    def __init__(self, iface: dict, owner: Any) -> None:
        self.__array_interface__ = {
            "shape": tuple(iface["shape"]),
            "typestr": iface["typestr"],
            "data": (iface["data"][0], False),
            "strides": iface.get("strides"),
            "version": 3,
        }
        self.owner = owner


def flat(st: Any, stream_ptr: int | None = None) -> tuple[Any, int, tuple[int, ...]]:
    """``(array, offset, strides)``: a 1-D device array over the memory ``st`` touches.

    ``array[offset + sum(i * strides)]`` is element ``i`` of ``st`` (strides in
    elements). Booleans travel as ``uint8``. Device memory is wrapped without a
    copy; host memory is copied on the launch stream ``stream_ptr``. A device
    operand whose producer names another stream is synchronised with it first.
    """
    itemsize = st.dtype.itemsize
    if any(s % itemsize for s in st.strides):
        raise ValueError(f"strides {st.strides} are not multiples of the item size {itemsize}")
    lo, hi = st.extent()
    count = max((hi - lo) // itemsize, 1)
    offset = -lo // itemsize
    strides = tuple(s // itemsize for s in st.strides)
    dtype = np.dtype(np.uint8) if st.dtype == np.bool_ else st.dtype
    base = st.ptr + lo
    if simulated():
        host = _host_view(base, count, dtype, st.owner)
        return _sim_wrap(host if st.on_device else np.array(host, copy=True)), offset, strides
    if st.on_device:
        other = st.stream if st.stream is not None and st.stream != stream_ptr else None
        desc = {
            "shape": (count,),
            "strides": None,
            "typestr": dtype.str,
            "data": (base, False),
            "version": 3,
            "stream": other,
        }
        arr = _cuda().from_cuda_array_interface(desc, owner=st.owner, sync=True)
    else:
        host = _host_view(base, count, dtype, st.owner)
        arr = to_device(host, stream=launch_stream(stream_ptr))
    return arr, offset, strides
