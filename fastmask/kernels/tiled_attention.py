"""The tiled attention driver shared by the compiled backends.

``run(request, softmax)`` computes ``softmax(q @ k^T * scale + bias, masked) @ v``
tile by tile. A *tile* is a block of heads ``[h0, h1)`` and of queries
``[i0, i1)`` of one batch entry, and it covers only the keys ``[k0, k1)`` that
some row of the tile may keep: the union of the rows' kept intervals
(``request.bounds4``, from the mask strategy and from the first/last kept key of
a dense mask). Per tile:

1. ``S = q[b, h0:h1, i0:i1] @ k[b, kv heads, k0:k1]^T`` with :func:`numpy.matmul`
   (BLAS; the heads of a tile are one batched call) into a reused tile buffer;
2. ``softmax(S)`` in place by the backend's compiled kernel (the contract
   ``masked_softmax_4d(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads)``),
   reading the keep mask and the bias of the tile through their strides, and the
   rows' own intervals (shifted by ``k0``) unless every row of the tile keeps
   exactly ``[k0, k1)``;
3. ``out[b, h0:h1, i0:i1] = S @ v[b, kv heads, k0:k1]`` (BLAS, straight into the
   output unless it is float16).

Tiles whose rows keep nothing are skipped (the output is zero-filled), so a
causal mask computes about half the products, a padding mask stops at each
sequence's length, and a sliding window computes its band. Extra memory is one
tile buffer of at most :data:`TILE_BYTES` (more only when a single row of
scores is larger), never ``Lq x Lk``.

Grouped-query attention: a tile's heads are whole groups (or a divisor of one
group), so the kv heads of a tile are a contiguous range and ``q`` is viewed as
``(kv heads, group, queries, D)`` against ``k`` viewed as ``(kv heads, 1, keys, D)``:
NumPy broadcasts, nothing is repeated in memory.

Threads: the products run on NumPy's BLAS threads (``OPENBLAS_NUM_THREADS`` and
the like; by default one per CPU) and take most of the time. Each tile's softmax
runs on the calling thread unless a backend asks for ``parallel_softmax``: with
OpenMP kernels, handing every tile from BLAS's thread pool to OpenMP's and back
makes the two pools' idle-spinning threads fight for the cores (measured: 10x
slower on 2 cores), while the serial softmax costs about 15% of the call. A
tile's scores (:data:`TILE_BYTES`) stay in the L2/L3 cache between the three steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backends.base import Verdict
from ..threads import available_cpus, threads_for

__all__ = ["QUERY_BLOCK", "TILE_BYTES", "TilePlan", "estimate", "plan_tiles", "run"]

#: Budget of one tile of scores, in bytes of the compute dtype (tuned on a 2-core
#: AMD EPYC with 1 MiB L2 per core and a 32 MiB L3: 1-8 MiB are within a few
#: percent; smaller tiles pay more Python and BLAS overhead per tile).
TILE_BYTES = 4 << 20
#: Queries per tile when the rows' key ranges vary along the queries (causal,
#: windows): small enough that a block's union wastes little on its diagonal,
#: large enough for efficient products. Where every query of a head keeps the
#: same keys (padding, no mask) a tile takes as many queries as the budget allows.
QUERY_BLOCK = 128

SoftmaxKernel = Callable[..., None]


@dataclass(frozen=True)
class TilePlan:
    """Which tiles to compute, and over which keys.

    Attributes
    ----------
    tq, hb : int
        Queries and heads per tile.
    lo, hi : ndarray of int64, shape (B, heads blocks, query blocks)
        The keys ``[lo, hi)`` each tile computes; ``lo >= hi`` means skipped.
    exact : ndarray of bool, same shape
        Every row of the tile keeps exactly ``[lo, hi)`` (no per-row bounds needed).
    heads, queries : ndarray of int64
        Heads in each head block, queries in each query block (the last may be short).
    """

    tq: int
    hb: int
    lo: np.ndarray
    hi: np.ndarray
    exact: np.ndarray
    heads: np.ndarray
    queries: np.ndarray

    @property
    def computed(self) -> int:
        """Score elements computed over all tiles (the work that is not skipped)."""
        rows = self.heads[:, None] * self.queries[None, :]
        return int((np.maximum(self.hi - self.lo, 0) * rows).sum())

    @property
    def tiles(self) -> int:
        """Tiles computed (not skipped)."""
        return int((self.hi > self.lo).sum())


def _group_aligned(hb: int, h: int, group: int) -> int:
    """Heads per tile: a multiple of the group, or a divisor of it."""
    hb = max(1, min(hb, h))
    if group <= 1:
        return hb
    if hb >= group:
        return (hb // group) * group
    while group % hb:
        hb -= 1
    return hb


def plan_tiles(request, tile_bytes: int | None = None, query_block: int | None = None) -> TilePlan:
    """Choose the tile shape and each tile's key range for ``request``."""
    budget = TILE_BYTES if tile_bytes is None else tile_bytes
    qblock = QUERY_BLOCK if query_block is None else query_block
    b, h, lq, _ = request.q4.shape
    lk = request.k4.shape[2]
    elems = max(1, budget // request.compute_dtype.itemsize)
    bounds = request.bounds4
    if bounds is None:
        width, uniform = lk, True
    else:
        width = int(np.max(bounds[..., 1] - bounds[..., 0], initial=0))
        # Same keys for every query of a head (padding): no stagger to waste on.
        uniform = lq <= 1 or bounds.strides[2] == 0 or bool((bounds == bounds[:, :, :1]).all())
    if uniform:
        est = max(1, min(lk, width))
        tq = max(1, min(lq, max(qblock, elems // est)))
    else:
        tq = max(1, min(lq, qblock))
        est = max(1, min(lk, width + tq - 1))  # a block's union: a row's width plus the stagger
    if tq * est > elems:
        tq = max(1, elems // est)
    hb = _group_aligned(elems // (tq * est), h, request.group)

    q_starts = np.arange(0, lq, tq)
    h_starts = np.arange(0, h, hb)
    shape = (b, len(h_starts), len(q_starts))
    if bounds is None:
        lo = np.zeros(shape, np.int64)
        hi = np.full(shape, lk, np.int64)
        exact = np.ones(shape, bool)
    elif lq == 0 or h == 0:
        lo = hi = np.zeros(shape, np.int64)
        exact = np.zeros(shape, bool)
    else:
        lo3, hi3 = bounds[..., 0], bounds[..., 1]
        empty = lo3 >= hi3
        lo_e = np.where(empty, lk, lo3)
        hi_e = np.where(empty, 0, hi3)

        def reduce(ufunc, a):
            return ufunc.reduceat(ufunc.reduceat(a, q_starts, axis=2), h_starts, axis=1)

        lo = reduce(np.minimum, lo_e)
        hi = reduce(np.maximum, hi_e)
        exact = (reduce(np.maximum, lo3) == lo) & (reduce(np.minimum, hi3) == hi) & (lo < hi)
    heads = np.minimum(h_starts + hb, h) - h_starts
    queries = np.minimum(q_starts + tq, lq) - q_starts
    return TilePlan(tq, hb, lo, hi, exact, heads, queries)


#: Cost model of the products and the per-tile Python overhead, microseconds.
PER_FLOP_US = 1e-5  # BLAS sgemm: about 100 GFLOP/s per core
PER_TILE_US = 15.0
#: Memory bandwidth, bytes per microsecond, for calls that read more K/V than they
#: compute on (decode): ~20 GB/s for the 2 cores of the machines we measure on.
BYTES_PER_US = 2.0e4


def estimate(
    request, overhead_us: float, per_element_us: float, parallel_softmax: bool = False
) -> Verdict:
    """A tiled backend's verdict on an attention ``request``: the cost of what is computed.

    Only the tiles that the mask does not skip count: their products (through
    BLAS), their softmax (at the backend's ``per_element_us`` per element and
    thread) and a fixed overhead per tile.
    """
    plan = plan_tiles(request)
    computed = plan.computed
    n = 1
    if parallel_softmax:
        width = int(np.max(plan.hi - plan.lo, initial=0))
        n = threads_for(plan.hb * plan.tq * width, plan.hb * plan.tq)
    flops = 2 * computed * (request.q4.shape[3] + request.v4.shape[3])
    # Each tile reads its keys' K and V rows once per kv head it covers; the products
    # (matrix-vector in decode) and the Python between tiles do not hide that traffic.
    kv_heads = plan.heads // np.minimum(request.group, plan.heads)
    kv_rows = int((np.maximum(plan.hi - plan.lo, 0) * kv_heads[None, :, None]).sum())
    kv_bytes = kv_rows * (request.k4.shape[3] + request.v4.shape[3]) * request.k4.itemsize
    products = PER_FLOP_US * flops / available_cpus()  # NumPy's BLAS threads: one per CPU
    cost = (
        overhead_us
        + PER_TILE_US * plan.tiles
        + per_element_us * computed / n
        + products
        + kv_bytes / BYTES_PER_US
    )
    total = request.size
    share = f"{100.0 * computed / total:.0f}%" if total else "0%"
    return Verdict(
        True,
        f"tiled: {share} of the scores in {plan.tiles} tile(s) of {plan.hb}x{plan.tq} rows, "
        f"softmax on {n} thread(s)",
        cost,
    )


def _split_heads(a: np.ndarray, nkv: int, g: int) -> np.ndarray:
    """View ``(nkv * g, ...)`` as ``(nkv, g, ...)`` (never a copy: writes must land in ``a``)."""
    if g == 1:
        return a[:, None]
    if nkv == 1:
        return a[None]
    s0 = a.strides[0]
    return np.lib.stride_tricks.as_strided(
        a, (nkv, g, *a.shape[1:]), (s0 * g, s0, *a.strides[1:]), writeable=a.flags.writeable
    )


def _plain(softmax: SoftmaxKernel) -> SoftmaxKernel:
    """``softmax`` called on a tile at ``(b, i0, k0)``; a plain kernel needs no origin."""

    def call(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, b, i0, k0):
        softmax(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads)

    return call


def _with_user_functions(softmax: SoftmaxKernel, request) -> SoftmaxKernel:
    """``softmax`` on a tile at ``(b, i0, k0)`` running the request's user functions,
    which see the indices of the whole call's scores.

    3-D scores (``swap_bh``): the functions see ``b`` = the head and ``h`` = the
    request's ``h0``, as ``masked_softmax`` indexes ``(X, Lq, Lk)``; the tile is passed
    as ``(heads, 1, queries, keys)`` views, so the kernel's batch axis is the head.
    """
    fns = {"predicate": request.predicate, "score": request.score}
    h_req = request.h0

    def swap(a):
        return None if a is None else a.swapaxes(0, 1)

    def call(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, b, i0, k0):
        if request.swap_bh:
            x4, out4, keep4, bias4, bounds4 = map(swap, (x4, out4, keep4, bias4, bounds4))
            b, h0 = h0 - h_req, h_req
        softmax(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, **fns, origin=(b, i0, k0))

    return call


def run(
    request,
    softmax: SoftmaxKernel,
    *,
    parallel_softmax: bool = False,
    tile_bytes: int | None = None,
    query_block: int | None = None,
) -> None:
    """Compute ``request`` (an :class:`~fastmask.attention_request.AttentionRequest`) in tiles.

    Parameters
    ----------
    request : AttentionRequest
        ``out4`` (and ``weights4``) must be zero-filled: skipped tiles are not written.
    softmax : callable
        ``softmax(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads)``, the
        masked-softmax kernel contract of the compiled backends. A request with a
        user predicate or score function also passes ``predicate``, ``score`` and
        ``origin=(b0, q0, k0)``, the tile's place in the scores, to a kernel that runs
        them (``fastmask.kernels.numba_softmax.masked_softmax_4d``).
    parallel_softmax : bool
        Let the kernel use several threads on a tile (``fastmask.set_num_threads``);
        by default each tile's softmax runs on the calling thread (see the module
        notes on threads).
    tile_bytes, query_block : int, optional
        Override :data:`TILE_BYTES` and :data:`QUERY_BLOCK` (tests, tuning).
    """
    q4, k4, v4, out4, w4 = request.q4, request.k4, request.v4, request.out4, request.weights4
    keep4, bias4, bounds4 = request.keep4, request.bias4, request.bounds4
    b_n, h_n, lq, _ = q4.shape
    lk, dv = v4.shape[2], v4.shape[3]
    if b_n * h_n * lq == 0 or lk == 0:
        return  # nothing to compute, or no key to keep: zeros
    cdt = request.compute_dtype
    group = request.group
    scale = request.scale
    plan = plan_tiles(request, tile_bytes, query_block)
    tq, hb = plan.tq, plan.hb
    width = int(np.max(plan.hi - plan.lo, initial=0))
    if width <= 0:
        return
    buf = np.empty(hb * tq * width, cdt)
    half_out = out4.dtype != cdt
    obuf = np.empty(hb * tq * dv, cdt) if half_out else None
    weights_direct = w4 is not None and w4.dtype == cdt
    lo_t, hi_t, exact_t = plan.lo.tolist(), plan.hi.tolist(), plan.exact.tolist()
    if request.predicate is not None or request.score is not None:
        softmax = _with_user_functions(softmax, request)
    else:
        softmax = _plain(softmax)

    for b in range(b_n):
        for hbi, h0 in enumerate(range(0, h_n, hb)):
            h1 = min(h0 + hb, h_n)
            nh = h1 - h0
            g = min(group, nh)
            nkv = nh // g
            kv0 = h0 // group
            k_b = k4[b, kv0 : kv0 + nkv]
            v_b = v4[b, kv0 : kv0 + nkv]
            for qbi, i0 in enumerate(range(0, lq, tq)):
                k0, k1 = lo_t[b][hbi][qbi], hi_t[b][hbi][qbi]
                if k0 >= k1:
                    continue  # no row of this tile keeps any key
                i1 = min(i0 + tq, lq)
                m, n = i1 - i0, k1 - k0
                s4 = buf[: nh * m * n].reshape(1, nh, m, n)
                s5 = s4.reshape(nkv, g, m, n)
                np.matmul(
                    _split_heads(q4[b, h0:h1, i0:i1], nkv, g),
                    k_b[:, None, k0:k1].swapaxes(-1, -2),
                    out=s5,
                )
                keep = None if keep4 is None else keep4[b : b + 1, h0:h1, i0:i1, k0:k1]
                bias = None if bias4 is None else bias4[b : b + 1, h0:h1, i0:i1, k0:k1]
                if bounds4 is None or exact_t[b][hbi][qbi]:
                    bnd = None
                else:
                    bnd = bounds4[b : b + 1, h0:h1, i0:i1]
                    if k0:
                        bnd = bnd - k0
                nthreads = threads_for(nh * m * n, nh * m) if parallel_softmax else 1
                if weights_direct:
                    w = w4[b : b + 1, h0:h1, i0:i1, k0:k1]  # type: ignore[index]
                    softmax(s4, w, scale, keep, bias, bnd, request.h0 + h0, nthreads, b, i0, k0)
                    p5 = _split_heads(w[0], nkv, g)
                else:
                    softmax(s4, s4, scale, keep, bias, bnd, request.h0 + h0, nthreads, b, i0, k0)
                    if w4 is not None:
                        w4[b : b + 1, h0:h1, i0:i1, k0:k1] = s4
                    p5 = s5
                if w4 is not None:
                    # A NaN row is NaN at every key, as in masked_softmax, not only in
                    # the tile's key span (the softmax made the whole span NaN).
                    nan_rows = np.isnan(s4[0, :, :, 0] if not weights_direct else w[0, :, :, 0])
                    if nan_rows.any():
                        w4[b, h0:h1, i0:i1][nan_rows] = np.nan
                o5 = _split_heads(out4[b, h0:h1, i0:i1], nkv, g)
                if half_out:
                    t5 = obuf[: nh * m * dv].reshape(nkv, g, m, dv)  # type: ignore[index]
                    np.matmul(p5, v_b[:, None, k0:k1], out=t5)
                    o5[...] = t5
                else:
                    np.matmul(p5, v_b[:, None, k0:k1], out=o5)
