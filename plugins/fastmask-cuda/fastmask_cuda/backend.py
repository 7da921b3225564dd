"""The ``cuda`` backend: fastmask's masked softmax on an NVIDIA GPU, through numba.cuda.

Device arrays (``__cuda_array_interface__``) arrive as
:class:`fastmask.device.DeviceSoftmaxRequest` and stay on the device. Host arrays
arrive as the usual :class:`fastmask.request.SoftmaxRequest` only when the caller
forces ``backend="cuda"``: they are copied in, computed, and copied back.
"""

from __future__ import annotations

import functools

import numpy as np

from fastmask import Backend, Verdict
from fastmask.device import DEVICE_OP, Strided

from . import kernels, memory

__all__ = ["CudaBackend"]


@functools.cache
def _dummy(dtype: np.dtype):
    """A one-element device array standing in for an absent keep mask or bias."""
    return memory.to_device(np.zeros(1, dtype))


def _operands_ok(*operands: Strided | None) -> str:
    for st in operands:
        if st is not None and any(s % st.dtype.itemsize for s in st.strides):
            return f"strides {st.strides} are not multiples of the item size {st.dtype.itemsize}"
    return ""


class CudaBackend(Backend):
    name = "cuda"
    device = "cuda"
    ops = frozenset({"masked_softmax", DEVICE_OP})
    description = "numba.cuda kernels: one warp per short row, one block per long row"

    #: Cost model, microseconds: Python dispatch + launch, then memory traffic.
    LAUNCH_US = 15.0
    BYTES_PER_US = 2.0e6  # ~2 TB/s effective device bandwidth
    #: First use of a kernel variant in a process (JIT compile).
    COMPILE_US = 1_500_000.0
    #: Added to host-array calls so that routing never picks the GPU for them.
    HOST_PENALTY_US = 1e9
    PCIE_BYTES_PER_US = 1.0e4  # ~10 GB/s host <-> device

    def status(self) -> tuple[bool, str]:
        return memory.probe()

    def _traffic(self, request) -> float:
        item = request.dtype.itemsize
        return request.size * item * 3.0  # two reads of x (the second mostly from L2), one write

    def check(self, request) -> Verdict:
        from fastmask.masks.custom import runs_user_code

        if runs_user_code(request):
            return Verdict.no("custom predicates and score functions run in the numba backend")
        bad = _operands_ok(request.x4, request.out4, request.keep4, request.bias4)
        if bad:
            return Verdict.no(bad)
        if request.op != DEVICE_OP:
            copies = 2 * request.size * request.dtype.itemsize / self.PCIE_BYTES_PER_US
            return Verdict(
                True,
                "host arrays: copied to the GPU and back; never chosen automatically "
                "(force it with backend='cuda')",
                self.HOST_PENALTY_US + copies,
            )
        cost = self.LAUNCH_US + self._traffic(request) / self.BYTES_PER_US
        b, h, q, n = request.shape4
        cfg = self._config(b * h * q, n)
        per = "a warp per row" if cfg.kernel == "warp" else "a block per row"
        note = f"{per}, {cfg.blocks} block(s) of {cfg.threads} threads"
        variant = (request.dtype.char, request.keep4 is not None,
                   None if request.bias4 is None else request.bias4.dtype.char)  # fmt: skip
        if variant not in kernels.compiled_variants():
            return Verdict(True, note + ", JIT compile first", cost + self.COMPILE_US)
        return Verdict(True, note, cost)

    @staticmethod
    def _config(rows: int, n: int) -> kernels.LaunchConfig:
        return kernels.launch_config(
            rows, n, memory.sm_count(), kernels.WARP_MAX_N,
            kernels.BLOCK_THREADS_MIN, kernels.BLOCK_THREADS_MAX,
        )  # fmt: skip

    def empty(self, shape: tuple[int, ...], dtype: np.dtype, like=None):
        """A new device array for a result (``numba.cuda`` ``DeviceNDArray`` on a GPU).

        It is associated with the stream ``like``'s producer names, if any.
        """
        stream = None if like is None else like.__cuda_array_interface__.get("stream")
        return memory.empty(shape, dtype, stream)

    def masked_softmax_device(self, request) -> None:
        """Compute a :class:`fastmask.device.DeviceSoftmaxRequest` (asynchronous on a GPU)."""
        self._run(request.x4, request.out4, request.keep4, request.bias4, request.bounds4,
                  request.scale)  # fmt: skip

    def masked_softmax(self, request) -> None:
        """Host arrays (only when forced): copy in, compute, copy the result back."""
        x4 = request.x4
        xd = memory.to_device(np.ascontiguousarray(x4))
        od = memory.empty(x4.shape, x4.dtype)
        host = [None if a is None else Strided.of_host(a)
                for a in (request.keep4, request.bias4, request.bounds4)]  # fmt: skip
        self._run(Strided.of_device(xd, "x"), Strided.of_device(od, "out"), *host, request.scale)
        np.copyto(request.out4, memory.to_host(od))

    def _run(self, x4, out4, keep4, bias4, bounds4, scale: float) -> None:
        """Launch on the stream x's producer names (else the default stream); no sync."""
        b, h, q, n = x4.shape
        rows = b * h * q
        if rows == 0 or n == 0:
            return
        sp = x4.stream
        stream = memory.launch_stream(sp)
        xa, xo, xs = memory.flat(x4, sp)
        oa, oo, os_ = memory.flat(out4, sp)
        if keep4 is None:
            ka, ko, ks = _dummy(np.dtype(np.uint8)), 0, (0, 0, 0, 0)
        else:
            ka, ko, ks = memory.flat(keep4, sp)
        if bias4 is None:
            ba, bo, bs = _dummy(np.dtype(np.float32)), 0, (0, 0, 0, 0)
        else:
            ba, bo, bs = memory.flat(bias4, sp)
        if bounds4 is None:
            la, lo, ls = memory.to_device(np.array([0, n], np.int64), stream), 0, (0, 0, 0, 1)
        else:
            la, lo, ls = memory.flat(bounds4, sp)
        params = (b, h, q, n, xo, *xs, oo, *os_, ko, *ks, bo, *bs, lo, *ls)
        params = tuple(int(v) for v in params)
        warp_k, block_k = kernels.kernels(
            x4.dtype, keep4 is not None, None if bias4 is None else bias4.dtype
        )
        cfg = self._config(rows, n)
        kernel = warp_k if cfg.kernel == "warp" else block_k
        cdt = np.float64 if x4.dtype == np.float64 else np.float32
        kernel[cfg.blocks, cfg.threads, stream](xa, oa, ka, ba, la, params, cdt(scale))
        from fastmask import router

        if len(kernels.compiled_variants()) != self._seen_variants:
            self._seen_variants = len(kernels.compiled_variants())
            router.invalidate()  # a variant just compiled: its cost estimate dropped

    _seen_variants = 0
