"""Device code of the kernels (see :mod:`fastmask_cuda.kernels` for the design).

Imported only when a kernel variant is first compiled: it imports ``numba.cuda``.
``cuda`` must be a module global here: Numba's simulator swaps it for its own.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from .kernels import (
    BLOCK_THREADS_MAX,
    FULL_MASK,
    NPARAMS,
    P_B,
    P_BIAS,
    P_BOUNDS,
    P_H,
    P_KEEP,
    P_N,
    P_OUT,
    P_Q,
    P_X,
    WARP,
)

__all__ = ["build", "kernel_functions", "scalar_types"]

_NUMBA = {
    np.dtype(np.float16): types.float16,
    np.dtype(np.float32): types.float32,
    np.dtype(np.float64): types.float64,
}


def scalar_types(x_dtype: np.dtype, bias_dtype: np.dtype | None):
    """``(compute, storage, bias, NumPy compute scalar)`` types of a variant.

    Compute in float64 for float64 data, else float32; an absent bias is typed float32.
    """
    wide = x_dtype == np.float64
    ct = types.float64 if wide else types.float32
    bt = types.float32 if bias_dtype is None else _NUMBA[bias_dtype]
    return ct, _NUMBA[x_dtype], bt, (np.float64 if wide else np.float32)


def build(x_dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, sim: bool):
    """``(warp_rows, block_rows)`` of one variant, compiled (eagerly, for one signature)."""
    warp_rows, block_rows, sig = kernel_functions(x_dtype, has_keep, bias_dtype, sim)
    return cuda.jit(sig)(warp_rows), cuda.jit(sig)(block_rows)


def kernel_functions(x_dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, sim: bool):
    """The Python kernel functions of one variant and their signature (not compiled).

    ``cuda.compile_ptx(f, sig, cc=...)`` turns them into PTX without a GPU.
    """
    ct, ot, bt, cnp = scalar_types(x_dtype, bias_dtype)  # ot: storage type of x and out
    neg_inf, pos_inf, nan = cnp(-np.inf), cnp(np.inf), cnp(np.nan)
    zero, one = cnp(0.0), cnp(1.0)
    has_bias = bias_dtype is not None
    i64 = types.int64
    xch = BLOCK_THREADS_MAX if sim else 1  # exchange scratch (simulator only)
    full = FULL_MASK

    @cuda.jit(device=True)
    def load_z(x, bias, xi, bi, scale):
        z = ct(x[xi]) * scale
        if has_bias:
            z += ct(bias[bi])
        return z

    @cuda.jit(device=True)
    def is_kept(keep, ki):
        if has_keep:
            return keep[ki] != 0
        return True

    @cuda.jit(device=True)
    def update(m, s, z):
        # Online max/sum; NaN and +inf poison s (the row becomes NaN).
        if z > m:
            if z == pos_inf:
                s = nan
            else:
                s = s * math.exp(m - z) + one
                m = z
        elif z > neg_inf:
            s += math.exp(z - m)
        elif z != z:
            s = nan
        return m, s

    @cuda.jit(device=True)
    def merge(m1, s1, m2, s2):
        m = max(m1, m2)
        if m == neg_inf:
            return m, s1 + s2
        return m, s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m)

    if sim:

        @cuda.jit(device=True)
        def exchange(m, s, xm, xs, tid, lane_mask):
            xm[tid] = m
            xs[tid] = s
            cuda.syncthreads()
            j = tid ^ lane_mask
            m2 = xm[j]
            s2 = xs[j]
            cuda.syncthreads()
            return m2, s2

    else:

        @cuda.jit(device=True)
        def exchange(m, s, xm, xs, tid, lane_mask):
            return (
                cuda.shfl_xor_sync(full, m, lane_mask),
                cuda.shfl_xor_sync(full, s, lane_mask),
            )

    @cuda.jit(device=True)
    def warp_merge(m, s, xm, xs, tid):
        lane_mask = WARP // 2
        while lane_mask > 0:
            m2, s2 = exchange(m, s, xm, xs, tid, lane_mask)
            m, s = merge(m, s, m2, s2)
            lane_mask //= 2
        return m, s

    @cuda.jit(device=True)
    def row_setup(r, p, bounds):
        q = r % p[P_Q]
        t = r // p[P_Q]
        h = t % p[P_H]
        b = t // p[P_H]
        xo = p[P_X] + b * p[P_X + 1] + h * p[P_X + 2] + q * p[P_X + 3]
        oo = p[P_OUT] + b * p[P_OUT + 1] + h * p[P_OUT + 2] + q * p[P_OUT + 3]
        ko = p[P_KEEP] + b * p[P_KEEP + 1] + h * p[P_KEEP + 2] + q * p[P_KEEP + 3]
        bo = p[P_BIAS] + b * p[P_BIAS + 1] + h * p[P_BIAS + 2] + q * p[P_BIAS + 3]
        li = p[P_BOUNDS] + b * p[P_BOUNDS + 1] + h * p[P_BOUNDS + 2] + q * p[P_BOUNDS + 3]
        return xo, oo, ko, bo, bounds[li], bounds[li + p[P_BOUNDS + 4]]

    @cuda.jit(device=True)
    def row_stats(x, keep, bias, p, xo, ko, bo, lo, hi, start, step, scale):
        m = neg_inf
        s = zero
        xk = p[P_X + 4]
        kk = p[P_KEEP + 4]
        bk = p[P_BIAS + 4]
        k = lo + start
        while k < hi:
            if is_kept(keep, ko + k * kk):
                m, s = update(m, s, load_z(x, bias, xo + k * xk, bo + k * bk, scale))
            k += step
        return m, s

    @cuda.jit(device=True)
    def write_row(out, x, keep, bias, p, xo, oo, ko, bo, lo, hi, start, step, m, s, scale):
        n = p[P_N]
        xk = p[P_X + 4]
        ok = p[P_OUT + 4]
        kk = p[P_KEEP + 4]
        bk = p[P_BIAS + 4]
        if s == s and m > neg_inf:
            inv = one / s
            k = start
            while k < n:
                v = zero
                if k >= lo and k < hi:
                    if is_kept(keep, ko + k * kk):
                        v = math.exp(load_z(x, bias, xo + k * xk, bo + k * bk, scale) - m) * inv
                out[oo + k * ok] = ot(v)
                k += step
        else:
            fill = nan if s != s else zero  # NaN row, or nothing kept
            k = start
            while k < n:
                out[oo + k * ok] = ot(fill)
                k += step

    def warp_rows(x, out, keep, bias, bounds, p, scale):
        xm = cuda.shared.array(xch, ct)
        xs = cuda.shared.array(xch, ct)
        tid = cuda.threadIdx.x
        lane = i64(tid % WARP)
        wpb = i64(cuda.blockDim.x // WARP)
        rows = p[P_B] * p[P_H] * p[P_Q]
        base = i64(cuda.blockIdx.x) * wpb
        step = i64(cuda.gridDim.x) * wpb
        r = base + i64(tid // WARP)
        while base < rows:  # the same trip count for every thread of the block
            valid = r < rows
            xo, oo, ko, bo, lo, hi = row_setup(r if valid else rows - 1, p, bounds)
            if not valid:
                hi = lo
            m, s = row_stats(x, keep, bias, p, xo, ko, bo, lo, hi, lane, WARP, scale)
            m, s = warp_merge(m, s, xm, xs, tid)
            if valid:
                write_row(out, x, keep, bias, p, xo, oo, ko, bo, lo, hi, lane, WARP, m, s, scale)
            base += step
            r += step

    def block_rows(x, out, keep, bias, bounds, p, scale):
        xm = cuda.shared.array(xch, ct)
        xs = cuda.shared.array(xch, ct)
        pm = cuda.shared.array(WARP, ct)
        ps = cuda.shared.array(WARP, ct)
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        nthreads = i64(cuda.blockDim.x)
        nwarps = cuda.blockDim.x // WARP
        rows = p[P_B] * p[P_H] * p[P_Q]
        r = i64(cuda.blockIdx.x)
        while r < rows:  # uniform across the block
            xo, oo, ko, bo, lo, hi = row_setup(r, p, bounds)
            m, s = row_stats(x, keep, bias, p, xo, ko, bo, lo, hi, i64(tid), nthreads, scale)
            m, s = warp_merge(m, s, xm, xs, tid)
            if lane == 0:
                pm[warp] = m
                ps[warp] = s
            cuda.syncthreads()
            if lane < nwarps:
                m = pm[lane]
                s = ps[lane]
            else:
                m = neg_inf
                s = zero
            m, s = warp_merge(m, s, xm, xs, tid)
            write_row(out, x, keep, bias, p, xo, oo, ko, bo, lo, hi, i64(tid), nthreads, m, s,
                      scale)  # fmt: skip
            cuda.syncthreads()  # pm/ps are rewritten for the next row
            r += i64(cuda.gridDim.x)

    sig = types.void(
        ot[::1],
        ot[::1],
        types.uint8[::1],
        bt[::1],
        types.int64[::1],
        types.UniTuple(types.int64, NPARAMS),
        ct,
    )
    return warp_rows, block_rows, sig
