"""The fused attention engine of the ``cython`` backend: planning, cost and the call.

The engine (``fastmask/_attention_engine.h``, entry point
``fastmask._kernels.attention_4d``) computes a whole attention call in one OpenMP
parallel region, flash-attention style: per work item of up to ``rows`` score rows
(the query heads of a GQA group times a block of queries) it forms the scores of a
block of keys with its own register-blocked micro-kernel, applies scale, bias and
mask, keeps a running max and sum per row and accumulates ``P @ V`` -- no scores
tensor, no BLAS and no Python between blocks, so nothing hands work to another
thread pool. An item only visits the keys that one of its rows keeps (the union of
the rows' intervals from ``request.bounds4``), so causal prefill computes about half
the blocks, a sliding window its band and padding stops at each sequence's length.

This module mirrors the engine's plan in NumPy (for the cost estimate and for
:func:`fastmask.explain_attention`) and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.base import Verdict
from ..threads import get_num_threads
from .tiled_attention import BYTES_PER_US

__all__ = ["BLOCK_KEYS", "EnginePlan", "estimate", "item_ranges", "plan", "run", "usable"]

#: Keys per block of the engine (``FM_AT_BK`` in ``_attention_engine.h``).
BLOCK_KEYS = 64
#: Key splitting (``FM_AT_SPLIT_*``): calls of fewer items than this, with rows of at
#: least ``SPLIT_MIN_KEYS`` keys, cut each item's keys into pieces of at least
#: ``SPLIT_PIECE`` keys that run in parallel and are merged (decode of few sequences).
SPLIT_ITEMS = 8
SPLIT_MIN_KEYS = 1024
SPLIT_PIECE = 512
#: Cost model, microseconds: a call's fixed cost and the time of one computed flop on
#: one thread (float32 AVX-512: 130-160 GFLOP/s per thread on the A1/A2 workloads of
#: ``fastmask bench`` on a Zen 5 core). The AVX2 and baseline (4-lane) variants are
#: assumed 2x and ~6x slower per flop, float64 2x: estimates, not measured.
OVERHEAD_US = 3.0
PER_FLOP_US = {"avx512": 7e-6, "avx2": 1.4e-5, "generic": 4e-5}
#: Below this many flops a parallel region costs more than it saves.
MIN_FLOPS_PER_THREAD = 2_000_000


@dataclass(frozen=True)
class EnginePlan:
    """How the engine cuts a request into work items, and what it computes.

    Attributes
    ----------
    rows : int
        Score rows per work item at most (lanes of the variant in use x 4).
    heads, queries : int
        Query heads and query positions of a full item.
    items : int
        Work items (those with nothing kept included).
    splits : int
        Pieces each item's keys are cut into (1: not split).
    computed : int
        Score elements computed, summed over items (rows x kept key span).
    blocks, skipped : int
        Key blocks visited, and blocks the mask lets the engine skip.
    key_rows : int
        Rows of K (and of V) read, summed over items: each item reads its keys once.
    threads : int
        Threads the call will use.
    """

    rows: int
    heads: int
    queries: int
    items: int
    splits: int
    computed: int
    blocks: int
    skipped: int
    key_rows: int
    threads: int


def usable(request, kernels) -> str:
    """Empty when the engine can serve ``request``, else why not."""
    if kernels is None or not kernels.attention_available():
        return "no fused engine in this build (needs GCC or clang)"
    if request.weights4 is not None:
        return "return_weights=True materialises the weights: tiled driver"
    if request.swap_bh and request.h0:
        return "a split 3-D call with user functions"
    if request.k4.shape[2] > 0x7FFFFFFF:
        return "more than 2**31 - 1 keys"
    return ""


def item_ranges(request, kernels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The keys each work item visits: ``(query starts, lo, hi)``.

    ``lo`` and ``hi`` have shape ``(B, head pieces, query blocks)``: item ``[b, s, i]``
    covers the query heads of piece ``s`` (kv head ``s // pieces per group``) and the
    queries from ``query starts[i]``, and visits keys ``[lo, hi)`` (``lo == hi``:
    nothing kept, skipped), in blocks of :data:`BLOCK_KEYS` from ``lo``.
    """
    b, _, lq, _ = request.q4.shape
    lk = request.k4.shape[2]
    _, g, gsub, nq, hkv, nsub, _ = _items(request, kernels)
    q_starts = np.arange(0, lq, nq)
    shape = (b, hkv * nsub, len(q_starts))
    bounds = request.bounds4
    if bounds is None or lk == 0 or lq == 0:
        return q_starts, np.zeros(shape, np.int64), np.full(shape, lk if bounds is None else 0)
    lo3 = np.clip(bounds[..., 0], 0, lk)
    hi3 = np.clip(bounds[..., 1], 0, lk)
    empty = lo3 >= hi3
    lo_e = np.where(empty, lk, lo3)
    hi_e = np.where(empty, 0, hi3)
    # Items: heads [kv*g + s*gsub, ... + gsub) (cut at the group's end) x query blocks.
    h_starts = np.array([kv * g + s * gsub for kv in range(hkv) for s in range(nsub)])

    def reduce(ufunc, a):
        return ufunc.reduceat(ufunc.reduceat(a, q_starts, axis=2), h_starts, axis=1)

    lo = reduce(np.minimum, lo_e)
    hi = reduce(np.maximum, hi_e)
    none = lo >= hi
    return q_starts, np.where(none, 0, lo), np.where(none, 0, hi)


