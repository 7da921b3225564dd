# Included by _kernels.pyx: the entry point of the fused attention engine
# (_attention_engine.h). Shares the module's ISA choice, fork flags and operand checks.

cdef extern from "_attention_engine.h" nogil:
    ctypedef struct fm_attn_args:
        Py_ssize_t B, H, Lq, D, Lk, Dv, group
        const char *q
        Py_ssize_t qs_b, qs_h, qs_q
        const char *k
        Py_ssize_t ks_b, ks_h, ks_k
        const char *v
        Py_ssize_t vs_b, vs_h, vs_k
        char *o
        Py_ssize_t os_b, os_h, os_q
        int out_kind
        const char *keep
        Py_ssize_t kps_b, kps_h, kps_q, kps_k
        const char *bias
        Py_ssize_t bs_b, bs_h, bs_q, bs_k
        const char *bounds
        Py_ssize_t bds_b, bds_h, bds_q, bds_p
        double scale
        int nthreads
        int64_t (*pred)(uint8_t *keep, int64_t b, int64_t h, int64_t q, int64_t k0,
                        int64_t n) noexcept nogil
        int64_t (*score)(void *z, int64_t b, int64_t h, int64_t q, int64_t k0,
                         int64_t n) noexcept nogil
        Py_ssize_t fn_h0
        int fn_swap
        int64_t failed

    enum:
        FM_OUT_COMPUTE
        FM_OUT_F16
        FM_OUT_BF16

    int fm_attn(fm_attn_args *a, int double_)
    int fm_attn_available()
    int fm_attn_rows_per_item(int double_)


cdef inline Py_ssize_t _stride(cnp.ndarray a, int i) noexcept:
    return cnp.PyArray_STRIDES(a)[i]


cdef int _check_rows(cnp.ndarray a, str name, int type_num, Py_ssize_t d0, Py_ssize_t d1,
                     Py_ssize_t d2, Py_ssize_t d3) except -1:
    """a is a native, aligned 4-D array of type_num and shape (d0, d1, d2, d3) whose last
    axis is unit-stride (the products read rows of q, k, v and write rows of out)."""
    cdef cnp.npy_intp shape[3]
    shape[0] = d0
    shape[1] = d1
    shape[2] = d2
    _check_operand(a, name, type_num, shape, d3)
    if d3 > 1 and _stride(a, 3) != cnp.PyArray_ITEMSIZE(a):
        raise ValueError(f"{name}: the last axis must be unit-stride (make it contiguous)")
    return 0


def attention_available():
    """True when the fused attention engine was compiled in (GCC or clang)."""
    return bool(fm_attn_available())


def attention_rows_per_item(dtype):
    """Score rows in one work item of the engine, for compute dtype float32 or float64."""
    return fm_attn_rows_per_item(np.dtype(dtype) == np.float64)


