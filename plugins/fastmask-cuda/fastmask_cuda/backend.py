"""The ``cuda`` backend: masked softmax and attention on an NVIDIA GPU, through numba.cuda.

Device arrays (``__cuda_array_interface__``) arrive as
:class:`fastmask.device.DeviceSoftmaxRequest` or
:class:`fastmask.device_attention.DeviceAttentionRequest` and stay on the device. Host
arrays arrive as the usual :class:`fastmask.request.SoftmaxRequest` or
:class:`fastmask.attention_request.AttentionRequest` only when the caller forces
``backend="cuda"``: they are copied in, computed, and copied back.
"""

from __future__ import annotations

import functools

import numpy as np

from fastmask import Backend, Verdict
from fastmask.device import DEVICE_ATTENTION_OP, DEVICE_OP, host_operand
from fastmask.strided import Strided

from . import flash, kernels, memory

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
    ops = frozenset({"masked_softmax", DEVICE_OP, "attention", DEVICE_ATTENTION_OP})
    description = (
        "numba.cuda kernels: softmax one warp per short row, one block per long row; "
        "attention in tiles with an online softmax"
    )

    #: Cost model, microseconds: Python dispatch + launch, then memory traffic.
    LAUNCH_US = 15.0
    BYTES_PER_US = 2.0e6  # ~2 TB/s effective device bandwidth
    #: First use of a kernel variant in a process (JIT compile).
    COMPILE_US = 1_500_000.0
    #: Added to host-array calls so that routing never picks the GPU for them.
    HOST_PENALTY_US = 1e9
    PCIE_BYTES_PER_US = 1.0e4  # ~10 GB/s host <-> device
    #: Attention: multiply-adds per microsecond (float32 FMA on shared-memory tiles,
    #: no tensor cores: a few TFLOP/s).
    FMA_PER_US = 2.0e6

    def status(self) -> tuple[bool, str]:
        return memory.probe()

    def _traffic(self, request) -> float:
        item = request.dtype.itemsize
        return request.size * item * 3.0  # two reads of x (the second mostly from L2), one write

    def check(self, request) -> Verdict:
        from fastmask.masks.custom import runs_user_code

        if runs_user_code(request):
            return Verdict.no("custom predicates and score functions run in the numba backend")
        if request.op in ("attention", DEVICE_ATTENTION_OP):
            return self._check_attention(request)
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

    def _check_attention(self, request) -> Verdict:
        b, h, lq, _ = request.scores_shape4
        d, dv = request.q4.shape[3], request.v4.shape[3]
        cfg = self._flash_config(lq, d, dv, request.compute_dtype.itemsize)
        if cfg is None:
            return Verdict.no(
                f"head dimensions D={d}, Dv={dv}: the attention kernel holds at most "
                f"{flash.D_CLASSES[-1]} (use masked_softmax between two matrix products)"
            )
        if request.op != DEVICE_ATTENTION_OP:
            n = request.q4.size + request.k4.size + request.v4.size + b * h * lq * dv
            if request.weights4 is not None:
                n += request.size
            copies = n * request.compute_dtype.itemsize / self.PCIE_BYTES_PER_US
            return Verdict(
                True,
                "host arrays: copied to the GPU and back; never chosen automatically "
                "(force it with backend='cuda')",
                self.HOST_PENALTY_US + copies,
            )
        bad = _operands_ok(request.q4, request.k4, request.v4, request.out4, request.weights4,
                           request.keep4, request.bias4)  # fmt: skip
        if bad:
            return Verdict.no(bad)
        fma = request.size * (d + dv) * (2 if request.return_weights else 1)
        cost = self.LAUNCH_US + fma / self.FMA_PER_US
        if request.return_weights:
            cost += request.size * request.dtype.itemsize / self.BYTES_PER_US
        note = (
            f"flash-style tiles of {cfg.bq} queries x {cfg.bk} keys, "
            f"{cfg.blocks(b, h, lq)} block(s) of {cfg.threads} threads, masked key tiles skipped"
        )
        bias = None if request.bias4 is None else request.bias4.dtype
        variant = flash.variant(request.dtype, request.keep4 is not None, bias, cfg.d_class)
        if variant not in flash.compiled_variants():
            return Verdict(True, note + ", JIT compile first", cost + self.COMPILE_US)
        return Verdict(True, note, cost)

    @staticmethod
    def _flash_config(lq: int, d: int, dv: int, itemsize: int) -> flash.FlashConfig | None:
        return flash.launch_config(lq, d, dv, itemsize, flash.THREADS_TARGET)

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

    def attention_device(self, request) -> None:
        """Compute a :class:`fastmask.device_attention.DeviceAttentionRequest`
        (asynchronous on a GPU)."""
        self._run_attention(
            request.q4, request.k4, request.v4, request.out4, request.weights4,
            request.keep4, request.bias4, request.bounds4, request.scale, request.group,
        )  # fmt: skip

    def attention(self, request) -> None:
        """Host arrays (only when forced): copy in, compute, copy the results back.

        ``request.q4``/``k4``/``v4`` are already in the compute dtype (float16 was
        converted on the host), so the kernel runs in it and the results are
        rounded to the output dtype on the way back.
        """
        cdt = request.compute_dtype
        ins = [None if a is None else host_operand(a)
               for a in (request.q4, request.k4, request.v4, request.keep4, request.bias4,
                         request.bounds4)]  # fmt: skip
        q4, k4, v4, keep4, bias4, bounds4 = ins
        od = memory.empty(request.out4.shape, cdt)
        wd = None if request.weights4 is None else memory.empty(request.weights4.shape, cdt)
        self._run_attention(
            q4, k4, v4, Strided.of_device(od, "out"),
            None if wd is None else Strided.of_device(wd, "weights"),
            keep4, bias4, bounds4, request.scale, request.group,
        )  # fmt: skip
        np.copyto(request.out4, memory.to_host(od), casting="unsafe")
        if wd is not None:
            np.copyto(request.weights4, memory.to_host(wd), casting="unsafe")

    def _run_attention(self, q4, k4, v4, out4, w4, keep4, bias4, bounds4, scale, group) -> None:
        """Launch the attention kernel on the stream q's producer names; no sync."""
        b, h, lq, d = q4.shape
        lk, dv = v4.shape[2], v4.shape[3]
        if b * h * lq == 0 or (dv == 0 and (w4 is None or lk == 0)):
            return
        cdt = np.dtype(np.float64) if q4.dtype == np.float64 else np.dtype(np.float32)
        cfg = self._flash_config(lq, d, dv, cdt.itemsize)
        if cfg is None:
            raise ValueError(f"head dimensions D={d}, Dv={dv} are too large for the kernel")
        sp = q4.stream
        stream = memory.launch_stream(sp)

        def flat(st, dtype):
            # Absent or empty operands (D, Dv or Lk of 0: never read or written) get a dummy.
            if st is None or st.size == 0:
                return _dummy(np.dtype(np.uint8) if dtype == np.bool_ else dtype), 0, (0,) * 4
            return memory.flat(st, sp)

        qa, qo, qs = flat(q4, q4.dtype)
        ka, ko, ks = flat(k4, q4.dtype)
        va, vo, vs = flat(v4, q4.dtype)
        oa, oo, os_ = flat(out4, q4.dtype)
        wa, wo, ws = flat(w4, q4.dtype)
        ma, mo, ms = flat(keep4, np.dtype(np.uint8))
        ba, bo, bs = flat(bias4, np.dtype(np.float32) if bias4 is None else bias4.dtype)
        if bounds4 is None:
            la, lo, ls = memory.to_device(np.array([0, lk], np.int64), stream), 0, (0, 0, 0, 1)
        else:
            la, lo, ls = memory.flat(bounds4, sp)
        params = (
            b, h, lq, lk, d, dv, group, cfg.bq, cfg.bk, cfg.tpr, int(w4 is not None),
            qo, *qs, ko, *ks, vo, *vs, oo, *os_, wo, *ws, mo, *ms, bo, *bs, lo, *ls,
        )  # fmt: skip
        params = tuple(int(p) for p in params)
        bias_dtype = None if bias4 is None else bias4.dtype
        kernel = flash.kernel(q4.dtype, keep4 is not None, bias_dtype, cfg.d_class)
        blocks = cfg.blocks(b, h, lq)
        kernel[blocks, cfg.threads, stream](qa, ka, va, oa, wa, ma, ba, la, params,
                                            cdt.type(scale))  # fmt: skip
        self._note_compiled()

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
        self._note_compiled()

    def _note_compiled(self) -> None:
        from fastmask import router

        seen = len(kernels.compiled_variants()) + len(flash.compiled_variants())
        if seen != self._seen_variants:
            self._seen_variants = seen
            router.invalidate()  # a variant just compiled: its cost estimate dropped

    _seen_variants = 0
