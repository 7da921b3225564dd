# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""Cython + OpenMP masked softmax kernels (the engine of the ``cython`` backend).

One entry point, :func:`masked_softmax_4d`, does the masked softmax of every row of a
``(B, H, Q, N)`` array along its last axis, reading keep masks, biases and per-row key
bounds through their strides (broadcast views are never expanded). The arithmetic of a
row lives in ``_softmax_row.h`` (vectorised C, compiled for several x86 ISA levels);
this module validates the arguments, lays out per-thread scratch and runs the rows,
serially or in an OpenMP ``prange``.

The release build sets the directives above; ``FASTMASK_BOUNDSCHECK=1 python setup.py
build_ext`` builds a debug variant with boundscheck/wraparound on and C range asserts.

At import the best kernel variant for this CPU is chosen ("avx512", "avx2" or the
baseline "generic"); the environment variable ``FASTMASK_ISA`` forces one (debugging).
Fork: GNU libgomp's thread pool does not survive ``fork()``; see :func:`before_fork`
and :func:`after_fork_in_child`.
"""

from cython.parallel cimport prange
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t, uint16_t
from libc.stdlib cimport free, malloc

cimport numpy as cnp
import sys

import numpy as np

cnp.import_array()


cdef extern from "_softmax_row.h" nogil:
    ctypedef struct fm_row_args:
        Py_ssize_t n
        Py_ssize_t x_stride
        Py_ssize_t out_stride
        Py_ssize_t keep_stride
        Py_ssize_t bias_stride
        Py_ssize_t pf_dist
        Py_ssize_t off_x
        Py_ssize_t off_e
        Py_ssize_t off_b
        Py_ssize_t off_k
        double scale
        int has_keep
        int has_bias
        int stream
        const char *x_lo
        const char *x_hi
        const char *o_lo
        const char *o_hi
        const char *k_lo
        const char *k_hi
        const char *b_lo
        const char *b_hi

    ctypedef void (*fm_row_fn)(const fm_row_args *a, const char *x, char *o, const char *k,
                               const char *b, Py_ssize_t lo, Py_ssize_t hi,
                               char *scratch) noexcept nogil
    ctypedef void (*fm_row2_fn)(const fm_row_args *a, const char *x0, char *o0, Py_ssize_t lo0,
                                Py_ssize_t hi0, const char *x1, char *o1, Py_ssize_t lo1,
                                Py_ssize_t hi1, char *scratch) noexcept nogil
    ctypedef void (*fm_map_f32_fn)(const float *inp, float *out, Py_ssize_t n) noexcept nogil
    ctypedef void (*fm_map_f64_fn)(const double *inp, double *out, Py_ssize_t n) noexcept nogil
    ctypedef void (*fm_h2f_fn)(const uint16_t *inp, float *out, Py_ssize_t n) noexcept nogil
    ctypedef void (*fm_f2h_fn)(const float *inp, uint16_t *out, Py_ssize_t n) noexcept nogil

    ctypedef struct fm_isa_t:
        const char *name
        fm_map_f32_fn exp_f32
        fm_map_f64_fn exp_f64
        fm_h2f_fn h2f
        fm_f2h_fn f2h
        fm_h2f_fn bf2f
        fm_f2h_fn f2bf

    int fm_thread_num()
    int fm_openmp_version()
    int fm_debug_build()
    int fm_openmp_pause()
    void fm_region_enter()
    void fm_region_exit()
    int fm_regions_active()
    int fm_isa_count()
    const char *fm_isa_name(int i)
    int fm_isa_supported(int i)
    int fm_isa_select(int i)
    int fm_isa_current()
    const fm_isa_t *fm_isa()
    int fm_bf16_native()
    int fm_bf16_allow_native(int allow)
    fm_row_fn fm_row_for(int dtype_code)
    fm_row2_fn fm_row2_for(int dtype_code, const fm_row_args *a)
    int fm_can_stream(int dtype_code)
    void fm_store_fence()
    int FM_X86_MV


# Everything a row needs: the shared C arguments plus the outer (b, h, q) strides.
ctypedef struct _plan:
    fm_row_args args
    fm_row_fn fn
    fm_row2_fn fn2  # two plain short rows at once, or NULL
    const char *x
    char *o
    const char *k
    const char *b
    const char *bnd
    Py_ssize_t H
    Py_ssize_t Q
    Py_ssize_t xst[3]
    Py_ssize_t ost[3]
    Py_ssize_t kst[3]
    Py_ssize_t bst[3]
    Py_ssize_t dst[4]


_TYPE_NAMES = {cnp.NPY_BOOL: "bool", cnp.NPY_FLOAT16: "float16", cnp.NPY_FLOAT: "float32",
               cnp.NPY_DOUBLE: "float64", cnp.NPY_INT64: "int64"}

# NumPy's type number of ml_dtypes.bfloat16, or -1 until known. It is a user-defined
# dtype, numbered when ml_dtypes registers it, so it is looked up at run time: on the
# first array that is none of the built-in types (importing ml_dtypes here, at module
# import, would cost most of a second; an array of its dtype implies it is imported).
cdef int _bf16_num = -1


cdef int _bfloat16_num() except -2:
    global _bf16_num
    if _bf16_num < 0:
        ml = sys.modules.get("ml_dtypes")
        if ml is not None:
            _bf16_num = np.dtype(ml.bfloat16).num
    return _bf16_num


cdef str _type_name(int type_num):
    if type_num == _bf16_num and type_num >= 0:
        return "bfloat16"
    return _TYPE_NAMES.get(type_num, str(type_num))

# What _set_bf16_native() last allowed (the C flag itself is not readable from here).
_bf16_native_allowed = True
# Set by after_fork_in_child(): this process must not enter an OpenMP region again.
cdef bint _serial_only = False
# Outputs at least this large are written with streaming stores where the layout
# allows (float32, AVX-512): far larger than the caches, they would only evict.
cdef Py_ssize_t _STREAM_MIN_BYTES = 32 << 20
# Set by before_fork() when it freed the OpenMP pool with no region in flight: the
# child of the fork that follows may keep using OpenMP.
cdef bint _pool_paused_for_fork = False


cdef inline Py_ssize_t _round64(Py_ssize_t nbytes) noexcept nogil:
    return (nbytes + 63) & ~(<Py_ssize_t>63)


cdef inline Py_ssize_t _clip(int64_t v, Py_ssize_t n) noexcept nogil:
    if v <= 0:
        return 0
    if v >= n:
        return n
    return <Py_ssize_t>v


cdef inline void _row_span(const _plan *p, Py_ssize_t b, Py_ssize_t h, Py_ssize_t q,
                           Py_ssize_t *lo, Py_ssize_t *hi) noexcept nogil:
    # OUT lo, hi: row (b, h, q)'s kept span from the bounds (all keys without them).
    cdef const char *bp
    lo[0] = 0
    hi[0] = p.args.n
    if p.bnd != NULL:
        bp = p.bnd + b * p.dst[0] + h * p.dst[1] + q * p.dst[2]
        lo[0] = _clip((<const int64_t *>bp)[0], p.args.n)
        hi[0] = _clip((<const int64_t *>(bp + p.dst[3]))[0], p.args.n)


cdef inline void _softmax_rows(const _plan *p,   # IN  the call's arrays and strides
                               Py_ssize_t r0,    # IN  first flat row over (B, H, Q)
                               Py_ssize_t r1,    # IN  one past the last row
                               char *scratch     # scratch rows of the running thread
                               ) noexcept nogil:
    # OUT p.o rows [r0, r1): their masked softmax. The row index is split into
    # (b, h, q) once and then counted up: two divisions per row cost as much as
    # the softmax of a short row.
    cdef Py_ssize_t q = r0 % p.Q
    cdef Py_ssize_t t = r0 // p.Q
    cdef Py_ssize_t h = t % p.H
    cdef Py_ssize_t b = t // p.H
    cdef Py_ssize_t r, lo, hi, lo2, hi2
    cdef const char *xr
    cdef char *orow
    cdef const char *kr = NULL
    cdef const char *br = NULL
    cdef bint pending = False  # a short row waiting for its pair
    for r in range(r0, r1):
        _row_span(p, b, h, q, &lo, &hi)
        if p.fn2 != NULL:
            if pending:
                p.fn2(&p.args, xr, orow, lo2, hi2,
                      p.x + b * p.xst[0] + h * p.xst[1] + q * p.xst[2],
                      p.o + b * p.ost[0] + h * p.ost[1] + q * p.ost[2], lo, hi, scratch)
            else:
                xr = p.x + b * p.xst[0] + h * p.xst[1] + q * p.xst[2]
                orow = p.o + b * p.ost[0] + h * p.ost[1] + q * p.ost[2]
                lo2 = lo
                hi2 = hi
            pending = not pending
        else:
            if p.k != NULL:
                kr = p.k + b * p.kst[0] + h * p.kst[1] + q * p.kst[2]
            if p.b != NULL:
                br = p.b + b * p.bst[0] + h * p.bst[1] + q * p.bst[2]
            p.fn(&p.args,
                 p.x + b * p.xst[0] + h * p.xst[1] + q * p.xst[2],
                 p.o + b * p.ost[0] + h * p.ost[1] + q * p.ost[2],
                 kr, br, lo, hi, scratch)
        q += 1
        if q == p.Q:
            q = 0
            h += 1
            if h == p.H:
                h = 0
                b += 1
    if pending:  # an odd row out
        p.fn(&p.args, xr, orow, NULL, NULL, lo2, hi2, scratch)
    if p.args.stream:
        fm_store_fence()


cdef inline void _extent(cnp.ndarray a, const char **lo, const char **hi) noexcept:
    """Byte range [lo, hi) that array a can touch (lo == hi when it is empty)."""
    cdef int i
    cdef Py_ssize_t d, s
    cdef const char *base = PyArray_BYTES_const(a)
    cdef const char *l = base
    cdef const char *u = base + cnp.PyArray_ITEMSIZE(a)
    for i in range(cnp.PyArray_NDIM(a)):
        d = cnp.PyArray_DIMS(a)[i]
        if d == 0:
            lo[0] = base
            hi[0] = base
            return
        s = cnp.PyArray_STRIDES(a)[i] * (d - 1)
        if s < 0:
            l += s
        else:
            u += s
    lo[0] = l
    hi[0] = u


cdef inline const char *PyArray_BYTES_const(cnp.ndarray a) noexcept:
    return <const char *>cnp.PyArray_BYTES(a)


cdef bint _self_overlapping(cnp.ndarray a) noexcept:
    """True when two elements of a may share memory (checked by sorted strides; a few
    exotic non-overlapping interleavings count as overlapping too)."""
    cdef Py_ssize_t st[4]
    cdef Py_ssize_t dm[4]
    cdef Py_ssize_t span = cnp.PyArray_ITEMSIZE(a), s, d
    cdef int nd = 0, i, j
    for i in range(4):
        d = cnp.PyArray_DIMS(a)[i]
        if d == 0:
            return False
        if d > 1:
            s = cnp.PyArray_STRIDES(a)[i]
            st[nd] = -s if s < 0 else s
            dm[nd] = d
            nd += 1
    for i in range(1, nd):  # insertion sort by |stride|
        j = i
        while j > 0 and st[j - 1] > st[j]:
            st[j - 1], st[j] = st[j], st[j - 1]
            dm[j - 1], dm[j] = dm[j], dm[j - 1]
            j -= 1
    for i in range(nd):
        if st[i] < span:
            return True
        span += st[i] * (dm[i] - 1)
    return False


cdef int _check_no_overlap(cnp.ndarray out4, object other, str name) except -1:
    """out4 must not share memory with an input other than x (exact test only when the
    byte extents intersect, which is rare)."""
    cdef const char *a0 = NULL
    cdef const char *a1 = NULL
    cdef const char *b0 = NULL
    cdef const char *b1 = NULL
    _extent(out4, &a0, &a1)
    _extent(<cnp.ndarray>other, &b0, &b1)
    if a0 < b1 and b0 < a1 and np.shares_memory(out4, other):
        raise ValueError(f"out4 shares memory with {name}")
    return 0


cdef int _check_operand(object a, str name, int type_num, cnp.npy_intp *shape,
                        int last) except -1:
    """a is a native, aligned ndarray of dtype type_num and shape shape[:3] + (last,)."""
    cdef cnp.ndarray arr
    cdef int i, t
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be None or a numpy.ndarray, not {type(a).__name__}")
    arr = <cnp.ndarray>a
    t = cnp.PyArray_TYPE(arr)
    if type_num == cnp.NPY_INT64 and cnp.PyArray_ITEMSIZE(arr) == 8 and (
            t == cnp.NPY_LONG or t == cnp.NPY_LONGLONG):
        t = type_num  # 'l' and 'q' are both int64 on LP64 platforms
    if t != type_num or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} has dtype {arr.dtype} ({arr.dtype.str}); expected native "
                        f"{_type_name(type_num)}")
    if cnp.PyArray_NDIM(arr) != 4:
        raise ValueError(f"{name} must be 4-D, got {cnp.PyArray_NDIM(arr)}-D")
    for i in range(3):
        if cnp.PyArray_DIMS(arr)[i] != shape[i]:
            break
    else:
        if cnp.PyArray_DIMS(arr)[3] == last:
            if not cnp.PyArray_ISALIGNED(arr):
                raise ValueError(f"{name} is not aligned")
            return 0
    raise ValueError(f"{name} has shape {(<object>arr).shape}; expected "
                     f"{(shape[0], shape[1], shape[2], last)}")


def masked_softmax_4d(cnp.ndarray x4 not None,   # IN  logits (B, H, Q, N)
                      cnp.ndarray out4 not None,  # OUT weights, x4's shape and dtype
                      double scale,               # IN  multiplies the logits first
                      keep4,                      # IN  None or bool (B, H, Q, N)
                      bias4,                      # IN  None or compute dtype (B, H, Q, N)
                      bounds4,                    # IN  None or int64 (B, H, Q, 2)
                      Py_ssize_t h0,              # IN  offset of h (for per-head strategies)
                      int nthreads):              # IN  >= 1; 1 runs no OpenMP region
    """Masked softmax along the last axis of a 4-D array, written to ``out4``.

    For each row ``(b, h, q)``: ``z = x4[b, h, q] * scale (+ bias4[b, h, q])``; key
    ``k`` is kept when ``keep4[b, h, q, k]`` (if given) and ``lo <= k < hi`` with
    ``lo, hi = bounds4[b, h, q]`` (if given, clipped to ``[0, N)``). Masked keys get
    exactly 0; a row with nothing kept (or only ``-inf``) is all zeros; a kept NaN or
    ``+inf`` makes the whole row NaN. float16 and bfloat16 (``ml_dtypes.bfloat16``) are
    computed in float32 and rounded to nearest even.

    Parameters
    ----------
    x4 : ndarray, float16, bfloat16, float32 or float64, 4-D
        Any strides (negative and 0 included); may be read-only.
    out4 : ndarray
        Same shape and dtype as ``x4``, writable, not overlapping itself; either
        exactly ``x4``'s memory (in place) or disjoint from it and from the other inputs.
    scale : float
        Finite.
    keep4 : ndarray of bool or None
        True = keep; any strides (broadcast views welcome).
    bias4 : ndarray or None
        float32 for float16/bfloat16/float32 ``x4``, float64 for float64 ``x4``; any
        strides.
    bounds4 : ndarray of int64 or None
        Shape ``(B, H, Q, 2)``: per-row ``[lo, hi)`` of the keys that may be kept.
    h0 : int
        Added to ``h`` by per-head strategies (reserved).
    nthreads : int
        Threads to use (at most the number of rows); 1 runs serially.

    Raises
    ------
    TypeError
        Wrong dtypes or non-ndarray operands.
    ValueError
        Wrong shapes, read-only or self-overlapping ``out4``, overlap between
        ``out4`` and an input, misaligned data, non-finite ``scale``, ``nthreads < 1``.
    """
    cdef int tn = cnp.PyArray_TYPE(x4)
    cdef int ctn, dcode, i
    cdef Py_ssize_t item, citem
    cdef cnp.npy_intp *shape
    cdef Py_ssize_t B, H, Q, N, rows, per, c, chunks
    cdef int nt
    cdef bint inplace
    cdef _plan p
    cdef char *scratch = NULL
    cdef double stack_scratch[1024]  # small calls need no malloc
    cdef char *base
    cdef Py_ssize_t pitch, ahead
    cdef cnp.ndarray a

    # ---- dtypes, shapes, flags (cheap: flag and pointer reads only)
    if tn == cnp.NPY_FLOAT:
        dcode, ctn, item, citem = 1, cnp.NPY_FLOAT, 4, 4
    elif tn == cnp.NPY_DOUBLE:
        dcode, ctn, item, citem = 2, cnp.NPY_DOUBLE, 8, 8
    elif tn == cnp.NPY_FLOAT16:
        dcode, ctn, item, citem = 0, cnp.NPY_FLOAT, 2, 4
    elif tn == _bfloat16_num():
        dcode, ctn, item, citem = 3, cnp.NPY_FLOAT, 2, 4
    else:
        raise TypeError(f"x4 has dtype {x4.dtype}; expected float16, bfloat16, float32 "
                        "or float64")
    if not cnp.PyArray_ISNOTSWAPPED(x4):
        raise TypeError(f"x4 has non-native byte order ({x4.dtype.str})")
    if cnp.PyArray_NDIM(x4) != 4:
        raise ValueError(f"x4 must be 4-D, got {cnp.PyArray_NDIM(x4)}-D")
    shape = cnp.PyArray_DIMS(x4)
    B, H, Q, N = shape[0], shape[1], shape[2], shape[3]
    if cnp.PyArray_TYPE(out4) != tn or not cnp.PyArray_ISNOTSWAPPED(out4):
        raise TypeError(f"out4 has dtype {out4.dtype} ({out4.dtype.str}); expected native "
                        f"{x4.dtype}")
    if cnp.PyArray_NDIM(out4) != 4 or (cnp.PyArray_DIMS(out4)[0] != B or
                                       cnp.PyArray_DIMS(out4)[1] != H or
                                       cnp.PyArray_DIMS(out4)[2] != Q or
                                       cnp.PyArray_DIMS(out4)[3] != N):
        raise ValueError(f"out4 has shape {(<object>out4).shape}; expected {(<object>x4).shape}")
    if not cnp.PyArray_ISWRITEABLE(out4):
        raise ValueError("out4 is read-only")
    if not cnp.PyArray_ISALIGNED(x4) or not cnp.PyArray_ISALIGNED(out4):
        raise ValueError("x4 and out4 must be aligned")
    if not isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if nthreads < 1:
        raise ValueError(f"nthreads must be >= 1, got {nthreads}")
    if keep4 is not None:
        _check_operand(keep4, "keep4", cnp.NPY_BOOL, shape, N)
    if bias4 is not None:
        _check_operand(bias4, "bias4", ctn, shape, N)
    if bounds4 is not None:
        _check_operand(bounds4, "bounds4", cnp.NPY_INT64, shape, 2)

    rows = B * H * Q
    if rows == 0 or N == 0:
        return

    # ---- memory: out must not overlap itself, and x only as exactly x (in place)
    if _self_overlapping(out4):
        raise ValueError("out4 overlaps itself (a broadcast or self-overlapping view)")
    inplace = cnp.PyArray_BYTES(x4) == cnp.PyArray_BYTES(out4)
    if inplace:
        for i in range(4):
            if shape[i] > 1 and cnp.PyArray_STRIDES(x4)[i] != cnp.PyArray_STRIDES(out4)[i]:
                inplace = False
    _extent(x4, &p.args.x_lo, &p.args.x_hi)
    _extent(out4, &p.args.o_lo, &p.args.o_hi)
    if not inplace and p.args.o_lo < p.args.x_hi and p.args.x_lo < p.args.o_hi:
        if np.shares_memory(x4, out4):
            raise ValueError("out4 must be either exactly x4 (in place) or not overlap it")
    p.args.k_lo = p.args.k_hi = p.args.b_lo = p.args.b_hi = NULL
    if keep4 is not None:
        _check_no_overlap(out4, keep4, "keep4")
        _extent(<cnp.ndarray>keep4, &p.args.k_lo, &p.args.k_hi)
    if bias4 is not None:
        _check_no_overlap(out4, bias4, "bias4")
        _extent(<cnp.ndarray>bias4, &p.args.b_lo, &p.args.b_hi)
    if bounds4 is not None:
        _check_no_overlap(out4, bounds4, "bounds4")

    # ---- the plan every row reads
    p.fn = fm_row_for(dcode)
    p.args.n = N
    p.args.scale = scale
    p.x = PyArray_BYTES_const(x4)
    p.o = cnp.PyArray_BYTES(out4)
    p.H = H
    p.Q = Q
    for i in range(3):
        p.xst[i] = cnp.PyArray_STRIDES(x4)[i]
        p.ost[i] = cnp.PyArray_STRIDES(out4)[i]
    p.args.x_stride = cnp.PyArray_STRIDES(x4)[3]
    p.args.out_stride = cnp.PyArray_STRIDES(out4)[3]
    p.k = NULL
    p.b = NULL
    p.bnd = NULL
    p.args.has_keep = 0
    p.args.has_bias = 0
    p.args.keep_stride = 0
    p.args.bias_stride = 0
    if keep4 is not None:
        a = <cnp.ndarray>keep4
        p.k = PyArray_BYTES_const(a)
        for i in range(3):
            p.kst[i] = cnp.PyArray_STRIDES(a)[i]
        p.args.keep_stride = cnp.PyArray_STRIDES(a)[3]
        p.args.has_keep = 1
    if bias4 is not None:
        a = <cnp.ndarray>bias4
        p.b = PyArray_BYTES_const(a)
        for i in range(3):
            p.bst[i] = cnp.PyArray_STRIDES(a)[i]
        p.args.bias_stride = cnp.PyArray_STRIDES(a)[3]
        p.args.has_bias = 1
    if bounds4 is not None:
        a = <cnp.ndarray>bounds4
        p.bnd = PyArray_BYTES_const(a)
        for i in range(4):
            p.dst[i] = cnp.PyArray_STRIDES(a)[i]

    p.fn2 = fm_row2_for(dcode, &p.args)
    p.args.stream = 0
    if (fm_can_stream(dcode) and N > 64 and item == 4 and p.args.x_stride == 4
            and p.args.out_stride == 4 and B * H * Q * N * 4 >= _STREAM_MIN_BYTES
            and (<size_t>p.o) % 64 == 0 and p.ost[0] % 64 == 0 and p.ost[1] % 64 == 0
            and p.ost[2] % 64 == 0):
        p.args.stream = 1  # rows on 64-byte boundaries (see fm_row_f32_avx512_stream)

    # ---- prefetch distance: about 4 KiB ahead, in whole rows of x (the next rows a
    # thread processes are r + 1, r + 2, ...: along q, else h, else b)
    pitch = p.xst[2] if Q > 1 else (p.xst[1] if H > 1 else p.xst[0])
    ahead = (4096 + N * item - 1) // (N * item)
    p.args.pf_dist = pitch * (ahead if ahead < 8 else 8)

    # ---- per-thread scratch: the exp row, plus gathered rows where a layout needs them
    per = _round64(N * citem)                      # e = exp(z - m)
    p.args.off_e = 0
    p.args.off_x = p.args.off_b = p.args.off_k = 0
    if item == 2 or p.args.x_stride != item:       # 16-bit x, or non-unit-stride x
        p.args.off_x = per
        per += _round64(N * citem)
    if p.args.has_bias and p.args.bias_stride != citem:
        p.args.off_b = per
        per += _round64(N * citem)
    if p.args.has_keep and p.args.keep_stride != 1 and p.args.keep_stride != 0:
        p.args.off_k = per
        per += _round64(N)
    per += 128  # keeps threads' scratch rows off each other's cache lines

    nt = nthreads
    if nt > rows:
        nt = <int>rows
    if _serial_only or fm_openmp_version() == 0:
        nt = 1
    if per * nt <= <Py_ssize_t>sizeof(stack_scratch):
        base = <char *>stack_scratch
    else:
        scratch = <char *>malloc(per * nt)
        if scratch == NULL:
            raise MemoryError(f"fastmask: cannot allocate {per * nt} bytes of scratch")
        base = scratch

    if nt == 1:
        with nogil:
            _softmax_rows(&p, 0, rows, base)
    else:
        # Contiguous chunks of rows dealt round-robin, several per thread: under
        # padding and causal masks rows differ in length along b and q, and one
        # contiguous block per thread would leave one thread the long rows.
        chunks = nt * 8 if rows > nt * 8 else rows
        fm_region_enter()
        for c in prange(chunks, schedule="static", chunksize=1, nogil=True, num_threads=nt):
            _softmax_rows(&p, c * rows // chunks, (c + 1) * rows // chunks,
                          base + fm_thread_num() * per)
        fm_region_exit()
    free(scratch)


def openmp_enabled():
    """True when the extension was compiled with OpenMP (``prange`` runs in parallel)."""
    return fm_openmp_version() != 0


def before_fork():
    """Prepare for ``fork()`` so that the child may keep using OpenMP (optional).

    Frees this thread's OpenMP thread pool (``omp_pause_resource_all``, OpenMP 5.0;
    GNU libgomp >= 9 or LLVM libomp) when none of this module's parallel regions is in
    flight in any thread; the next parallel region re-creates the pool (tens of
    microseconds). Returns True when the pool was freed. Register with
    ``os.register_at_fork(before=before_fork, after_in_parent=after_fork_in_parent,
    after_in_child=after_fork_in_child)``. A region of another library running in
    another thread at fork time is not detected.
    """
    global _pool_paused_for_fork
    _pool_paused_for_fork = False
    if fm_openmp_version() != 0 and not _serial_only and fm_regions_active() == 0:
        _pool_paused_for_fork = fm_openmp_pause() == 0
    return bool(_pool_paused_for_fork)


def after_fork_in_parent():
    """Counterpart of :func:`before_fork` in the parent (clears its note)."""
    global _pool_paused_for_fork
    _pool_paused_for_fork = False


def after_fork_in_child():
    """Make every later call in this process serial (no OpenMP region), unless
    :func:`before_fork` freed the thread pool just before this fork.

    GNU libgomp's thread pool does not survive ``fork()``: a child whose parent had
    run a parallel region hangs in its next one (seen on this project's Linux/GCC 12
    machines). Register with ``os.register_at_fork(after_in_child=after_fork_in_child)``.
    """
    global _serial_only, _pool_paused_for_fork
    if not _pool_paused_for_fork:
        _serial_only = True
    _pool_paused_for_fork = False


def state():
    """What of :func:`build_info` can change in a process, cheaply (for caches): the
    kernel variant in use, native bf16 rounding, serial after a fork."""
    return (fm_isa_current(), fm_bf16_native(), _serial_only)


def build_info():
    """How this extension was built and which kernel variant runs: a dict."""
    return {
        "openmp": fm_openmp_version() != 0,
        "openmp_version": fm_openmp_version(),
        "multiversion": bool(FM_X86_MV),
        "isa": _isa(),
        "isa_available": _isa_available(),
        "bf16_native": bool(fm_bf16_native()),
        "debug": bool(fm_debug_build()),
        "serial_only": bool(_serial_only),
    }


# ------------------------------------------------------------- test and debug helpers

def _set_stream_min_bytes(n):
    """Set the output size from which streaming stores are used; returns the old one
    (tests and benchmarks compare both paths)."""
    global _STREAM_MIN_BYTES
    old = _STREAM_MIN_BYTES
    _STREAM_MIN_BYTES = n
    return old


def _isa():
    """Name of the kernel variant in use ("generic", "avx2", "avx512")."""
    return fm_isa_name(fm_isa_current()).decode()


def _isa_available():
    """Names of the variants this CPU can run, baseline first."""
    return [fm_isa_name(i).decode() for i in range(fm_isa_count()) if fm_isa_supported(i)]


def _set_isa(name=None):
    """Select a kernel variant by name (None: the best one). Returns the previous name.

    For tests and debugging only: not thread-safe against concurrent calls.
    """
    cdef int i
    old = _isa()
    if name is None:
        fm_isa_select(-1)
        return old
    for i in range(fm_isa_count()):
        if fm_isa_name(i).decode() == name:
            if fm_isa_select(i) < 0:
                raise ValueError(f"kernel variant {name!r} is not supported by this CPU")
            return old
    raise ValueError(f"unknown kernel variant {name!r}; built: "
                     f"{[fm_isa_name(i).decode() for i in range(fm_isa_count())]}")


def _exp(x):
    """The kernels' vector exp on a 1-D float32 or float64 array (tests only)."""
    cdef cnp.ndarray a = np.ascontiguousarray(x)
    cdef cnp.ndarray out
    if a.ndim != 1 or a.dtype not in (np.float32, np.float64):
        raise TypeError("_exp takes a 1-D float32 or float64 array")
    out = np.empty_like(a)
    if a.dtype == np.float32:
        fm_isa().exp_f32(<const float *>cnp.PyArray_DATA(a), <float *>cnp.PyArray_DATA(out),
                         a.shape[0])
    else:
        fm_isa().exp_f64(<const double *>cnp.PyArray_DATA(a), <double *>cnp.PyArray_DATA(out),
                         a.shape[0])
    return out