def attention_4d(cnp.ndarray q4 not None,    # IN  (B, H, Lq, D), compute dtype
                 cnp.ndarray k4 not None,    # IN  (B, H // group, Lk, D)
                 cnp.ndarray v4 not None,    # IN  (B, H // group, Lk, Dv)
                 cnp.ndarray out4 not None,  # OUT (B, H, Lq, Dv), zero-filled
                 keep4,                      # IN  None or bool (B, H, Lq, Lk)
                 bias4,                      # IN  None or compute dtype (B, H, Lq, Lk)
                 bounds4,                    # IN  None or int64 (B, H, Lq, 2)
                 double scale,               # IN  multiplies q @ k^T
                 Py_ssize_t group,           # IN  query heads per kv head
                 int nthreads,               # IN  >= 1
                 Py_ssize_t predicate=0,     # IN  address of a predicate row function, or 0
                 Py_ssize_t score=0,         # IN  address of a score row function, or 0
                 Py_ssize_t fn_h0=0,         # IN  head offset the user functions see
                 bint fn_swap=False):        # IN  3-D scores: functions see (b=h, h=0)
    """Fused attention ``softmax(q k^T * scale + bias, masked) v`` in one parallel region.

    The keys a row keeps are those with ``keep4`` true (if given) inside ``[lo, hi)`` of
    ``bounds4`` (if given); rows that keep nothing, or only ``-inf`` scores, stay zero;
    a kept NaN or ``+inf`` score makes the row NaN. Query head ``h`` reads kv head
    ``h // group``.

    Parameters
    ----------
    q4, k4, v4 : ndarray
        float32 or float64 (the compute dtype), last axis unit-stride, other strides
        free (0 for broadcast axes).
    out4 : ndarray
        The compute dtype, or float16 or bfloat16 (``ml_dtypes.bfloat16``, rounded to
        nearest even) with float32 inputs; writable, zero-filled, last axis
        unit-stride, not overlapping any input.
    keep4, bias4, bounds4 : ndarray or None
        As for :func:`masked_softmax_4d`: any strides.
    scale : float
        Finite.
    group : int
        ``H`` is a multiple of it.
    nthreads : int
        OpenMP threads (1 runs serially; a forked child runs serially).
    predicate, score : int
        Addresses of Numba row functions (``fastmask.kernels.numba_softmax``
        ``predicate_row_function`` / ``score_row_function`` for the compute dtype), or
        0. They run inside the parallel region, without the GIL.
    fn_h0, fn_swap : int, bool
        How the user functions see the indices: head ``h + fn_h0``; with ``fn_swap``,
        ``b = h + fn_h0`` and ``h = 0`` (3-D scores).

    Returns
    -------
    int
        -1, or the flat row ``(b * H + h) * Lq + q`` (smallest such) on which a user
        function raised (that row is computed as if it kept nothing).

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes, shapes, strides or overlap, as for :func:`masked_softmax_4d`.
    MemoryError
        Scratch could not be allocated.
    """
    cdef fm_attn_args a
    cdef int ctn = cnp.PyArray_TYPE(q4)
    cdef int otn = cnp.PyArray_TYPE(out4)
    cdef Py_ssize_t B, H, Lq, D, Lk, Dv, HK
    cdef cnp.ndarray arr
    cdef int rc, dbl
    if ctn != cnp.NPY_FLOAT and ctn != cnp.NPY_DOUBLE:
        raise TypeError(f"q4 has dtype {q4.dtype}; expected float32 or float64")
    if not (otn == ctn or (ctn == cnp.NPY_FLOAT and (otn == cnp.NPY_FLOAT16
                                                     or otn == _bfloat16_num()))):
        raise TypeError(f"out4 has dtype {out4.dtype}; expected {q4.dtype}"
                        + (", float16 or bfloat16" if ctn == cnp.NPY_FLOAT else ""))
    if not isfinite(scale):
        raise ValueError(f"scale must be finite; got {scale}")
    if nthreads < 1:
        raise ValueError(f"nthreads must be >= 1; got {nthreads}")
    if cnp.PyArray_NDIM(q4) != 4:
        raise ValueError(f"q4 must be 4-D, got {cnp.PyArray_NDIM(q4)}-D")
    B, H, Lq, D = q4.shape[0], q4.shape[1], q4.shape[2], q4.shape[3]
    if group < 1 or H % group:
        raise ValueError(f"group must divide the {H} query heads; got {group}")
    HK = H // group
    if cnp.PyArray_NDIM(k4) != 4 or cnp.PyArray_NDIM(v4) != 4:
        raise ValueError("k4 and v4 must be 4-D")
    Lk, Dv = k4.shape[2], v4.shape[3]
    _check_rows(q4, "q4", ctn, B, H, Lq, D)
    _check_rows(k4, "k4", ctn, B, HK, Lk, D)
    _check_rows(v4, "v4", ctn, B, HK, Lk, Dv)
    _check_rows(out4, "out4", otn, B, H, Lq, Dv)
    if not cnp.PyArray_ISWRITEABLE(out4) or _self_overlapping(out4):
        raise ValueError("out4 must be writable and must not overlap itself")
    for arr, name in ((q4, "q4"), (k4, "k4"), (v4, "v4")):
        _check_no_overlap(out4, arr, name)

    a.B, a.H, a.Lq, a.D, a.Lk, a.Dv, a.group = B, H, Lq, D, Lk, Dv, group
    a.q, a.qs_b, a.qs_h, a.qs_q = PyArray_BYTES_const(q4), _stride(q4, 0), _stride(q4, 1), _stride(q4, 2)
    a.k, a.ks_b, a.ks_h, a.ks_k = PyArray_BYTES_const(k4), _stride(k4, 0), _stride(k4, 1), _stride(k4, 2)
    a.v, a.vs_b, a.vs_h, a.vs_k = PyArray_BYTES_const(v4), _stride(v4, 0), _stride(v4, 1), _stride(v4, 2)
    a.o, a.os_b, a.os_h, a.os_q = <char *>cnp.PyArray_BYTES(out4), _stride(out4, 0), _stride(out4, 1), _stride(out4, 2)
    if otn == ctn:
        a.out_kind = FM_OUT_COMPUTE
    elif otn == cnp.NPY_FLOAT16:
        a.out_kind = FM_OUT_F16
    else:
        a.out_kind = FM_OUT_BF16
    a.keep = NULL
    a.bias = NULL
    a.bounds = NULL
    a.kps_b = a.kps_h = a.kps_q = a.kps_k = 0
    a.bs_b = a.bs_h = a.bs_q = a.bs_k = 0
    a.bds_b = a.bds_h = a.bds_q = a.bds_p = 0
    cdef cnp.npy_intp shape[3]
    shape[0] = B
    shape[1] = H
    shape[2] = Lq
    if keep4 is not None:
        _check_operand(keep4, "keep4", cnp.NPY_BOOL, shape, Lk)
        _check_no_overlap(out4, keep4, "keep4")
        arr = <cnp.ndarray>keep4
        a.keep = PyArray_BYTES_const(arr)
        a.kps_b, a.kps_h, a.kps_q, a.kps_k = _stride(arr, 0), _stride(arr, 1), _stride(arr, 2), _stride(arr, 3)
    if bias4 is not None:
        _check_operand(bias4, "bias4", ctn, shape, Lk)
        _check_no_overlap(out4, bias4, "bias4")
        arr = <cnp.ndarray>bias4
        a.bias = PyArray_BYTES_const(arr)
        a.bs_b, a.bs_h, a.bs_q, a.bs_k = _stride(arr, 0), _stride(arr, 1), _stride(arr, 2), _stride(arr, 3)
    if bounds4 is not None:
        _check_operand(bounds4, "bounds4", cnp.NPY_INT64, shape, 2)
        arr = <cnp.ndarray>bounds4
        a.bounds = PyArray_BYTES_const(arr)
        a.bds_b, a.bds_h, a.bds_q, a.bds_p = _stride(arr, 0), _stride(arr, 1), _stride(arr, 2), _stride(arr, 3)
    if Lk > 0x7fffffff:
        raise ValueError(f"at most 2**31 - 1 keys; got {Lk}")
    a.scale = scale
    a.nthreads = 1 if (_serial_only or fm_openmp_version() == 0) else nthreads
    a.pred = <int64_t (*)(uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t) noexcept nogil>predicate
    a.score = <int64_t (*)(void *, int64_t, int64_t, int64_t, int64_t, int64_t) noexcept nogil>score
    a.fn_h0 = fn_h0
    a.fn_swap = fn_swap
    dbl = ctn == cnp.NPY_DOUBLE
    if a.nthreads > 1:
        fm_region_enter()
    with nogil:
        rc = fm_attn(&a, dbl)
    if a.nthreads > 1:
        fm_region_exit()
    if rc == -1:
        raise MemoryError("fastmask: cannot allocate the attention engine's scratch")
    if rc == -2:
        raise RuntimeError("fastmask: this build has no fused attention engine")
    return a.failed