def plan(request, kernels) -> EnginePlan:
    """The engine's work items for ``request`` and the blocks its mask skips."""
    _, _, lq, d = request.q4.shape
    lk = request.k4.shape[2]
    rows, g, gsub, nq, hkv, nsub, items = _items(request, kernels)
    computed = blocks = key_rows = 0
    if items and lk and request.bounds4 is None:
        # Every item visits every key (a decode step, no mask): the sums below in closed
        # form, with no NumPy call on the routing path of each new key count.
        computed = request.size
        key_rows = items * lk
        blocks = items * -(-lk // BLOCK_KEYS)
    elif items and lk:
        q_starts, lo, hi = item_ranges(request, kernels)
        span = hi - lo
        first = np.arange(hkv * nsub) % nsub * gsub
        heads = np.minimum(first + gsub, g) - first
        queries = np.minimum(q_starts + nq, lq) - q_starts
        computed = int((span * heads[None, :, None] * queries[None, None, :]).sum())
        key_rows = int(span.sum())
        blocks = int((-(-span // BLOCK_KEYS)).sum())
    skipped = items * -(-lk // BLOCK_KEYS) - blocks
    splits = _splits(items, lk)
    threads = _threads(items * splits, 2 * computed * (d + request.v4.shape[3]))
    return EnginePlan(rows, gsub, nq, items, splits, computed, blocks, skipped, key_rows, threads)


def _kv_heads(request) -> tuple[np.ndarray, np.ndarray, int]:
    """k4, v4 and the group size as the engine sees them: k and v broadcast over the
    query heads (one kv head, multi-query attention) are one group of every head, so
    each K/V block is read once for all of them."""
    k4, v4, g = request.k4, request.v4, request.group
    h = request.q4.shape[1]
    if g == 1 and h > 1 and k4.strides[1] == 0 and v4.strides[1] == 0:
        return k4[:, :1], v4[:, :1], h
    return k4, v4, g


def _items(request, kernels) -> tuple[int, int, int, int, int, int, int]:
    """``(rows, group, heads, queries, kv heads, head pieces, items)`` of the engine's
    plan (``fm_at_plan_make`` in ``_attention_engine.h``)."""
    b, h, lq, _ = request.q4.shape
    rows = int(kernels.attention_rows_per_item(request.compute_dtype))
    g = _kv_heads(request)[2]
    gsub = min(g, rows)
    nq = max(1, min(lq, rows // gsub))
    hkv = h // g
    nsub = -(-g // gsub)
    nqb = -(-lq // nq)
    return rows, g, gsub, nq, hkv, nsub, b * hkv * nsub * nqb


def _splits(items: int, lk: int) -> int:
    if 0 < items < SPLIT_ITEMS and lk >= SPLIT_MIN_KEYS:
        return min(-(-SPLIT_ITEMS // items), lk // SPLIT_PIECE)
    return 1


def _threads(items: int, flops: int) -> int:
    return max(1, min(get_num_threads(), items, flops // MIN_FLOPS_PER_THREAD))


def estimate(request, kernels) -> Verdict:
    """The engine's verdict on ``request``: what it computes, and at what cost."""
    why = usable(request, kernels)
    if why:
        return Verdict.no(why)
    p = plan(request, kernels)
    isa = kernels._isa()
    flops = 2 * p.computed * (request.q4.shape[3] + request.v4.shape[3])
    per_flop = PER_FLOP_US.get(isa, PER_FLOP_US["generic"])
    if request.compute_dtype == np.float64:
        per_flop *= 2
    kv_bytes = p.key_rows * (request.k4.shape[3] + request.v4.shape[3]) * request.k4.itemsize
    cost = OVERHEAD_US + max(per_flop * flops / p.threads, kv_bytes / BYTES_PER_US)
    total = request.size
    share = f"{100.0 * p.computed / total:.0f}%" if total else "0%"
    reason = (
        f"fused engine ({isa}): {p.items} item(s) of {p.heads} head(s) x {p.queries} "
        f"quer{'y' if p.queries == 1 else 'ies'}, {share} of the scores in {p.blocks} "
        f"block(s) of {BLOCK_KEYS} keys ({p.skipped} skipped by the mask), "
        + (f"keys split in {p.splits} pieces, " if p.splits > 1 else "")
        + f"{p.threads} thread(s)"
    )
    return Verdict(True, reason, cost)


def run(request, kernels) -> None:
    """Compute ``request`` with the engine; it writes every row of ``out4`` (zeros
    included), so ``out4`` need not be zero-filled."""
    k4, v4, group = _kv_heads(request)
    q4, k4, v4 = (_rows_contiguous(a) for a in (request.q4, k4, v4))
    # Threads from the unmasked work (an upper bound): the mask's share is not
    # worth a NumPy pass over the bounds on every call.
    items = _items(request, kernels)[-1]
    tasks = items * _splits(items, request.k4.shape[2])
    threads = _threads(tasks, 2 * request.size * (q4.shape[3] + v4.shape[3]))
    pred, score = request.predicate, request.score
    cdt = request.compute_dtype
    failed = kernels.attention_4d(
        q4, k4, v4, request.out4, request.keep4, request.bias4, request.bounds4,
        request.scale, group, threads,
        pred.row_function(cdt) if pred is not None else 0,
        score.row_function(cdt) if score is not None else 0,
        request.h0, request.swap_bh,
    )  # fmt: skip
    if failed >= 0:  # re-run that row in Python for the user's exception
        _, h, lq, _ = request.q4.shape
        b, hh, q = failed // (h * lq), (failed // lq) % h, failed % lq
        b, hh = (hh, 0) if request.swap_bh else (b, request.h0 + hh)
        fns = [f for f in (pred, score) if f is not None]
        lk = request.k4.shape[2]
        culprit = next((f for f in fns if f.python_error(b, hh, q, lk) is not None), fns[-1])
        culprit.row_failed(b, hh, q, lk)


def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` itself when its last axis is unit-stride, else a C-contiguous copy (rare:
    a transposed operand; broadcast leading axes are expanded in that copy)."""
    if a.shape[-1] <= 1 or a.strides[-1] == a.itemsize:
        return a
    return np.ascontiguousarray(a)
