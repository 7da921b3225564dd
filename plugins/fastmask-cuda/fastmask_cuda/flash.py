"""Attention on the device: a tiled kernel with an online softmax, and its launch configuration.

One kernel per variant computes ``softmax(q @ k^T * scale + bias, masked) @ v``
without ever writing the scores to global memory (flash-attention style). The
device code is in :mod:`fastmask_cuda._flash_code`.

Work split
----------
One block per ``(batch, query head, query tile)``: ``bq`` query rows, each
served by ``tpr`` consecutive threads of one warp (``threads = bq * tpr``).
Query head ``h`` reads kv head ``h // group`` (grouped-query attention; k and v
are never repeated). Per block:

1. The block's query tile ``[bq, D]`` is staged in shared memory (in the
   compute dtype: float32 for float16/float32, float64 for float64), and every
   row's kept interval ``[lo, hi)`` is read from ``bounds`` (structured masks,
   and the first/last kept key of a dense host mask; ``[0, Lk)`` without one).
   The block visits only the span ``[min lo, max hi)`` of its rows' intervals:
   key tiles outside it are never loaded (causal: about half; padding: up to
   the sequence's length; sliding windows: their band).
2. For each key tile of ``bk`` keys: K ``[bk, D]`` and V ``[bk, Dv]`` are
   loaded into shared memory (coalesced when the feature axis is contiguous).
   Each thread computes the scores of keys ``t, t + tpr, ...`` of its row
   (``q . k * scale + bias``, ``-inf`` where the row's interval or the dense
   keep mask drops the key; masked keys are not computed) into shared memory.
3. Online softmax per row: the tile's maximum ``m_t``; ``m' = max(m, m_t)``;
   ``p = exp(s - m')``; the running sum ``l`` and the output accumulators
   (``acc = acc * exp(m - m') + p @ V``) are rescaled. Each thread owns the
   output columns ``t, t + tpr, ...`` of its row (at most :data:`ACC_MAX`, in a
   local array).
4. The row is written as ``acc / l``; a row with nothing kept (``m == -inf``)
   as zeros; a row whose kept scores include a NaN or ``+inf`` as NaN (the
   reference's semantics).

``return_weights``: after the loop (``m`` and ``l`` final) the same kernel makes
a second pass over all key tiles, recomputes the scores of the tiles the block
visits and writes ``exp(s - m) / l`` -- zeros outside them -- so every weight is
written and no zero-fill is needed. It is the ``masked_softmax`` of the scores.

Every thread of a block runs the same tile loop (its bounds are block-uniform),
so the ``syncthreads`` are always convergent.

Variants and shapes
-------------------
Shared-memory arrays need compile-time sizes, so the head dimension picks a
*class*: the smallest of :data:`D_CLASSES` that holds ``max(D, Dv)``. A
variant is ``(dtype, dense keep mask or not, bias dtype or none, D class)``,
compiled once with an explicit signature on first use. The class and the
compute dtype fix the tile capacity (``bq_max x bk_max``, sized to
:data:`SHARED_BUDGET` bytes); the actual ``bq``, ``bk`` and ``tpr`` are kernel
arguments chosen per shape class by :func:`launch_config` (cached), like every
shape, offset and stride: nothing is recompiled for a new shape.

Kernel arguments: ``q, k, v, out, weights`` (1-D, the inputs' dtype),
``keep`` (uint8), ``bias``, ``bounds`` (int64), all 1-D arrays over the memory
each operand touches; ``p``, :data:`NPARAMS` int64: the dimensions
``B, H, Lq, Lk, D, Dv, group, bq, bk, tpr, want_weights`` then, for q, k, v,
out, weights, keep, bias and bounds in turn, the element offset of element
``(0, 0, 0, 0)`` and four element strides (0 on broadcast axes); ``scale`` in
the compute dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ACC_MAX",
    "D_CLASSES",
    "NPARAMS",
    "SHARED_BUDGET",
    "THREADS_TARGET",
    "FlashConfig",
    "compiled_variants",
    "d_class",
    "kernel",
    "launch_config",
    "shared_bytes",
    "tile_capacity",
    "variant",
]

WARP = 32
#: Head-dimension classes (compile-time widths of the shared-memory tiles).
D_CLASSES = (32, 64, 128, 256)
#: Output columns one thread accumulates (its local array).
ACC_MAX = 32
#: Static shared memory of one block, at most (the hardware limit is 48 KiB).
SHARED_BUDGET = 40 * 1024
#: Threads per block aimed at; tiles of one or two queries (decoding) get a warp per row.
THREADS_TARGET = 128

# Layout of the int64 parameter tuple.
P_B, P_H, P_LQ, P_LK, P_D, P_DV, P_GROUP, P_BQ, P_BK, P_TPR, P_WANT = range(11)
P_Q, P_K, P_V, P_OUT, P_W, P_KEEP, P_BIAS, P_BOUNDS = 11, 16, 21, 26, 31, 36, 41, 46
NPARAMS = 51

_compiled: set[tuple] = set()


def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


def d_class(d: int, dv: int) -> int | None:
    """The smallest class holding ``max(d, dv)``; None when the head is too wide."""
    need = max(d, dv, 1)
    for c in D_CLASSES:
        if need <= c:
            return c
    return None


def shared_bytes(dc: int, bq: int, bk: int, itemsize: int) -> int:
    """Static shared memory of a block: q, k (rows padded by one), v, scores, probabilities."""
    return itemsize * (bq * (dc + 1) + bk * (dc + 1) + bk * dc + 2 * bq * (bk + 1)) + 16 * bq


@functools.cache
def tile_capacity(dc: int, itemsize: int) -> tuple[int, int]:
    """``(bq_max, bk_max)``: the largest tile of the class that fits :data:`SHARED_BUDGET`.

    Starts at 32 x 32 and halves the larger side (keys first) until it fits.
    """
    bq, bk = 32, 32
    while shared_bytes(dc, bq, bk, itemsize) > SHARED_BUDGET and bq * bk > 1:
        if bk >= bq:
            bk //= 2
        else:
            bq //= 2
    return bq, bk


@dataclass(frozen=True)
class FlashConfig:
    """How one attention call is launched.

    ``d_class``, ``bq_max`` and ``bk_max`` are compile-time (the variant);
    ``bq`` query rows and ``bk`` keys per tile, ``tpr`` threads per row and
    ``threads = bq * tpr`` per block are kernel arguments.
    """

    d_class: int
    bq_max: int
    bk_max: int
    bq: int
    bk: int
    tpr: int
    threads: int

    def blocks(self, b: int, h: int, lq: int) -> int:
        """Grid size: one block per ``(batch, head, query tile)``."""
        return b * h * -(-lq // self.bq)


@functools.lru_cache(maxsize=4096)
def launch_config(
    lq: int, d: int, dv: int, itemsize: int, threads_target: int = THREADS_TARGET
) -> FlashConfig | None:
    """The launch shape for ``lq`` queries and head dims ``d``/``dv``; None if too wide.

    ``itemsize`` is the compute dtype's (4 or 8). ``bq`` is the tile capacity,
    or fewer rows when there are fewer queries (decoding: one row per block);
    ``tpr`` gives each thread at most :data:`ACC_MAX` output columns and the
    block about ``threads_target`` threads, within one warp per row. Cached per
    arguments: a shape class is ``(min(pow2(lq), bq_max), D class, Dv, itemsize)``.
    """
    dc = d_class(d, dv)
    if dc is None:
        return None
    bq_max, bk_max = tile_capacity(dc, itemsize)
    bq = min(bq_max, _pow2_at_least(max(lq, 1)))
    tpr_min = _pow2_at_least(-(-max(dv, 1) // ACC_MAX))
    tpr = min(WARP, max(tpr_min, threads_target // bq))
    return FlashConfig(dc, bq_max, bk_max, bq, bk_max, tpr, bq * tpr)


def compiled_variants() -> frozenset[tuple]:
    """The ``(dtype, has_keep, bias dtype, D class)`` variants compiled so far in this process."""
    return frozenset(_compiled)


def variant(dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, dc: int) -> tuple:
    """The key of a compiled variant (as :func:`compiled_variants` lists them)."""
    bias = None if bias_dtype is None else np.dtype(bias_dtype).char
    return (np.dtype(dtype).char, has_keep, bias, dc)


@functools.cache
def kernel(dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None, dc: int):
    """The attention kernel of one variant, compiled on the first call."""
    dtype = np.dtype(dtype)
    bias_dtype = None if bias_dtype is None else np.dtype(bias_dtype)
    from . import _flash_code  # imports numba.cuda

    k = _flash_code.build(dtype, has_keep, bias_dtype, dc)
    _compiled.add(variant(dtype, has_keep, bias_dtype, dc))
    return k
