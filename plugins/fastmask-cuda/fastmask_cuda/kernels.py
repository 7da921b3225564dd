"""The CUDA kernels of the ``cuda`` backend, and their launch configuration.

Two kernels per variant, compiled once each (explicit signatures, on first use)
and never per shape: shapes, offsets and strides are kernel arguments.

- ``warp_rows``: one warp per row, several rows (warps) per block; for rows of
  up to :data:`WARP_MAX_N` keys.
- ``block_rows``: one block per row; for longer rows.

A variant is ``(x dtype, dense keep mask or not, bias dtype or none)``: 3 x 2 x 4
at most, each compiled the first time it is used. Compute is float32 for
float16/float32 logits and float64 for float64; a bias is converted on load.

Per row ``r = (b, h, q)`` with kept keys ``[lo, hi)`` (``bounds``):

1. Each thread walks its keys ``k = lo + t, lo + t + T, ...`` (``t`` its lane or
   thread index, ``T`` 32 or the block size): consecutive threads read
   consecutive keys, so loads are coalesced when the key axis is contiguous.
   Positions outside ``[lo, hi)`` are never loaded. It keeps an online
   ``(m, s)``: the running maximum of the kept ``z = x * scale + bias`` and
   ``s = sum(exp(z - m))``, rescaled when ``m`` grows (one ``exp`` per key).
   A kept NaN or ``+inf`` poisons ``s`` with NaN.
2. The ``(m, s)`` pairs are merged across the warp with an XOR butterfly of
   ``shfl_xor_sync`` (every lane ends with the same, bit-identical pair; the merge
   is commutative). ``block_rows`` then writes one pair per warp to shared
   memory, and every warp merges those (at most 32) with a second butterfly:
   two ``syncthreads`` per row.
3. Each thread writes its keys over the whole row ``[0, N)`` (coalesced stores):
   ``exp(z - m) / s`` where kept, 0 elsewhere (without loading anything outside
   ``[lo, hi)``). ``s`` NaN: the whole row NaN; ``m == -inf`` (nothing kept):
   the whole row zeros -- the reference's semantics.

Every thread of a block runs the same number of row iterations (rows past the
end are computed as empty and not written), so the reductions are always
convergent. Under Numba's CUDA simulator, which has no warp shuffles, the
butterfly exchanges through shared memory with ``syncthreads`` instead; the
rest of the code is the same.

Kernel arguments: ``x``, ``out``, ``keep`` (uint8), ``bias``, ``bounds`` (int64)
as 1-D arrays over the memory each operand touches; ``p``, a tuple of 29 int64:
``B, H, Q, N`` then, for x, out, keep, bias and bounds in turn, the element
offset of element ``(0, 0, 0, 0)`` and four element strides (0 on broadcast
axes); ``scale`` in the compute dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import memory

__all__ = [
    "BLOCK_THREADS_MAX",
    "BLOCK_THREADS_MIN",
    "ELEMENTS_PER_THREAD",
    "NPARAMS",
    "WARP_MAX_N",
    "LaunchConfig",
    "compiled_variants",
    "kernels",
    "launch_config",
]

WARP = 32
FULL_MASK = 0xFFFFFFFF

#: Rows of at most this many keys get a warp each; longer rows a block each.
WARP_MAX_N = 1024
#: Most warps (rows) per block for ``warp_rows``.
WARPS_PER_BLOCK_MAX = 8
#: ``block_rows`` block size: about this many keys per thread, within [MIN, MAX].
ELEMENTS_PER_THREAD = 8
BLOCK_THREADS_MIN = 128
BLOCK_THREADS_MAX = 1024
#: Resident threads per SM assumed when sizing the grid (grid-stride over rows beyond it).
THREADS_PER_SM = 2048
#: Grid size cap, in multiples of one full wave of resident blocks.
WAVES = 4

# Layout of the int64 parameter tuple.
P_B, P_H, P_Q, P_N = 0, 1, 2, 3
P_X, P_OUT, P_KEEP, P_BIAS, P_BOUNDS = 4, 9, 14, 19, 24  # offset, then 4 strides each
NPARAMS = 29

_compiled: set[tuple] = set()


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is launched: which kernel, threads per block, blocks, rows per block."""

    kernel: str  # "warp" or "block"
    threads: int
    blocks: int
    rows_per_block: int


def _pow2_at_least(v: int) -> int:
    p = 1
    while p < v:
        p *= 2
    return p


@functools.lru_cache(maxsize=4096)
def launch_config(
    rows: int,
    n: int,
    sms: int,
    warp_max_n: int = WARP_MAX_N,
    block_min: int = BLOCK_THREADS_MIN,
    block_max: int = BLOCK_THREADS_MAX,
) -> LaunchConfig:
    """Choose the kernel and launch shape for ``rows`` rows of ``n`` keys on ``sms`` SMs.

    Short rows: one warp per row; up to :data:`WARPS_PER_BLOCK_MAX` warps per
    block, fewer when there are too few rows to give every SM two blocks.
    Long rows: one block per row, sized for about :data:`ELEMENTS_PER_THREAD`
    keys per thread. The grid is capped at :data:`WAVES` waves of resident blocks
    and strides over the remaining rows. Cached per arguments.
    """
    if n <= warp_max_n:
        wpb = WARPS_PER_BLOCK_MAX
        while wpb > 1 and rows < wpb * sms * 2:
            wpb //= 2
        threads = WARP * wpb
        blocks = -(-rows // wpb)
        per_block = wpb
        kind = "warp"
    else:
        threads = _pow2_at_least(-(-n // ELEMENTS_PER_THREAD))
        threads = max(block_min, min(block_max, threads))
        blocks = rows
        per_block = 1
        kind = "block"
    cap = sms * max(THREADS_PER_SM // threads, 1) * WAVES
    return LaunchConfig(kind, threads, max(1, min(blocks, cap)), per_block)


def compiled_variants() -> frozenset[tuple]:
    """The ``(dtype, has_keep, bias dtype)`` variants compiled so far in this process."""
    return frozenset(_compiled)


@functools.cache
def kernels(x_dtype: np.dtype, has_keep: bool, bias_dtype: np.dtype | None):
    """``(warp_rows, block_rows)`` for one variant, compiled on the first call."""
    x_dtype = np.dtype(x_dtype)
    bias_dtype = None if bias_dtype is None else np.dtype(bias_dtype)
    from . import _device_code  # imports numba.cuda

    pair = _device_code.build(x_dtype, has_keep, bias_dtype, memory.simulated())
    _compiled.add((x_dtype.char, has_keep, None if bias_dtype is None else bias_dtype.char))
    return pair
