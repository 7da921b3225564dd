"""Numba kernel of fastmask's masked softmax (the ``numba`` backend's engine).

Public functions
----------------
- :func:`masked_softmax_4d` runs the kernel on 4-D ``(B, H, Q, N)`` views.
- :func:`compile` compiles (or loads from Numba's on-disk cache) both the
  serial and the parallel kernel of a dtype; :func:`is_compiled` says whether
  that has happened in this process.

Importing this module imports neither Numba nor anything that compiles. The
first call for a dtype (or :func:`compile`) imports Numba, installs the
helpers of :mod:`fastmask.kernels.numba_exp` and compiles, with explicit
signatures and ``cache=True``, that dtype's serial kernel and the one that
runs ``min(nthreads, rows)`` contiguous chunks of rows in a ``prange``.

Layout
------
Every operand reaches the jitted code as a flat, C-contiguous 1-D buffer that
starts at its lowest-addressed element, plus an element offset and four
element strides (0 on broadcast axes, negative on reversed ones), all packed
with the shape and flags into one int64 array. The 16-bit floats travel as
the integers of their bits: float16 as ``uint16``, bfloat16 (``ml_dtypes``)
as ``int16``, so that the compile-time type says which of the two it is (the
signedness is only that tag: the bits are never used as numbers). Each row's
kept logits are converted to float32 once, into a per-thread buffer, and the
weights rounded back to nearest even on the way out (the conversions are in
:mod:`fastmask.kernels.numba_exp`). ``keep`` travels as ``uint8``. Below the
row loop the code works on typed pointers (no wraparound checks, no
reference counting per row). Operands
whose last stride is not 1 are gathered into per-thread buffers, one row at a
time, so the passes always run unit-stride loops, which LLVM vectorises.

Per row ``(b, h, q)`` with kept range ``[lo, hi)`` (``bounds`` clipped):

1. ``m = maximum(z_k)`` over ``lo <= k < hi``, masked ``z_k`` replaced by
   ``-inf`` (``llvm.maximum``: a NaN anywhere gives ``m = NaN``). ``m`` NaN or
   ``+inf``: the row is NaN; ``m == -inf``: the row is zeros.
2. ``e_k = exp(z_k - m)`` (0 where masked) into ``out``, or into a per-thread
   buffer in the compute dtype (float16 and bfloat16, non-unit output
   strides, streaming stores); summed in blocks of :data:`_BLOCK` in the compute dtype, the
   blocks added in float64. Each block is summed after its exp loop, from
   memory, by ``numba_exp.lane_sum`` (fixed lanes, a fixed tree), not as a
   reduction inside the exp loop: LLVM guards that loop with a runtime check
   of its pointers (for some, "are they less than 256 bytes apart") and falls
   back to a scalar loop, which would sum in another order. The result
   would then depend on where the scratch rows happen to be allocated, so on
   the heap, the thread count and the process.
3. ``out_k = e_k * (1 / s)``; positions outside ``[lo, hi)`` are written 0
   and never read (``x``, ``keep`` and ``bias`` alike).

Custom predicates and score functions
-------------------------------------
User functions reach the kernel as *row functions*: each is compiled once
(a Numba ``cfunc``, see :func:`predicate_row_function` and
:func:`score_row_function`) into ``int64 f(T *row, b, h, q, k0, n)`` that
evaluates it over one row's keys ``k0 <= k < k0 + n`` with the user function
inlined into the loop. The kernel is compiled once per dtype in a "custom"
variant (serial and parallel, cached on disk like the plain ones) that
takes the row functions' addresses in a small int64 array and calls them
once per row through a pointer (``numba_exp.call_row_fn``), so a new
predicate costs only its own small compilation, never the kernel's. Per row,
after the kept range ``[lo, hi)`` of ``bounds``:

- a predicate fills a per-thread byte buffer over ``[lo, hi)`` (ANDed with
  ``keep``), and ``[lo, hi)`` shrinks to its first and last kept key; the
  row then runs the passes as with a dense ``keep`` (or without one, when
  no key inside the new range is dropped). A row whose predicate keeps
  nothing is written as zeros.
- a score function gets ``z = x*scale + bias`` of the (narrowed) range in a
  per-thread buffer of the compute dtype, rewrites it in place, and the
  passes run on that buffer with scale 1 and no bias.

The plain kernels pass ``None`` instead of the array: the custom code is
then an identity that compiles away.

Memory: outputs of at least :data:`STREAM_MIN_BYTES` are written with
non-temporal 64-byte line stores (no read-for-ownership of the output), and
when rows have gaps (padding bounds) the next row's kept range of ``x``
(and of ``keep``/``bias`` when they vary per row) is prefetched, since the
hardware prefetchers lose such streams.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from typing import NamedTuple

import numpy as np

from fastmask import dtypes as _dtypes
from fastmask.kernels import numba_exp as _ne

__all__ = [
    "LOOP_FASTMATH",
    "STREAM_MIN_BYTES",
    "compile",
    "is_compiled",
    "masked_softmax_4d",
    "predicate_grid",
    "predicate_row_function",
    "score_grid",
    "score_row_function",
    "supports",
]

#: Fast-math flags of the row loops and kernels. ``reassoc`` lets the loops
#: vectorise freely (the max reduction is exact in any order); no
#: ``nnan``/``ninf`` (``-inf`` and NaN carry the semantics). The exp itself is
#: compiled separately with ``numba_exp.EXP_FASTMATH`` (no ``reassoc``) and
#: inlined by LLVM, keeping its own flags; the sum of pass 2 is
#: ``numba_exp.lane_sum``, whose adds carry no ``reassoc`` (a fixed order).
LOOP_FASTMATH: frozenset[str] = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

#: Elements per partial sum in pass 2 (summed in the compute dtype, then
#: accumulated in float64).
_BLOCK = 4096

# int64 parameter vector layout
_P_B, _P_H, _P_Q, _P_N = 0, 1, 2, 3
_P_X, _P_OUT, _P_KEEP, _P_BIAS, _P_BOUNDS = 4, 9, 14, 19, 24  # offset, then 4 strides
_P_FLAGS, _P_H0, _P_NCHUNKS = 29, 30, 31  # 32 entries in all
_F_KEEP, _F_BIAS, _F_BOUNDS, _F_INPLACE, _F_STREAM = 1, 2, 4, 8, 16
# int64 array of the custom kernels: row-function addresses (0: none), an error
# slot (0, or 1 + 2*row for a failed predicate, 2 + 2*row for a score) and the
# origin (b, q, k) added to the indices the row functions see (attention tiles)
_C_PRED, _C_SCORE, _C_ERROR, _C_B0, _C_Q0, _C_K0 = 0, 1, 2, 3, 4, 5
_U64_ZERO = np.uint64(0)
_U64_BYTE_ONES = np.uint64(0x0101010101010101)
_U64_56 = np.uint64(56)

#: Outputs at least this large are written with non-temporal stores (whole
#: 64-byte lines that bypass the cache, so they are not read first); smaller
#: ones stay in the cache for whatever reads them next.
STREAM_MIN_BYTES = 16 << 20


# ==========================================================================
# Jitted code. Written as plain Python; _install() rebinds the names listed
# in _JIT_LOOP to Numba dispatchers (fastmath=LOOP_FASTMATH) and registers
# the generic helpers (_load_c, ...) as Numba overloads. Inside jitted code
# the globals are resolved at compile time, so they see the dispatchers.
# ==========================================================================


def _load_c(p, i):
    """``p[i]`` in the compute dtype (float16 / bfloat16 bits -> float32)."""
    return p[i]


def _store_c(p, i, v):
    """``p[i] = v`` from the compute dtype (float32 -> float16 / bfloat16 bits, RNE)."""
    p[i] = v


def _exp_c(z):
    """``exp`` of the compute dtype (``numba_exp.exp_f32`` / ``exp_f64``)."""
    return np.exp(z)


def _sum_c(p, n):
    """Sum of ``p[0:n]`` in the compute dtype, in a fixed order (``numba_exp.lane_sum``)."""
    return np.sum(p[:n])


def _cval(p, v):
    """``v`` in the compute dtype belonging to pointer/array ``p``'s dtype."""
    return v