cdef _widen(h, fm_h2f_fn fn):
    cdef cnp.ndarray a = np.ascontiguousarray(h, dtype=np.uint16)
    cdef cnp.ndarray out = np.empty(a.shape[0], dtype=np.float32)
    fn(<const uint16_t *>cnp.PyArray_DATA(a), <float *>cnp.PyArray_DATA(out), a.shape[0])
    return out


cdef _narrow(f, fm_f2h_fn fn):
    cdef cnp.ndarray a = np.ascontiguousarray(f, dtype=np.float32)
    cdef cnp.ndarray out = np.empty(a.shape[0], dtype=np.uint16)
    fn(<const float *>cnp.PyArray_DATA(a), <uint16_t *>cnp.PyArray_DATA(out), a.shape[0])
    return out


def _half_to_float(h):
    """The kernels' float16 -> float32 conversion on a 1-D uint16 array of bit patterns."""
    return _widen(h, fm_isa().h2f)


def _float_to_half(f):
    """The kernels' float32 -> float16 rounding on a 1-D float32 array; returns uint16 bits."""
    return _narrow(f, fm_isa().f2h)


def _bfloat16_to_float(h):
    """The kernels' bfloat16 -> float32 conversion on a 1-D uint16 array of bit patterns."""
    return _widen(h, fm_isa().bf2f)


def _float_to_bfloat16(f):
    """The kernels' float32 -> bfloat16 rounding on a 1-D float32 array (the conversion
    the variant in use stores with: VCVTNEPS2BF16 or the integer code); returns uint16
    bits."""
    return _narrow(f, fm_isa().f2bf)


def _set_bf16_native(allow):
    """Allow (True) or forbid (False) the VCVTNEPS2BF16 conversion of the "avx512" variant
    on CPUs with AVX512_BF16; returns whether it was allowed before. Whether it is in use
    is ``build_info()["bf16_native"]``. For tests: not thread-safe against running calls.
    """
    global _bf16_native_allowed
    old = _bf16_native_allowed
    _bf16_native_allowed = bool(allow)
    fm_bf16_allow_native(1 if allow else 0)
    return old


include "_attention.pxi"


def _init_isa():
    import os
    name = os.environ.get("FASTMASK_ISA")
    fm_isa_select(-1)
    if name:
        try:
            _set_isa(name)
        except ValueError as exc:
            import warnings
            warnings.warn(f"FASTMASK_ISA ignored: {exc}", RuntimeWarning, stacklevel=2)


_init_isa()
