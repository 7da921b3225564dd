"""Device code of the attention kernel (see :mod:`fastmask_cuda.flash` for the design).

Imported only when a variant is first compiled: it imports ``numba.cuda``.
``cuda`` must be a module global here: Numba's simulator swaps it for its own.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, types

from ._device_code import scalar_types
from .flash import (
    ACC_MAX,
    NPARAMS,
    P_BIAS,
    P_BK,
    P_BOUNDS,
    P_BQ,
    P_D,
    P_DV,
    P_GROUP,
    P_H,
    P_K,
    P_KEEP,
    P_LK,
    P_LQ,
    P_OUT,
    P_Q,
    P_TPR,
    P_V,
    P_W,
    P_WANT,
    tile_capacity,
)

__all__ = ["build", "kernel_function"]


def build(x_dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, dc: int):
    """The kernel of one variant, compiled (eagerly, for one signature)."""
    fn, sig = kernel_function(x_dtype, has_keep, bias_dtype, dc)
    return cuda.jit(sig)(fn)


def kernel_function(x_dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, dc: int):
    """The Python kernel function of one variant and its signature (not compiled).

    ``cuda.compile_ptx(f, sig, cc=...)`` turns it into PTX without a GPU.
    """
    ct, ot, bt, cnp = scalar_types(x_dtype, bias_dtype)  # ot: storage of q, k, v, out, weights
    neg_inf, pos_inf, nan = cnp(-np.inf), cnp(np.inf), cnp(np.nan)
    zero, one = cnp(0.0), cnp(1.0)
    has_bias = bias_dtype is not None
    i64 = types.int64
    bq_max, bk_max = tile_capacity(dc, np.dtype(cnp).itemsize)
    qp = dc + 1  # row stride of the q and k tiles (padded: no shared-memory bank conflicts)
    sp = bk_max + 1  # row stride of the score and probability tiles
    acc_n = ACC_MAX
    # Shared-memory sizes: compile-time constants (closure values, not expressions).
    q_len, k_len, v_len = bq_max * qp, bk_max * qp, bk_max * dc
    s_len, r_len = bq_max * sp, 2 * bq_max

    @cuda.jit(device=True)
    def is_kept(keep, ki):
        if has_keep:
            return keep[ki] != 0
        return True

    @cuda.jit(device=True)
    def score(qs, ks, r, jj, d, scale, bias, bi):
        """``q[r] . k[jj] * scale + bias`` from the shared tiles, in the compute dtype."""
        a = zero
        qo = r * qp
        ko = jj * qp
        for c in range(d):
            a += qs[qo + c] * ks[ko + c]
        z = a * scale
        if has_bias:
            z += ct(bias[bi])
        return z

    @cuda.jit(device=True)
    def load_tile(src, dst, off, s_row, s_col, row0, nrows, nvalid, ncols, width, tid, nthreads):
        """``dst[rr * width + c] = src[row0 + rr, c]`` (zero for rows ``>= nvalid``), block-wide."""
        total = nrows * ncols
        e = tid
        while e < total:
            rr = e // ncols
            c = e - rr * ncols
            val = zero
            if row0 + rr < nvalid:
                val = ct(src[off + (row0 + rr) * s_row + c * s_col])
            dst[rr * width + c] = val
            e += nthreads

    def flash(q, k, v, out, w, keep, bias, bounds, p, scale):
        qs = cuda.shared.array(q_len, ct)
        ks = cuda.shared.array(k_len, ct)
        vs = cuda.shared.array(v_len, ct)
        ss = cuda.shared.array(s_len, ct)
        ps = cuda.shared.array(s_len, ct)
        rb = cuda.shared.array(r_len, i64)
        acc = cuda.local.array(acc_n, ct)

        tid = i64(cuda.threadIdx.x)
        nthreads = i64(cuda.blockDim.x)
        lq = p[P_LQ]
        lk = p[P_LK]
        d = p[P_D]
        dv = p[P_DV]
        bq = p[P_BQ]
        bk = p[P_BK]
        tpr = p[P_TPR]
        qtiles = (lq + bq - 1) // bq
        blk = i64(cuda.blockIdx.x)
        qt = blk % qtiles
        bh = blk // qtiles
        h = bh % p[P_H]
        b = bh // p[P_H]
        hk = h // p[P_GROUP]
        r = tid // tpr  # this thread's row in the tile
        t = tid - r * tpr  # and its lane in the row
        i = qt * bq + r  # the query
        valid = i < lq

        q0 = p[P_Q] + b * p[P_Q + 1] + h * p[P_Q + 2]
        k0 = p[P_K] + b * p[P_K + 1] + hk * p[P_K + 2]
        v0 = p[P_V] + b * p[P_V + 1] + hk * p[P_V + 2]
        oo = p[P_OUT] + b * p[P_OUT + 1] + h * p[P_OUT + 2] + i * p[P_OUT + 3]
        wo = p[P_W] + b * p[P_W + 1] + h * p[P_W + 2] + i * p[P_W + 3]
        mo = p[P_KEEP] + b * p[P_KEEP + 1] + h * p[P_KEEP + 2] + i * p[P_KEEP + 3]
        bo = p[P_BIAS] + b * p[P_BIAS + 1] + h * p[P_BIAS + 2] + i * p[P_BIAS + 3]
        mk = p[P_KEEP + 4]
        bkk = p[P_BIAS + 4]

        # This row's kept keys [lo, hi); the block visits the union over its rows.
        lo = i64(0)
        hi = i64(0)
        if valid:
            li = p[P_BOUNDS] + b * p[P_BOUNDS + 1] + h * p[P_BOUNDS + 2] + i * p[P_BOUNDS + 3]
            lo = max(bounds[li], i64(0))
            hi = min(bounds[li + p[P_BOUNDS + 4]], lk)
        if t == 0:
            if lo < hi:
                rb[2 * r] = lo
                rb[2 * r + 1] = hi
            else:
                rb[2 * r] = lk
                rb[2 * r + 1] = 0
        load_tile(q, qs, q0, p[P_Q + 3], p[P_Q + 4], qt * bq, bq, lq, d, qp, tid, nthreads)
        cuda.syncthreads()
        blo = lk
        bhi = i64(0)
        for rr in range(bq):
            blo = min(blo, rb[2 * rr])
            bhi = max(bhi, rb[2 * rr + 1])

        m = neg_inf  # running maximum of the row's kept scores
        s = zero  # running sum of exp(score - m)
        bad = False  # a kept score is NaN or +inf: the row is NaN
        for u in range(acc_n):
            acc[u] = zero
        rs = r * sp
        kt = blo
        while kt < bhi:  # block-uniform: every thread runs the same iterations
            nt = min(bk, bhi - kt)
            load_tile(k, ks, k0, p[P_K + 3], p[P_K + 4], kt, nt, lk, d, qp, tid, nthreads)
            load_tile(v, vs, v0, p[P_V + 3], p[P_V + 4], kt, nt, lk, dv, dc, tid, nthreads)
            cuda.syncthreads()
            jj = t
            while jj < nt:
                key = kt + jj
                z = neg_inf
                if valid and key >= lo and key < hi:
                    if is_kept(keep, mo + key * mk):
                        z = score(qs, ks, r, jj, d, scale, bias, bo + key * bkk)
                ss[rs + jj] = z
                jj += tpr
            cuda.syncthreads()
            tmax = neg_inf
            for jj in range(nt):
                z = ss[rs + jj]
                if z > tmax:
                    tmax = z
                elif z != z:
                    bad = True
            if tmax == pos_inf:
                bad = True
            m_new = max(m, tmax)
            alpha = one
            if m_new > neg_inf:
                alpha = math.exp(m - m_new)
            jj = t
            while jj < nt:
                e = zero
                if m_new > neg_inf:
                    e = math.exp(ss[rs + jj] - m_new)
                ps[rs + jj] = e
                jj += tpr
            cuda.syncthreads()
            tsum = zero
            for jj in range(nt):
                tsum += ps[rs + jj]
            s = s * alpha + tsum
            c = t
            u = 0
            while c < dv:
                a = acc[u] * alpha
                for jj in range(nt):
                    a += ps[rs + jj] * vs[jj * dc + c]
                acc[u] = a
                c += tpr
                u += 1
            m = m_new
            cuda.syncthreads()  # the tiles are overwritten next
            kt += bk

        inv = zero
        if m > neg_inf and not bad:
            inv = one / s
        if valid:
            ok = p[P_OUT + 4]
            c = t
            u = 0
            while c < dv:
                val = acc[u] * inv  # zeros when nothing is kept
                if bad:
                    val = nan
                out[oo + c * ok] = ot(val)
                c += tpr
                u += 1

        if p[P_WANT] != 0:  # second pass: the weights exp(score - m) / s, every key written
            wk = p[P_W + 4]
            kt = 0
            while kt < lk:
                nt = min(bk, lk - kt)
                inside = kt < bhi and kt + nt > blo  # block-uniform
                if inside:
                    load_tile(k, ks, k0, p[P_K + 3], p[P_K + 4], kt, nt, lk, d, qp, tid, nthreads)
                    cuda.syncthreads()
                if valid:
                    jj = t
                    while jj < nt:
                        key = kt + jj
                        val = zero
                        if bad:
                            val = nan
                        elif inside and key >= lo and key < hi and m > neg_inf:
                            if is_kept(keep, mo + key * mk):
                                z = score(qs, ks, r, jj, d, scale, bias, bo + key * bkk)
                                val = math.exp(z - m) * inv
                        w[wo + key * wk] = ot(val)
                        jj += tpr
                if inside:
                    cuda.syncthreads()
                kt += bk

    sig = types.void(
        ot[::1],
        ot[::1],
        ot[::1],
        ot[::1],
        ot[::1],
        types.uint8[::1],
        bt[::1],
        types.int64[::1],
        types.UniTuple(types.int64, NPARAMS),
        ct,
    )
    return flash, sig