def _is_narrow(a):
    """True (a compile-time constant) when ``a`` holds float16 or bfloat16 bits."""
    return False


def _can_stream(out):
    """True (a compile-time constant) when ``out``'s dtype has streaming stores."""
    return False


def _stage_x(x, xb, xs3, n, xbuf):
    """Pointer to the row's ``n`` logits x[xb + j*xs3], unit stride.

    Into ``x`` itself when that is unit-stride; otherwise gathered into
    ``xbuf``. float16 and bfloat16 rows are always converted into ``xbuf``
    (float32) once, so that the passes run the float32 loops (and their vector
    epilogues).
    """
    return None


def _dest(xp, ep):
    """``ep``, or ``xp`` itself when ``ep`` is None (in place)."""
    return xp if ep is None else ep


def _in_place(ep):
    """True (a compile-time constant) when ``ep`` is None: the weights overwrite ``xp``."""
    return ep is None


def _skip(p, j):
    """Pointer ``p + j``; None stays None."""
    return None if p is None else p[j:]


def _fill(op, os, j0, j1, v):
    """op[j*os] = v for j0 <= j < j1."""
    if os == 1:
        for j in range(j0, j1):
            _store_c(op, j, v)
    else:
        for j in range(j0, j1):
            _store_c(op, j * os, v)


def _pass1(xp, kp, bp, n, sc, hk, hb):
    """Max over kept z (NaN-propagating; -inf when nothing is kept)."""
    m = _cval(bp, -np.inf)
    ninf = _ne.opaque(m)  # a constant here would keep the loop scalar
    if hk:
        if hb:
            for j in range(n):
                z = _load_c(xp, j) * sc + bp[j]
                m = _ne.fmaximum(m, z if kp[j] != 0 else ninf)
        else:
            for j in range(n):
                z = _load_c(xp, j) * sc
                m = _ne.fmaximum(m, z if kp[j] != 0 else ninf)
    elif hb:
        for j in range(n):
            m = _ne.fmaximum(m, _load_c(xp, j) * sc + bp[j])
    else:
        for j in range(n):
            m = _ne.fmaximum(m, _load_c(xp, j) * sc)
    return m


def _pass2(xp, kp, bp, ep, n, sc, m, hk, hb):
    """ep[j] = exp(z_j - m) (0 where masked). No sum here: see :func:`_row_core`.

    ``ep`` None: write into ``xp`` (in place). The loops then see one pointer
    for reads and writes, and LLVM vectorises them without a runtime overlap
    check (which, for the same memory, would send them to the scalar loop).
    """
    ep = _dest(xp, ep)
    zero = _cval(bp, 0.0)
    if hk:
        if hb:
            for j in range(n):
                e = _exp_c(_load_c(xp, j) * sc + bp[j] - m)
                _store_c(ep, j, e if kp[j] != 0 else zero)
        else:
            for j in range(n):
                e = _exp_c(_load_c(xp, j) * sc - m)
                _store_c(ep, j, e if kp[j] != 0 else zero)
    elif hb:
        for j in range(n):
            _store_c(ep, j, _exp_c(_load_c(xp, j) * sc + bp[j] - m))
    else:
        for j in range(n):
            _store_c(ep, j, _exp_c(_load_c(xp, j) * sc - m))


def _fused_max(bp):
    """2**24 (float32) or 2**53 (float64): where ``x*sc - m``, fused into one
    rounding, can be off by 1 or more (see :func:`_row_core`)."""
    f24 = _cval(bp, 16777216.0)
    return f24 if _cval(bp, 16777217.0) == f24 else _cval(bp, 9007199254740992.0)


def _bias_needs_staging(xp, bp, n, sc, m):
    """Whether a float32 row with a bias is staged in float64 (:func:`_stage_z`), as the
    C kernel's ``fm_bias_z_to_memory`` decides: pass 2 rounds ``b - m`` on its own,
    off by ``|b - m| * 2**-24``, and for the keys that matter ``|b - m|`` is about
    ``|x * sc|`` (a bias cancelling large logits, or large logits beside a small
    bias); so rows with ``max |x * sc| >= 64``, and rows whose max z is beyond
    2**30 or not finite (an overflow of finite terms among them)."""
    if _cval(bp, 16777217.0) != _cval(bp, 16777216.0):
        return False  # float64: its own rounding is the reference's
    if not abs(m) < _cval(bp, 1073741824.0):
        return True
    a = _cval(bp, 0.0)
    for j in range(n):
        a = max(a, abs(_load_c(xp, j)))
    return np.float64(a) * abs(np.float64(sc)) >= 64.0


def _stage_z(xp, kp, dp, n, sc, bp, hk, hb, sd):
    """dp[j] = x[j]*sc (+ b[j]) - max(kept), computed in float64 (``dp`` may be ``xp``).

    ``sd`` is the call's float64 scale: a biased row is formed with it, as the reference
    forms z (with ``sc`` rounded to float32, keys whose logits the bias brings together
    would be off by (x_i - x_j) * scale * 2**-24). Exact products for float32 logits,
    so near-ties keep their weights at any magnitude, a product that overflows float32
    stays finite and a bias that cancels large logits is added before anything is
    rounded; for float64 the products and sums rounded once each, as the reference
    rounds them. Returns
    the max: -inf when nothing is kept, NaN when a kept z is NaN (a NaN logit or bias:
    the row is NaN, as the reference makes it; an overflow in float32 is not one here).
    """
    if not hb:  # unbiased: the rounded scale, so that staged and fused rows agree to the bit
        sd = np.float64(sc)
    md = -np.inf
    nan = False
    for j in range(n):
        z = np.float64(_load_c(xp, j)) * sd
        if hb:
            z += np.float64(bp[j])
        if not hk or kp[j] != 0:
            if z > md:
                md = z
            elif z != z:
                nan = True
    if nan:
        return np.nan
    if md == -np.inf:
        return md
    if _cval(bp, 16777217.0) == _cval(bp, 16777216.0):  # float32: products exact
        for j in range(n):
            z = np.float64(_load_c(xp, j)) * sd
            if hb:
                z += np.float64(bp[j])
            _store_c(dp, j, z - md)
    else:  # float64: rounded first, through memory (a fused product is not rounded)
        for j in range(n):
            _store_c(dp, j, _load_c(xp, j) * sc)
        if hb:
            for j in range(n):
                _store_c(dp, j, _load_c(dp, j) + bp[j])
        for j in range(n):
            _store_c(dp, j, _load_c(dp, j) - md)
    return md


def _row_staged(xp, kp, bp, ep, n, sc, hk, hb, sd):
    """:func:`_row_core` from z - max staged in float64 (:func:`_stage_z`)."""
    one = _cval(bp, 1.0)
    dp = _dest(xp, ep)
    md = _stage_z(xp, kp, dp, n, sc, bp, hk, hb, sd)
    if md != md:
        return 2, one
    if md == -np.inf:
        return 1, one
    s = _row_exp(dp, kp, bp, None, n, one, _cval(bp, 0.0), hk, False)
    return (2, one) if s != s else (0, _cval(bp, 1.0 / s))  # NaN: a kept +inf logit


def _row_core(xp, kp, bp, ep, n, sc, hk, hb, sd):
    """Passes 1 and 2 of one row's kept range (``ep`` None: in place in ``xp``).

    Returns ``(code, inv)``: code 0 = ``ep`` holds the unnormalised weights and
    ``inv`` is 1/sum; 1 = the row is all zeros; 2 = the row is all NaN.

    Without a bias, pass 2's ``x*sc - m`` is contracted into one rounding: off from
    the rounded z by m's own rounding error, a shift that cancels in the
    normalisation while it is small. Rows with |m| >= :func:`_fused_max` stage
    ``z - m`` in float64 first (:func:`_stage_z`), as the C kernel does (float32
    1e20 * 0.1 is otherwise off by ~1e12, and exp gives inf or 0); so do rows
    whose kept products all overflowed to -inf (|sc| > 1), which pass 1 cannot
    tell from a row with nothing kept.

    With a bias, the loops may round ``x*sc + b - m`` differently in the two
    passes (reassociated, contracted); where a large bias cancels large logits
    that difference is beyond exp's range, and pass 2 misses the max's own
    ``exp(0) = 1``. Such a row (its sum below 1/2 or not finite) is staged in
    float64 too when ``x`` is still there (always for float16/bfloat16, whose
    rows are converted into a buffer); in place, the row keeps pass 2's weights
    while their sum is positive and finite, and is NaN otherwise.
    """
    m = _pass1(xp, kp, bp, n, sc, hk, hb)
    one = _cval(bp, 1.0)
    if hb and _bias_needs_staging(xp, bp, n, sc, m):
        return _row_staged(xp, kp, bp, ep, n, sc, hk, hb, sd)
    if m != m or (m == np.inf and hb):
        return 2, one
    if m == -np.inf and (hb or not abs(sc) > one):
        return 1, one
    if not abs(m) < _fused_max(bp):  # also a float32 product that overflowed (no bias)
        return _row_staged(xp, kp, bp, ep, n, sc, hk, hb, sd)
    s = _row_exp(xp, kp, bp, ep, n, sc, m, hk, hb)
    if hb and not (s >= 0.5 and s < np.inf):
        if not _in_place(ep):
            return _row_staged(xp, kp, bp, ep, n, sc, hk, hb, sd)
        if not (s > 0.0 and s < np.inf):
            return 2, one
    return 0, _cval(bp, 1.0 / s)


def _row_exp(xp, kp, bp, ep, n, sc, m, hk, hb):
    """Pass 2 of :func:`_row_core` by blocks; returns the sum (float64)."""
    s = 0.0
    for j0 in range(0, n, _BLOCK):
        nb = min(n - j0, _BLOCK)
        _pass2(
            _ne.address(xp, j0),
            _ne.address(kp, j0),
            _ne.address(bp, j0),
            _skip(ep, j0),
            nb,
            sc,
            m,
            hk,
            hb,
        )
        # Summed from memory (the block is in L1) in a fixed lane order, not in
        # the exp loop: LLVM versions that loop on a runtime overlap check of
        # its pointers, whose scalar fallback would sum in another order, so
        # the bits would depend on scratch addresses (see the module docstring).
        s += _sum_c(_dest(_ne.address(xp, j0), _skip(ep, j0)), nb)
    return s


def _scale_inplace(ep, n, inv):
    """Pass 3 in place: ep[j] *= inv."""
    for j in range(n):
        _store_c(ep, j, _load_c(ep, j) * inv)


def _scale_store(eb, op, os, n, inv):
    """Pass 3 from a buffer: op[j*os] = eb[j] * inv (converted)."""
    if os == 1:
        for j in range(n):
            _store_c(op, j, eb[j] * inv)
    else:
        for j in range(n):
            _store_c(op, j * os, eb[j] * inv)


def _stream_row(op, N, lo, hi, eb, inv, lanes):
    """Write a whole unit-stride output row: eb[k - lo] * inv on [lo, hi), 0 elsewhere.

    Full 64-byte lines (``lanes`` elements) go out as non-temporal stores;
    the partial lines at the row's ends and the (at most two) lines that
    straddle ``lo`` or ``hi`` use ordinary stores.
    """
    zero = _cval(eb, 0.0)
    head = min(N, ((64 - _ne.misalign(op)) & 63) * lanes // 64)
    for j in range(head):
        _store_c(op, j, eb[j - lo] * inv if lo <= j < hi else zero)
    j = head
    while j + lanes <= N:
        if j + lanes <= lo or j >= hi:
            _ne.stream_zero_line(op, j)
        elif lo <= j and j + lanes <= hi:
            _ne.stream_line(op, j, eb, j - lo, inv)
        else:
            for i in range(j, j + lanes):
                _store_c(op, i, eb[i - lo] * inv if lo <= i < hi else zero)
        j += lanes
    for i in range(j, N):
        _store_c(op, i, eb[i - lo] * inv if lo <= i < hi else zero)


def _zero_row(op, os3, N, stream, ebuf, zero, lanes):
    """Write a whole output row of zeros."""
    if stream:
        _stream_row(op, N, 0, 0, _ne.address(ebuf, 0), zero, lanes)
    else:
        _fill(op, os3, 0, N, zero)


def _and_into(pp, kp, n):
    """pp[j] &= kp[j] (both 0/1 bytes)."""
    for j in range(n):
        pp[j] = pp[j] & kp[j]


def _kept_span(pp, p64, n):
    """(count, first, last) of the 0/1 bytes ``pp[:n]`` (first = n, last = -1 if none).

    ``p64`` is the same (8-byte aligned) memory as uint64 words: the loop over
    whole words vectorises (a word's byte sum is the top byte of
    ``word * 0x0101010101010101``), then at most 7 bytes at each end.
    """
    nw = n // 8
    cnt = _U64_ZERO
    fw = nw
    lw = -1
    for w in range(nw):
        v = p64[w]
        cnt += (v * _U64_BYTE_ONES) >> _U64_56
        fw = min(fw, w if v != _U64_ZERO else nw)
        lw = max(lw, w if v != _U64_ZERO else -1)
    count = np.int64(cnt)
    first = n
    last = -1
    if fw < nw:
        j = fw * 8
        while pp[j] == 0:
            j += 1
        first = j
    if lw >= 0:
        j = lw * 8 + 7
        while pp[j] == 0:
            j -= 1
        last = j
    for j in range(nw * 8, n):
        if pp[j] != 0:
            count += 1
            last = j
            first = min(first, j)
    return count, first, last


def _score_input(xp, bp, zp, n, sc, hb):
    """zp[j] = x_j * sc (+ b_j): the scores a score function receives."""
    if hb:
        for j in range(n):
            zp[j] = _load_c(xp, j) * sc + bp[j]
    else:
        for j in range(n):
            zp[j] = _load_c(xp, j) * sc


def _emptied(fns, lo, hi):
    """Whether the row functions left row range ``[lo, hi)`` empty (never without them)."""
    return lo >= hi


def _custom_bufs(fns, N, bias):
    """Per-thread buffers of the custom kernels; None without.

    ``(pbuf, p8, zbuf)``: the predicate's bytes as uint64 words and as bytes
    (one buffer), and the scores.
    """
    return None, None, None


def _custom_row(fns, p, r, b, h, q, lo, hi, xp, kp, bp, sc, hk, hb, inplace, bufs, nxt):
    """Apply the row functions of ``fns`` to row ``r`` (identity when ``fns`` is None).

    ``nxt``: ``(x, b1, h1, q1, r1, x_unit, xline)``, to prefetch the next row of ``x``.

    Returns ``(lo, hi, xp, kp, bp, sc, hk, hb, inplace)`` for the passes: the
    range narrowed to the predicate's first and last kept key (``lo >= hi``:
    nothing kept, or a row function failed and recorded ``r`` in ``fns``),
    and the operands to read there.
    """
    return lo, hi, xp, kp, bp, sc, hk, hb, inplace


def _gather(sp, step, dp, n):
    """dp[j] = sp[j*step] for j < n."""
    for j in range(n):
        dp[j] = sp[j * step]


def _prefetch_read(pp, lo, hi, step):
    """Prefetch pp[lo:hi] (unit stride, ``step`` elements per cache line)."""
    for j in range(lo, hi, step):
        _ne.prefetch(pp, j, False)


def _offset(p, at, b, h, q):
    """Element offset of operand ``at``'s row (b, h, q) in its flat buffer."""
    return p[at] + b * p[at + 1] + h * p[at + 2] + q * p[at + 3]


def _row_range(p, bounds, hd, b, h, q):
    """Clipped kept range [lo, hi) of row (b, h, q) (lo >= hi: empty)."""
    N = p[_P_N]
    if not hd:
        return 0, N
    db = _offset(p, _P_BOUNDS, b, h, q)
    return max(bounds[db], 0), min(bounds[db + p[_P_BOUNDS + 4]], N)


def _rows(x, out, keep, bias, bounds, p, scale, r0, r1, fns):
    """Process rows r0 <= r < r1 (one chunk; scratch buffers are its own).

    Below the row loop everything works on typed pointers: no wraparound
    checks, no reference counting per row. ``fns``: None (plain kernels) or
    the custom kernels' int64 array of row functions.
    """
    H = p[_P_H]
    Q = p[_P_Q]
    N = p[_P_N]
    flags = p[_P_FLAGS]
    hk = (flags & _F_KEEP) != 0
    hb = (flags & _F_BIAS) != 0
    hd = (flags & _F_BOUNDS) != 0
    inplace = (flags & _F_INPLACE) != 0
    xs3 = p[_P_X + 4]
    os3 = p[_P_OUT + 4]
    ks3 = p[_P_KEEP + 4]
    bs3 = p[_P_BIAS + 4]
    x_unit = xs3 == 1
    k_unit = ks3 == 1
    b_unit = bs3 == 1
    # keep/bias rows that change from one row to the next are streamed too
    k_stream = hk and k_unit and p[_P_KEEP + 3] != 0
    b_stream = hb and b_unit and p[_P_BIAS + 3] != 0
    stream = (flags & _F_STREAM) != 0 and os3 == 1 and _can_stream(out)
    lanes = 64 // out.itemsize
    use_buf = os3 != 1 or _is_narrow(out) or stream
    sc = bias.dtype.type(scale)
    sd = np.float64(scale)  # a biased row's staging forms z with it (_stage_z)
    zero = bias.dtype.type(0.0)
    nan = bias.dtype.type(np.nan)
    xline = max(1, 64 // x.itemsize)
    kline = 64
    bline = max(1, 64 // bias.itemsize)

    xbuf = np.empty(N if (_is_narrow(x) or not x_unit) else 0, bias.dtype)
    kbuf = np.empty(0 if (k_unit or not hk) else N, np.uint8)
    bbuf = np.empty(0 if (b_unit or not hb) else N, bias.dtype)
    ebuf = np.empty(N if use_buf else 0, bias.dtype)
    bufs = _custom_bufs(fns, N, bias)

    # (b1, h1, q1) and [lo1, hi1): the next row; the loop walks the indices
    # instead of dividing (divisions cost more than a short row's softmax)
    q1 = r0 % Q
    h1 = (r0 // Q) % H
    b1 = r0 // (Q * H)
    lo1, hi1 = _row_range(p, bounds, hd, b1, h1, q1)
    for r in range(r0, r1):
        b = b1
        h = h1
        q = q1
        lo = lo1
        hi = hi1
        q1 += 1
        if q1 == Q:
            q1 = 0
            h1 += 1
            if h1 == H:
                h1 = 0
                b1 += 1
        if r + 1 < r1:
            lo1, hi1 = _row_range(p, bounds, hd, b1, h1, q1)
            # Rows with gaps (padding) defeat the hardware prefetchers: ask
            # for the next row's kept range of each streamed operand early.
            # (Full rows stream well without; the hints would only cost.)
            if lo1 < hi1 and hi1 - lo1 < N:
                if x_unit:
                    _prefetch_read(_ne.address(x, _offset(p, _P_X, b1, h1, q1)), lo1, hi1, xline)
                if k_stream:
                    _prefetch_read(
                        _ne.address(keep, _offset(p, _P_KEEP, b1, h1, q1)), lo1, hi1, kline
                    )
                if b_stream:
                    _prefetch_read(
                        _ne.address(bias, _offset(p, _P_BIAS, b1, h1, q1)), lo1, hi1, bline
                    )
        ob = _offset(p, _P_OUT, b, h, q)
        op = _ne.address(out, ob)
        if lo >= hi:
            if stream:
                _stream_row(op, N, 0, 0, _ne.address(ebuf, 0), zero, lanes)
            else:
                _fill(op, os3, 0, N, zero)
            continue
        n = hi - lo

        xp = _stage_x(x, _offset(p, _P_X, b, h, q) + lo * xs3, xs3, n, xbuf)
        if hk:
            kb = _offset(p, _P_KEEP, b, h, q) + lo * ks3
            if k_unit:
                kp = _ne.address(keep, kb)
            else:
                kp = _ne.address(kbuf, 0)
                _gather(_ne.address(keep, kb), ks3, kp, n)
        else:
            kp = _ne.address(keep, 0)
        if hb:
            bb = _offset(p, _P_BIAS, b, h, q) + lo * bs3
            if b_unit:
                bp = _ne.address(bias, bb)
            else:
                bp = _ne.address(bbuf, 0)
                _gather(_ne.address(bias, bb), bs3, bp, n)
        else:
            bp = _ne.address(bias, 0)
        # user predicate / score function (custom kernels only)
        lo, hi, xp, kp, bp, rsc, rhk, rhb, rinplace = _custom_row(
            fns, p, r, b, h, q, lo, hi, xp, kp, bp, sc, hk, hb, inplace, bufs,
            (x, b1, h1, q1, r1, x_unit, xline),
        )  # fmt: skip
        if _emptied(fns, lo, hi):  # (constant False in the plain kernels)
            _zero_row(op, os3, N, stream, ebuf, zero, lanes)
            continue
        n = hi - lo

        if stream:
            ep = _ne.address(ebuf, 0)
            code, inv = _row_core(xp, kp, bp, ep, n, rsc, rhk, rhb, sd)
            if code == 0:
                _stream_row(op, N, lo, hi, ep, inv, lanes)
            elif code == 1:
                _stream_row(op, N, 0, 0, ep, zero, lanes)
            else:
                _fill(op, 1, 0, N, nan)
            continue
        if use_buf:
            ep = _ne.address(ebuf, 0)
            code, inv = _row_core(xp, kp, bp, ep, n, rsc, rhk, rhb, sd)
            if code == 0:
                _scale_store(ep, _ne.address(op, lo * os3), os3, n, inv)
        else:
            oq = _ne.address(op, lo)
            if rinplace:
                # the same memory as xp: one pointer, not two to check
                code, inv = _row_core(oq, kp, bp, None, n, rsc, rhk, rhb, sd)
            else:
                code, inv = _row_core(xp, kp, bp, oq, n, rsc, rhk, rhb, sd)
            if code == 0:
                _scale_inplace(oq, n, inv)

        if code == 0:
            _fill(op, os3, 0, lo, zero)
            _fill(op, os3, hi, N, zero)
        else:
            _fill(op, os3, 0, N, zero if code == 1 else nan)
    if stream:
        _ne.store_fence()  # before this chunk counts as done


def _kernel_functions(helpers_stamp: str):
    """The kernel entry points (plain and custom), as closures over ``helpers_stamp``.

    Numba keys a function's disk cache on its own file only, but the kernels
    inline code from ``numba_exp.py``; a closure variable's value is part of
    the cache key, so a hash of that file's source keeps a stale kernel from
    being loaded after the helpers change.
    """

    def kernel_serial(x, out, keep, bias, bounds, p, scale):
        """All rows in one chunk, no parallel launch."""
        helpers_stamp  # noqa: B018 - keys the disk cache (see above)
        rows = p[_P_B] * p[_P_H] * p[_P_Q]
        _rows(x, out, keep, bias, bounds, p, scale, 0, rows, None)

    def kernel_parallel(x, out, keep, bias, bounds, p, scale):
        """min(nthreads, rows) contiguous chunks of rows, one prange iteration each."""
        helpers_stamp  # noqa: B018
        rows = p[_P_B] * p[_P_H] * p[_P_Q]
        nchunks = min(p[_P_NCHUNKS], rows)
        for c in _prange(nchunks):
            r0 = c * rows // nchunks
            r1 = (c + 1) * rows // nchunks
            _rows(x, out, keep, bias, bounds, p, scale, r0, r1, None)

    def kernel_serial_custom(x, out, keep, bias, bounds, p, scale, fns):
        """kernel_serial with the row functions of ``fns``."""
        helpers_stamp  # noqa: B018
        rows = p[_P_B] * p[_P_H] * p[_P_Q]
        _rows(x, out, keep, bias, bounds, p, scale, 0, rows, fns)

    def kernel_parallel_custom(x, out, keep, bias, bounds, p, scale, fns):
        """kernel_parallel with the row functions of ``fns``."""
        helpers_stamp  # noqa: B018
        rows = p[_P_B] * p[_P_H] * p[_P_Q]
        nchunks = min(p[_P_NCHUNKS], rows)
        for c in _prange(nchunks):
            r0 = c * rows // nchunks
            r1 = (c + 1) * rows // nchunks
            _rows(x, out, keep, bias, bounds, p, scale, r0, r1, fns)

    return kernel_serial, kernel_parallel, kernel_serial_custom, kernel_parallel_custom


_prange = range  # rebound to numba.prange by _install()

#: Compiled without fast-math flags (they stay on their instructions when inlined):
#: the float64 staging must round ``x * sc + b`` and ``- max`` as written, like the
#: reference; ``reassoc`` would fold it into ``x * sc + (b - max)``, exact where the
#: reference rounds (a bias of 3e38 beside logits of 6e4).
_STRICT = frozenset({"_stage_z"})

_JIT_LOOP = (
    "_prefetch_read",
    "_offset",
    "_row_range",
    "_fill",
    "_pass1",
    "_pass2",
    "_fused_max",
    "_bias_needs_staging",
    "_stage_z",
    "_row_core",
    "_row_staged",
    "_row_exp",
    "_scale_inplace",
    "_scale_store",
    "_gather",
    "_stream_row",
    "_zero_row",
    "_and_into",
    "_kept_span",
    "_score_input",
    "_rows",
)


# ==========================================================================
# lazy compilation
# ==========================================================================

_lock = threading.RLock()
_installed = False
# (dtype name, parallel) -> plain kernel; (dtype name, parallel, "custom") -> custom kernel
_kernels: dict[tuple, object] = {}


def _key(dtype: np.dtype, parallel: bool, custom: bool) -> tuple:
    name = _DTYPE_INFO[dtype].key
    return (name, parallel, "custom") if custom else (name, parallel)


_warned_no_cache = False
_entry_points = None  # (serial, parallel, serial custom, parallel custom), made on first build


def _install() -> None:
    """Import Numba, install helpers and overloads (once per process)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        import numba
        from numba.core import types
        from numba.extending import overload

        # The default "omp" layer (GNU OpenMP) aborts forked children; "workqueue" is
        # fork-safe, and the backend serialises launches so that it is thread-safe.
        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"
        _ne.install()
        flags = set(LOOP_FASTMATH)
        jit_options = {"fastmath": flags}

        def is_narrow_type(a):
            """float16 (uint16 bits) or bfloat16 (int16 bits) storage."""
            return isinstance(a, (types.Array, types.CPointer)) and a.dtype in (
                types.uint16,
                types.int16,
            )

        def widen(a):
            """The bits -> float32 conversion of narrow storage ``a``."""
            return _ne.half_to_f32 if a.dtype == types.uint16 else _ne.bf16_to_f32

        def narrow(a):
            """The float32 -> bits conversion (RNE) of narrow storage ``a``."""
            return _ne.f32_to_half if a.dtype == types.uint16 else _ne.f32_to_bf16

        def compute_type(a):
            return types.float64 if a.dtype == types.float64 else types.float32

        @overload(_load_c, jit_options=jit_options)
        def _ov_load_c(p, i):
            if is_narrow_type(p):
                to_f32 = widen(p)
                return lambda p, i: to_f32(p[i])
            return lambda p, i: p[i]

        @overload(_store_c, jit_options=jit_options)
        def _ov_store_c(p, i, v):
            if is_narrow_type(p):
                from_f32 = narrow(p)

                def impl(p, i, v):
                    p[i] = from_f32(np.float32(v))

                return impl

            def impl(p, i, v):
                p[i] = v

            return impl

        @overload(_exp_c, jit_options=jit_options)
        def _ov_exp_c(z):
            if z == types.float32:
                return lambda z: _ne.exp_f32(z)
            if z == types.float64:
                return lambda z: _ne.exp_f64(z)
            return None

        @overload(_sum_c, jit_options=jit_options)
        def _ov_sum_c(p, n):
            if is_narrow_type(p):
                to_f32 = widen(p)

                # typed but never run: 16-bit weights live in a float32 buffer
                def impl(p, n):
                    s = np.float32(0.0)
                    for j in range(n):
                        s += to_f32(p[j])
                    return s

                return impl
            return lambda p, n: _ne.lane_sum(p, n)

        @overload(_cval, jit_options=jit_options)
        def _ov_cval(p, v):
            if compute_type(p) == types.float64:
                return lambda p, v: np.float64(v)
            return lambda p, v: np.float32(v)

        @overload(_is_narrow, jit_options=jit_options)
        def _ov_is_narrow(a):
            if is_narrow_type(a):
                return lambda a: True
            return lambda a: False

        @overload(_can_stream, jit_options=jit_options)
        def _ov_can_stream(a):
            # bfloat16's line conversion is integer IR, so it streams everywhere
            ok = a.dtype in (types.float32, types.float64, types.int16) or (
                a.dtype == types.uint16 and _ne.HALF_HARDWARE
            )
            return (lambda a: True) if ok else (lambda a: False)

        @overload(_stage_x, jit_options=jit_options)
        def _ov_stage_x(x, xb, xs3, n, xbuf):
            if is_narrow_type(x):
                to_f32 = widen(x)

                def impl(x, xb, xs3, n, xbuf):
                    sp = _ne.address(x, xb)
                    dp = _ne.address(xbuf, 0)
                    if xs3 == 1:
                        for j in range(n):
                            dp[j] = to_f32(sp[j])
                    else:
                        for j in range(n):
                            dp[j] = to_f32(sp[j * xs3])
                    return dp

                return impl

            def impl(x, xb, xs3, n, xbuf):
                if xs3 == 1:
                    return _ne.address(x, xb)
                dp = _ne.address(xbuf, 0)
                _gather(_ne.address(x, xb), xs3, dp, n)
                return dp

            return impl

        @overload(_dest, jit_options=jit_options)
        def _ov_dest(xp, ep):
            if isinstance(ep, types.NoneType):
                return lambda xp, ep: xp
            return lambda xp, ep: ep

        @overload(_in_place, jit_options=jit_options)
        def _ov_in_place(ep):
            if isinstance(ep, types.NoneType):
                return lambda ep: True
            return lambda ep: False

        @overload(_skip, jit_options=jit_options)
        def _ov_skip(p, j):
            if isinstance(p, types.NoneType):
                return lambda p, j: None
            return lambda p, j: _ne.address(p, j)

        @overload(_emptied, jit_options=jit_options)
        def _ov_emptied(fns, lo, hi):
            if isinstance(fns, types.NoneType):
                return lambda fns, lo, hi: False
            return lambda fns, lo, hi: lo >= hi

        @overload(_custom_bufs, jit_options=jit_options)
        def _ov_custom_bufs(fns, N, bias):
            if isinstance(fns, types.NoneType):
                return lambda fns, N, bias: (None, None, None)

            def impl(fns, N, bias):
                pbuf = np.zeros((N + 7) // 8 if fns[_C_PRED] != 0 else 0, np.uint64)
                zbuf = np.empty(N if fns[_C_SCORE] != 0 else 0, bias.dtype)
                return pbuf, pbuf.view(np.uint8), zbuf

            return impl

        @overload(_custom_row, jit_options=jit_options)
        def _ov_custom_row(fns, p, r, b, h, q, lo, hi, xp, kp, bp, sc, hk, hb, inplace, bufs, nxt):
            if isinstance(fns, types.NoneType):

                def identity(
                    fns, p, r, b, h, q, lo, hi, xp, kp, bp, sc, hk, hb, inplace, bufs, nxt
                ):
                    return lo, hi, xp, kp, bp, sc, hk, hb, inplace

                return identity

            def impl(fns, p, r, b, h, q, lo, hi, xp, kp, bp, sc, hk, hb, inplace, bufs, nxt):
                pbuf, p8, zbuf = bufs
                hg = h + p[_P_H0]
                bg, qg, k0 = b + fns[_C_B0], q + fns[_C_Q0], fns[_C_K0]
                n = hi - lo
                pred = fns[_C_PRED]
                if pred != 0:
                    pp = _ne.address(p8, 0)
                    if _ne.call_row_fn(pred, pp, bg, hg, qg, lo + k0, n) != 0:
                        fns[_C_ERROR] = 1 + 2 * r
                        return lo, lo, xp, kp, bp, sc, hk, hb, inplace
                    if hk:
                        _and_into(pp, kp, n)
                    cnt, first, last = _kept_span(pp, _ne.address(pbuf, 0), n)
                    if cnt == 0:
                        return lo, lo, xp, kp, bp, sc, hk, hb, inplace
                    xp = _ne.address(xp, first)
                    bp = _ne.address(bp, first)
                    kp = _ne.address(pp, first)
                    hk = cnt < last + 1 - first  # dropped keys left inside the range
                    hi = lo + last + 1
                    lo = lo + first
                    narrowed = hi - lo < n
                    n = hi - lo
                    x, b1, h1, q1, r1, x_unit, xline = nxt
                    if narrowed and x_unit and r + 1 < r1:
                        # Narrowed rows defeat the hardware prefetchers, and the next
                        # row's range is not known before its predicate has run: ask
                        # for this row's range of the next row (predicates change
                        # little from one query to the next).
                        xn = _ne.address(x, _offset(p, _P_X, b1, h1, q1))
                        _prefetch_read(xn, lo, hi, xline)
                score = fns[_C_SCORE]
                if score != 0:
                    zp = _ne.address(zbuf, 0)
                    _score_input(xp, bp, zp, n, sc, hb)
                    if _ne.call_row_fn(score, zp, bg, hg, qg, lo + k0, n) != 0:
                        fns[_C_ERROR] = 2 + 2 * r
                        return lo, lo, xp, kp, bp, sc, hk, hb, inplace
                    return lo, hi, zp, kp, bp, _cval(bp, 1.0), hk, False, False
                return lo, hi, xp, kp, bp, sc, hk, hb, inplace

            return impl

        g = globals()
        for name in _JIT_LOOP:
            g[name] = numba.njit(fastmath=False if name in _STRICT else flags)(g[name])
        g["_prange"] = numba.prange
        _installed = True


def _signature(dtype: np.dtype, custom: bool = False):
    import numba

    info = _DTYPE_INFO[dtype]
    types = numba.core.types
    st = numba.from_dtype(dtype if info.view is None else info.view)
    ct = numba.from_dtype(info.compute)

    def ro(t):
        return types.Array(t, 1, "C", readonly=True)

    args = [
        ro(st),  # x       IN
        types.Array(st, 1, "C"),  # out OUT
        ro(types.uint8),  # keep    IN (bool bytes)
        ro(ct),  # bias    IN
        ro(types.int64),  # bounds  IN
        ro(types.int64),  # params  IN
        types.float64,  # scale   IN
    ]
    if custom:
        args.append(types.Array(types.int64, 1, "C"))  # fns  IN (addresses) / OUT (error)
    return types.void(*args)


def _get_kernel(dtype: np.dtype, parallel: bool, custom: bool = False):
    """The kernel for ``dtype``; the first use of a dtype loads both variants."""
    dt = _check_dtype(dtype)
    k = _kernels.get(_key(dt, parallel, custom))
    if k is None:
        if custom:  # only the variant needed (the plain ones come in pairs)
            with _lock:
                _build(dt, parallel, True)
        else:
            compile(dt)
        k = _kernels[_key(dt, parallel, custom)]
    return k


def _build(dtype: np.dtype, parallel: bool, custom: bool = False) -> None:
    key = _key(dtype, parallel, custom)
    if key in _kernels:
        return
    _install()
    import numba

    global _entry_points
    if _entry_points is None:
        try:
            with open(_ne.__file__, "rb") as f:
                stamp = hashlib.sha256(f.read()).hexdigest()
        except OSError:  # no source next to the module: nothing to track
            stamp = ""
        _entry_points = _kernel_functions(stamp)
    fn = _entry_points[2 * custom + parallel]
    options = {"parallel": parallel, "fastmath": set(LOOP_FASTMATH)}
    try:
        _kernels[key] = numba.njit(_signature(dtype, custom), cache=True, **options)(fn)
    except RuntimeError as exc:
        if "cannot cache" not in str(exc):
            raise
        # A read-only install with no writable cache directory: compile every time.
        global _warned_no_cache
        if not _warned_no_cache:
            _warned_no_cache = True
            warnings.warn(
                f"fastmask: Numba cannot cache its kernels here ({exc}); they are compiled "
                "in each new process. Set NUMBA_CACHE_DIR to a writable directory to cache them.",
                RuntimeWarning,
                stacklevel=2,
            )
        _kernels[key] = numba.njit(_signature(dtype, custom), cache=False, **options)(fn)


def _check_dtype(dtype) -> np.dtype:
    """``dtype`` as a NumPy dtype the kernels take (registering bfloat16 when first seen)."""
    dt = np.dtype(dtype)
    if dt not in _DTYPE_INFO:
        # bfloat16 is registered lazily: importing ml_dtypes takes most of a second,
        # and a bfloat16 dtype here means the caller has imported it already.
        if not _dtypes.is_bfloat16(dt):  # (a byte-swapped one is not: '>V2')
            raise TypeError(
                "fastmask numba kernel: dtype must be float16, bfloat16, float32 or float64 "
                f"in native byte order, not {dt}"
            )
        _DTYPE_INFO.setdefault(dt, _dtype_info(dt, np.dtype(np.int16)))
    return dt


def supports(dtype) -> bool:
    """Whether the kernels take logits of ``dtype`` (importing nothing, compiling nothing)."""
    try:
        _check_dtype(dtype)
    except TypeError:
        return False
    return True


def compile(dtype, custom: bool = False) -> None:
    """Compile (or load from Numba's disk cache) both kernels for ``dtype``.

    The serial and the parallel kernel; :func:`masked_softmax_4d` does this
    on the first call for a dtype. Safe to call from several threads.

    Parameters
    ----------
    dtype : dtype-like
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64 (the
        dtype of ``x``).
    custom : bool
        The variants that run user predicates and score functions (used by
        the first call that has one) instead of the plain ones.

    Raises
    ------
    TypeError
        For any other dtype, or a non-native byte order.
    """
    dt = _check_dtype(dtype)
    with _lock:
        _build(dt, False, custom)
        _build(dt, True, custom)


def is_compiled(dtype, custom: bool = False) -> bool:
    """True once both kernels (serial and parallel) for ``dtype`` are loaded here.

    ``custom``: whether a variant that runs user predicates and score
    functions is loaded (those are built one at a time, when first needed).
    """
    dt = _check_dtype(dtype)
    if custom:
        return _key(dt, False, True) in _kernels or _key(dt, True, True) in _kernels
    return _key(dt, False, False) in _kernels and _key(dt, True, False) in _kernels


# ==========================================================================
# the Python side: flat buffers, offsets, strides
# ==========================================================================


def _readonly_zeros(dtype) -> np.ndarray:
    a = np.zeros(1, dtype=dtype)
    a.flags.writeable = False
    return a


class _DtypeInfo(NamedTuple):
    """How logits of one dtype reach the jitted code."""

    key: str  # the dtype's name: the kernels' key in ``_kernels``
    view: np.dtype | None  # the storage the jitted code sees (16-bit floats as their bits)
    compute: np.dtype
    keep0: np.ndarray  # dummies passed for keep / bias / bounds when absent
    bias0: np.ndarray
    bounds0: np.ndarray


def _dtype_info(dt: np.dtype, view: np.dtype | None) -> _DtypeInfo:
    ct = _dtypes.compute_dtype(dt)
    return _DtypeInfo(
        dt.name, view, ct, _readonly_zeros(np.uint8), _readonly_zeros(ct), _readonly_zeros(np.int64)
    )


# Keyed by the dtype itself, not its one-letter code: ml_dtypes' bfloat16 shares
# 'E' with its uint1. uint16 / int16 tell float16 from bfloat16 in the compiled code.
_DTYPE_INFO: dict[np.dtype, _DtypeInfo] = {
    _dtypes.FLOAT16: _dtype_info(_dtypes.FLOAT16, np.dtype(np.uint16)),
    _dtypes.FLOAT32: _dtype_info(_dtypes.FLOAT32, None),
    _dtypes.FLOAT64: _dtype_info(_dtypes.FLOAT64, None),
}


def _flat(a: np.ndarray, view_dtype=None) -> tuple[np.ndarray, tuple]:
    """A 1-D C-contiguous view starting at 4-D ``a``'s lowest-addressed element.

    Returns it and ``(offset, s0, s1, ...)``: the element offset of
    ``a[0, 0, ...]`` in it and ``a``'s element strides (0 on axes of length 1
    or stride 0, negative on reversed axes). ``a`` must be non-empty and its
    strides multiples of its itemsize.
    """
    isz = a.itemsize
    if a.flags.c_contiguous:
        f = a.reshape(-1)
        s0, s1, s2, s3 = a.strides
        geo = (0, s0 // isz, s1 // isz, s2 // isz, s3 // isz)
    else:
        sh = a.shape
        idx = []
        off = 0
        span = 1
        es = []
        for n, s in zip(sh, a.strides, strict=True):
            if n == 1 or s == 0:
                idx.append(0)
                es.append(0)
            else:
                e = s // isz
                es.append(e)
                if e < 0:
                    idx.append(slice(None, None, -1))
                    off -= (n - 1) * e
                    span -= (n - 1) * e
                else:
                    idx.append(slice(None))
                    span += (n - 1) * e
        idx.append(Ellipsis)  # an array even when every axis is indexed away
        r = a[tuple(idx)]  # positive strides, starts at the lowest address
        if r.flags.c_contiguous:
            f = r.reshape(-1)
        else:
            f = np.lib.stride_tricks.as_strided(r, shape=(span,), strides=(isz,))
        geo = (off, *es)
    if view_dtype is not None:
        f = f.view(view_dtype)
    return f, geo


def masked_softmax_4d(
    x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, predicate=None, score=None,
    origin=(0, 0, 0),
) -> None:  # fmt: skip
    """Masked softmax over the last axis of a 4-D ``(B, H, Q, N)`` array.

    Parameters
    ----------
    x4 : ndarray, shape (B, H, Q, N)
        Logits; float16, bfloat16 (``ml_dtypes``), float32 or float64 in
        native byte order. Any strides (multiples of the itemsize; negative,
        or 0 on broadcast axes); may be read-only.
    out4 : ndarray, shape (B, H, Q, N)
        Result, same dtype, writable; either exactly ``x4``'s memory (same
        data pointer and strides: in place) or not overlapping it.
    scale : float
        Finite; logits are multiplied by it first.
    keep4 : ndarray of bool, shape (B, H, Q, N), or None
        True = keep. Any strides (a broadcast view is fine).
    bias4 : ndarray, shape (B, H, Q, N), or None
        In the compute dtype (float32 for float16/bfloat16/float32 ``x4``,
        float64 for float64); added after scaling; may hold ``-inf``. Any
        strides.
    bounds4 : int64 ndarray, shape (B, H, Q, 2), or None
        Per row ``lo, hi``: only keys ``lo <= k < hi`` (clipped to
        ``[0, N)``) can be kept; the others are never read and are written 0.
        Any strides.
    h0 : int
        Global index of head 0: row functions see head ``h0 + h``.
    nthreads : int
        1 runs the serial kernel; otherwise ``min(nthreads, rows)`` chunks of
        rows run in a ``prange`` (the caller configures Numba's threads).
    predicate, score : object, optional
        A user predicate / score function (``fastmask.masks.custom``): an
        object with ``row_function(compute_dtype)``, the address of its row
        function (:func:`predicate_row_function`, :func:`score_row_function`),
        and ``row_failed(b, h, q, n)``, which raises the error of a row on
        which the row function failed. With either, the custom kernels run.
    origin : tuple of int
        ``(b0, q0, k0)`` added to the batch, query and key indices the row
        functions see: ``x4`` is a tile of a larger grid (attention).

    Notes
    -----
    Per row: ``z = x*scale + bias`` on kept keys; ``m`` = max over kept ``z``
    ignoring NaN. No kept key, or ``m == -inf`` with no NaN: the row is
    zeros. A kept NaN or ``+inf``: the whole row is NaN. Otherwise
    ``exp(z - m) / sum``, exactly 0 on masked keys. float16 and bfloat16
    are computed in float32 and rounded to nearest even.

    With a predicate, keys it drops are masked like ``keep4`` False; with a
    score function, ``z`` is replaced by
    ``score(z, b0 + b, h0 + h, q0 + q, k0 + k)`` before masking. If a row
    function fails on some row, the kernel finishes (that row is written as
    zeros) and ``row_failed`` raises afterwards.

    Compiles the kernels for ``x4``'s dtype on first use (see :func:`compile`).
    """
    B, H, Q, N = x4.shape
    rows = B * H * Q
    if rows == 0 or N == 0:
        return
    info = _DTYPE_INFO.get(x4.dtype)
    if info is None:
        info = _DTYPE_INFO[_check_dtype(x4.dtype)]
    key, view, ctype, kd, bd, dd = info
    if not (
        x4.flags.aligned
        and out4.flags.aligned
        and (bias4 is None or bias4.flags.aligned)
        and (bounds4 is None or bounds4.flags.aligned)
    ):
        _unaligned(x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, predicate, score, origin)
        return
    xf, xg = _flat(x4, view)
    of, og = _flat(out4, view)
    flags = _F_INPLACE if (out4 is x4 or np.may_share_memory(x4, out4)) else 0
    if keep4 is None:
        kf, kg = kd, _NO_GEO
    else:
        kf, kg = _flat(keep4, np.uint8)
        flags |= _F_KEEP
    if bias4 is None:
        bf, bg = bd, _NO_GEO
    else:
        if bias4.dtype != ctype:
            raise TypeError(f"bias4 must be {ctype} for {x4.dtype} x4, not {bias4.dtype}")
        bf, bg = _flat(bias4)
        flags |= _F_BIAS
    if bounds4 is None:
        df, dg = dd, _NO_GEO
    else:
        df, dg = _flat(bounds4)
        flags |= _F_BOUNDS
    if out4.nbytes >= STREAM_MIN_BYTES:
        flags |= _F_STREAM
    nchunks = min(nthreads, rows)
    params = np.array((B, H, Q, N, *xg, *og, *kg, *bg, *dg, flags, h0, nchunks), dtype=np.int64)
    if predicate is not None or score is not None:
        b0, q0, k0 = origin
        fns = np.array((0, 0, 0, b0, q0, k0), np.int64)
        if predicate is not None:
            fns[_C_PRED] = predicate.row_function(ctype)
        if score is not None:
            fns[_C_SCORE] = score.row_function(ctype)
        _get_kernel(x4.dtype, nchunks > 1, True)(xf, of, kf, bf, df, params, float(scale), fns)
        if fns[_C_ERROR]:
            which, r = (fns[_C_ERROR] - 1) % 2, (fns[_C_ERROR] - 1) // 2
            failed = predicate if which == 0 else score
            failed.row_failed(b0 + r // (H * Q), h0 + (r // Q) % H, q0 + r % Q, k0 + N)
        return
    kern = _kernels.get((key, nchunks > 1))
    if kern is None:
        kern = _get_kernel(x4.dtype, nchunks > 1)
    kern(xf, of, kf, bf, df, params, float(scale))


_NO_GEO = (0, 0, 0, 0, 0)


def _unaligned(
    x4, out4, scale, keep4, bias4, bounds4, h0, nthreads, predicate=None, score=None,
    origin=(0, 0, 0),
) -> None:  # fmt: skip
    """Operands not aligned to their itemsize (rare): run on aligned copies."""

    def aligned(a):
        return a if a is None or a.flags.aligned else a.copy()

    out = out4 if out4.flags.aligned else np.empty(out4.shape, out4.dtype)
    masked_softmax_4d(
        aligned(x4), out, scale, keep4, aligned(bias4), aligned(bounds4), h0, nthreads,
        predicate, score, origin,
    )  # fmt: skip
    if out is not out4:
        np.copyto(out4, out)


# ==========================================================================
# user functions: row functions and whole-grid evaluation
# ==========================================================================


def predicate_row_function(pred):
    """Compile a predicate into a row function (a Numba ``cfunc``).

    Parameters
    ----------
    pred : numba dispatcher
        ``pred(b, h, q, k) -> bool`` (all int64).

    Returns
    -------
    cfunc
        ``int64 row(uint8 *keep, b, h, q, k0, n)``: ``keep[j] = pred(b, h, q,
        k0 + j)`` for ``j < n``; returns 0, or 1 if ``pred`` raised. Its
        ``.address`` goes to the kernels; keep the object alive meanwhile.

    Raises
    ------
    TypeError
        When Numba cannot compile ``pred`` for int64 indices;
        :class:`ReturnTypeError` when it types its result as something other
        than a bool.
    """
    _install()
    import numba
    from numba.core import types

    i64 = types.int64
    rtype = _compiled_return_type(pred, (i64, i64, i64, i64))
    if not isinstance(rtype, types.Boolean):
        raise ReturnTypeError(f"must return a bool, but Numba types its result as {rtype}")

    def row(keep, b, h, q, k0, n):
        try:
            for j in range(n):
                keep[j] = pred(b, h, q, k0 + j)
        except Exception:
            return 1
        return 0

    return numba.cfunc(types.int64(types.CPointer(types.uint8), i64, i64, i64, i64, i64))(row)


def score_row_function(fn, compute_dtype):
    """Compile a score function into a row function of ``compute_dtype``.

    Parameters
    ----------
    fn : numba dispatcher
        ``fn(score, b, h, q, k) -> score`` (score in the compute dtype,
        indices int64; the result is converted to the compute dtype).
    compute_dtype : dtype
        float32 or float64.

    Returns
    -------
    cfunc
        ``int64 row(T *z, b, h, q, k0, n)``: ``z[j] = fn(z[j], b, h, q,
        k0 + j)`` for ``j < n``; returns 0, or 1 if ``fn`` raised.

    Raises
    ------
    TypeError
        When Numba cannot compile ``fn``; :class:`ReturnTypeError` when its
        result is not a number.
    """
    _install()
    import numba
    from numba.core import types

    ct = np.dtype(compute_dtype)
    nt = types.float64 if ct == np.float64 else types.float32
    cast = np.float64 if ct == np.float64 else np.float32
    i64 = types.int64
    rtype = _compiled_return_type(fn, (nt, i64, i64, i64, i64))
    if not isinstance(rtype, (types.Float, types.Integer)) or isinstance(rtype, types.Boolean):
        raise ReturnTypeError(
            f"must return the new score (a number), but Numba types its result as {rtype}"
        )

    def row(z, b, h, q, k0, n):
        try:
            for j in range(n):
                z[j] = cast(fn(z[j], b, h, q, k0 + j))
        except Exception:
            return 1
        return 0

    return numba.cfunc(types.int64(types.CPointer(nt), i64, i64, i64, i64, i64))(row)


class ReturnTypeError(TypeError):
    """A user function whose result Numba types as the wrong kind of value."""


def _compiled_return_type(dispatcher, argtypes):
    """Compile ``dispatcher`` for ``argtypes``; the return type Numba inferred."""
    dispatcher.compile(argtypes)
    for sig in dispatcher.nopython_signatures:
        if tuple(sig.args) == tuple(argtypes):
            return sig.return_type
    raise TypeError(f"Numba compiled no version for {argtypes}")  # not expected


_grids = None  # (predicate grid, score grid) dispatchers, compiled on first use
_grids_ready = [False, False]  # whether each has run (compiled) in this process


def grids_ready() -> bool:
    """True once :func:`predicate_grid` and :func:`score_grid` have been compiled here."""
    return all(_grids_ready)


def _grid_functions():
    global _grids
    if _grids is None:
        _install()
        import numba

        def pred_grid(addr, keep, h0):
            B, H, Q, N = keep.shape
            flat = keep.reshape(-1)
            r = 0
            for b in range(B):
                for h in range(H):
                    for q in range(Q):
                        if _ne.call_row_fn(addr, _ne.address(flat, r * N), b, h0 + h, q, 0, N):
                            return r
                        r += 1
            return -1

        def score_grid(addr, z, h0):
            B, H, Q, N = z.shape
            flat = z.reshape(-1)
            r = 0
            for b in range(B):
                for h in range(H):
                    for q in range(Q):
                        if _ne.call_row_fn(addr, _ne.address(flat, r * N), b, h0 + h, q, 0, N):
                            return r
                        r += 1
            return -1

        _grids = (numba.njit(pred_grid), numba.njit(score_grid))
    return _grids


def predicate_grid(row_fn, shape4, h0=0):
    """Evaluate a predicate's row function over a whole ``(B, H, Q, N)`` grid.

    Returns ``(keep, failed)``: the bool array, and the first row (flat index
    over ``(B, H, Q)``) on which the row function failed, or -1.
    """
    keep = np.zeros(shape4, np.uint8)
    if keep.size == 0:
        return keep.view(np.bool_), -1
    failed = _grid_functions()[0](row_fn.address, keep, h0)
    _grids_ready[0] = True
    return keep.view(np.bool_), int(failed)


def score_grid(row_fn, z4, h0=0):
    """Apply a score function's row function in place to C-contiguous ``(B, H, Q, N)`` ``z4``.

    ``z4`` is in the row function's compute dtype. Returns the first row on
    which it failed, or -1.
    """
    if z4.size == 0:
        return -1
    failed = _grid_functions()[1](row_fn.address, z4, h0)
    _grids_ready[1] = True
    return int(failed)
