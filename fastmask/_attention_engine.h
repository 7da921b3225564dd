/*
 * fastmask/_attention_engine.h -- the fused attention engine behind fastmask._kernels.
 *
 * One call computes softmax(q k^T * scale + bias, masked) v for a whole
 * (B, H, Lq, D) x (B, Hk, Lk, D) request in one OpenMP parallel region,
 * flash-attention style: no scores tensor, no BLAS, no Python between blocks.
 *
 * Work items are (batch, kv head, group of query heads, block of queries): all the
 * query heads of a GQA group that share a kv head sit in one item, so each K and V
 * block is read once for all of them (decode: one item per kv head). Items run
 * longest-first from an atomic counter (dynamic balance: causal and padded rows
 * differ in length). Each item covers only the keys [k_lo, k_hi) that one of its rows
 * keeps (the union of the rows' intervals: causal, windows, padding, prefix-LM,
 * segments, and the first/last kept key of a dense mask), block by block; a block no
 * row keeps is skipped. When there are fewer items than threads' worth of work and
 * long rows (decode of one sequence), each item's keys are split into pieces computed
 * in parallel, and after a barrier the pieces are merged by their maxima and sums.
 *
 * The arithmetic of a block is in _attention_tile.h, instantiated here for float and
 * double and for each ISA variant of _softmax_row.h (the same fm_isa_select choice).
 * Requires GCC or clang (vector extensions); elsewhere fm_attn_available() is 0 and
 * fastmask uses its tiled driver.
 */

#ifndef FASTMASK_ATTENTION_ENGINE_H
#define FASTMASK_ATTENTION_ENGINE_H

#include <stdlib.h>

#include "_softmax_row.h"

/* The dtype of the output: the compute type, or a 16-bit one rounded from float32. */
enum { FM_OUT_COMPUTE = 0, FM_OUT_F16 = 1, FM_OUT_BF16 = 2 };

/* What one call shares. Pointers to the first element; strides in bytes. The inner
 * (D, Dv) stride of q, k, v and out is one element. */
typedef struct {
    fm_ssize B, H, Lq, D, Lk, Dv, group; /* H query heads; H / group kv heads */
    const char *q;
    fm_ssize qs_b, qs_h, qs_q;
    const char *k;
    fm_ssize ks_b, ks_h, ks_k;
    const char *v;
    fm_ssize vs_b, vs_h, vs_k;
    char *o;
    fm_ssize os_b, os_h, os_q;
    int out_kind;      /* FM_OUT_*: what out holds (float16 and bfloat16: float32 compute) */
    const char *keep;  /* bool (B, H, Lq, Lk) view, or NULL */
    fm_ssize kps_b, kps_h, kps_q, kps_k;
    const char *bias;  /* compute-dtype (B, H, Lq, Lk) view, or NULL */
    fm_ssize bs_b, bs_h, bs_q, bs_k;
    const char *bounds; /* int64 (B, H, Lq, 2) kept intervals [lo, hi), or NULL */
    fm_ssize bds_b, bds_h, bds_q, bds_p;
    double scale;
    int nthreads;
    /* User functions (fastmask.masks.predicate / score, Numba row functions), NULL when
     * none: pred(keep, b, h, q, k0, n) writes keep[j] for keys k0 + j; score(z, b, h,
     * q, k0, n) rewrites z[j] (z = score * scale + bias, in the compute type). Both
     * return nonzero when the user function raised. */
    int64_t (*pred)(uint8_t *keep, int64_t b, int64_t h, int64_t q, int64_t k0, int64_t n);
    int64_t (*score)(void *z, int64_t b, int64_t h, int64_t q, int64_t k0, int64_t n);
    fm_ssize fn_h0; /* added to h for the user functions (calls split along heads) */
    int fn_swap;    /* 3-D scores: the functions' b is the engine's h, and their h is 0 */
    int64_t failed; /* out: the first row (b * H + h) * Lq + q on which one raised, or -1 */
} fm_attn_args;

/* The largest finite bias over the kept keys [lo, hi) of row (b, h, q) (a dense keep
 * mask applied), 0 when none is, and 0 with a user predicate or score function (the
 * score function sees the bias as given). The engine subtracts it from the row's bias, which
 * leaves the weights as they are: a bias whose kept values share a large offset
 * (TensorFlow's -1e9 on a whole padding row, a common constant) would otherwise be
 * added to the scores before the running max is subtracted, and every float32 score
 * would lose |offset| * 2^-24 (wrong weights beyond 1e7). The difference bias - offset
 * is exact for biases within a factor 2 of the offset. f64: the bias is double. */
static FM_UNUSED double fm_at_bias_offset(const fm_attn_args *a, fm_ssize b, fm_ssize h,
                                          fm_ssize q, fm_ssize lo, fm_ssize hi, int f64)
{
    const char *br = a->bias + b * a->bs_b + h * a->bs_h + q * a->bs_q;
    const char *kr = a->keep ? a->keep + b * a->kps_b + h * a->kps_h + q * a->kps_q : NULL;
    double c = -HUGE_VAL;
    fm_ssize j;
    if (a->pred || a->score) return 0.0;
    for (j = lo; j < hi; j++) {
        double v;
        if (kr && !kr[j * a->kps_k]) continue;
        v = f64 ? *(const double *)(br + j * a->bs_k) : (double)*(const float *)(br + j * a->bs_k);
        if (v > c && v < HUGE_VAL) c = v; /* NaN and +inf ignored: they decide the row */
    }
    return c > -HUGE_VAL ? c : 0.0;
}

#if defined(__GNUC__) || defined(__clang__) /* the engine's compilers (FM_AT_ENGINE) */
/* A user function raised on row (b, h, q): remember the smallest such row (any
 * thread), so the error reported does not depend on the scheduling. */
static FM_UNUSED void fm_at_fail(fm_attn_args *a, fm_ssize b, fm_ssize h, fm_ssize q)
{
    const int64_t row = ((int64_t)b * a->H + h) * a->Lq + q;
    int64_t seen = __atomic_load_n(&a->failed, __ATOMIC_RELAXED);
    while ((seen < 0 || row < seen) &&
           !__atomic_compare_exchange_n(&a->failed, &seen, row, 0, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
}
#endif

#define FM_AT_RMAX 64 /* rows of a work item, at most (4 vectors of 16 floats) */

#if defined(__GNUC__) || defined(__clang__)
#define FM_AT_ALIGN64 __attribute__((aligned(64)))
#define FM_AT_ENGINE 1
#else
#define FM_AT_ALIGN64
#define FM_AT_ENGINE 0
#endif

/* One work item: its rows (head, query position) and their intervals. */
typedef struct {
    fm_ssize b, kvh, nrows, rp; /* rp: rows rounded up to whole vectors (lanes) */
    fm_ssize k_lo, k_hi;        /* union of the rows' kept keys; empty: k_lo == k_hi */
    fm_ssize h[FM_AT_RMAX], qi[FM_AT_RMAX];
    FM_AT_ALIGN64 char lo[FM_AT_RMAX * 8]; /* int32 (float) or int64 (double) lanes */
    FM_AT_ALIGN64 char hi[FM_AT_RMAX * 8];
} fm_at_item;

/* How a call is cut into items. */
typedef struct {
    fm_ssize hkv, gsub, nsub, nq, nqb, items, nsplit;
} fm_at_plan;

/* Byte offsets in a thread's scratch and in one split's partial result. */
typedef struct {
    fm_ssize bk, off_qt, off_st, off_ot, off_bt, off_kt, off_ub, off_m, off_l;
    fm_ssize thread_bytes;
    fm_ssize poff_m, poff_l, poff_ot, part_bytes;
    int small; /* items of few rows take the variant's row-major path (decode) */
} fm_at_layout;

static FM_UNUSED fm_ssize fm_at_round64(fm_ssize n) { return (n + 63) & ~(fm_ssize)63; }

/* Split keys when a call has fewer items than this and rows of at least
 * FM_AT_SPLIT_MIN_KEYS keys, in pieces of at least FM_AT_SPLIT_PIECE keys. The rule
 * does not look at the thread count, so results do not depend on it. */
#define FM_AT_SPLIT_ITEMS 8
#define FM_AT_SPLIT_MIN_KEYS 1024
#define FM_AT_SPLIT_PIECE 512

/* Items of up to rmax rows: whole GQA groups (or pieces of one) times query blocks.
 * Keys are split only when there are few items (decode of one or two sequences) and
 * rows are long: each piece runs as its own task, merged after a barrier. */
static FM_UNUSED void fm_at_plan_make(const fm_attn_args *a, fm_ssize rmax, fm_at_plan *p)
{
    p->hkv = a->H / a->group;
    p->gsub = a->group < rmax ? a->group : rmax;
    p->nsub = (a->group + p->gsub - 1) / p->gsub;
    p->nq = rmax / p->gsub;
    if (p->nq > a->Lq) p->nq = a->Lq;
    if (p->nq < 1) p->nq = 1;
    p->nqb = (a->Lq + p->nq - 1) / p->nq;
    p->items = a->B * p->hkv * p->nsub * p->nqb;
    p->nsplit = 1;
    if (p->items > 0 && p->items < FM_AT_SPLIT_ITEMS && a->Lk >= FM_AT_SPLIT_MIN_KEYS) {
        const fm_ssize want = (FM_AT_SPLIT_ITEMS + p->items - 1) / p->items;
        const fm_ssize most = a->Lk / FM_AT_SPLIT_PIECE;
        p->nsplit = want < most ? want : most;
    }
}

static FM_UNUSED void fm_at_layout_make(const fm_attn_args *a, fm_ssize rmax, fm_ssize bk,
                                        fm_ssize item, fm_at_layout *l)
{
    fm_ssize o = 0;
    l->bk = bk;
    l->small = 0;
    l->off_qt = o; o += fm_at_round64(a->D * rmax * item);
    l->off_st = o; o += fm_at_round64(bk * rmax * item);
    l->off_ot = o; o += fm_at_round64(a->Dv * rmax * item);
    l->off_bt = o; o += a->bias ? fm_at_round64(bk * rmax * item) : 0;
    l->off_kt = o; o += (a->keep || a->pred) ? fm_at_round64(bk * rmax) : 0;
    l->off_ub = o; o += (a->pred || a->score) ? fm_at_round64(bk * 8) : 0;
    l->off_m = o; o += fm_at_round64(rmax * 8);
    l->off_l = o; o += fm_at_round64(rmax * 8);
    l->thread_bytes = o + 64; /* a spare line: threads never share one */
    o = 0;
    l->poff_m = o; o += fm_at_round64(rmax * 8);
    l->poff_l = o; o += fm_at_round64(rmax * 8);
    l->poff_ot = o; o += fm_at_round64(a->Dv * rmax * item);
    l->part_bytes = o;
}

#if FM_AT_ENGINE

#define FM_AT_RV 4   /* row vectors of a work item */

/* float: int32 lanes; double: int64 lanes. Blocks of 64 keys (S^T: 64 x 64 floats,
 * 16 KiB, beside Q^T and O^T of the same size: all in L1/L2). */
#define FM_AT_BK 64

#define FM_AT_T float
#define FM_AT_IT int32_t
#define FM_AT_F32 1
#define FM_AT_VB 16
#define FM_AT_JB 4
#define FM_AT_SFX _f32_generic
#define FM_AT_ATTR
#include "_attention_tile.h"

#define FM_AT_T double
#define FM_AT_IT int64_t
#define FM_AT_F32 0
#define FM_AT_VB 16
#define FM_AT_JB 4
#define FM_AT_SFX _f64_generic
#define FM_AT_ATTR
#include "_attention_tile.h"

#if FM_X86_MV
/* AVX2: 16 registers: 2 keys x 4 row vectors = 8 accumulators + 4 loads. */
#define FM_AT_T float
#define FM_AT_IT int32_t
#define FM_AT_F32 1
#define FM_AT_VB 32
#define FM_AT_JB 2
#define FM_AT_SFX _f32_avx2
#define FM_AT_ATTR FM_TARGET_AVX2
#include "_attention_tile.h"

#define FM_AT_T double
#define FM_AT_IT int64_t
#define FM_AT_F32 0
#define FM_AT_VB 32
#define FM_AT_JB 2
#define FM_AT_SFX _f64_avx2
#define FM_AT_ATTR FM_TARGET_AVX2
#include "_attention_tile.h"

/* AVX-512: 32 registers: 4 keys x 4 row vectors = 16 accumulators + 4 loads. */
#include "_attention_decode.h"
#define FM_AT_SMALL_RUN fm_at_small_run
#define FM_AT_PACK_QT fm_at_pack_qt_avx512
#define FM_AT_STORE fm_at_store_avx512
#define FM_AT_T float
#define FM_AT_IT int32_t
#define FM_AT_F32 1
#define FM_AT_VB 64
#define FM_AT_JB 4
#define FM_AT_SFX _f32_avx512
#define FM_AT_ATTR FM_TARGET_AVX512
#include "_attention_tile.h"
#undef FM_AT_SMALL_RUN
#undef FM_AT_PACK_QT
#undef FM_AT_STORE

#define FM_AT_T double
#define FM_AT_IT int64_t
#define FM_AT_F32 0
#define FM_AT_VB 64
#define FM_AT_JB 4
#define FM_AT_SFX _f64_avx512
#define FM_AT_ATTR FM_TARGET_AVX512
#include "_attention_tile.h"
#endif /* FM_X86_MV */

typedef int (*fm_attn_fn)(fm_attn_args *a);

/* Indexed like fm_isas: generic, avx2, avx512; [0] float, [1] double. */
static const fm_attn_fn fm_attn_fns[][2] = {
    {fm_attn_run_f32_generic, fm_attn_run_f64_generic},
#if FM_X86_MV
    {fm_attn_run_f32_avx2, fm_attn_run_f64_avx2},
    {fm_attn_run_f32_avx512, fm_attn_run_f64_avx512},
#endif
};

/* Run one call with the ISA variant in use; double_ selects the compute type.
 * Returns 0, or -1 when scratch memory could not be allocated. */
static FM_UNUSED int fm_attn(fm_attn_args *a, int double_)
{
    a->failed = -1;
    return fm_attn_fns[fm_isa_current()][double_ ? 1 : 0](a);
}

static FM_UNUSED int fm_attn_available(void) { return 1; }

#else /* no vector extensions: the Python tiled driver serves attention */

static FM_UNUSED int fm_attn(fm_attn_args *a, int double_)
{
    (void)a;
    (void)double_;
    return -2;
}

static FM_UNUSED int fm_attn_available(void) { return 0; }

#endif /* FM_AT_ENGINE */

/* Rows per work item of the variant in use, for a compute type (explain, tests). */
static FM_UNUSED int fm_attn_rows_per_item(int double_)
{
    static const int vbytes[] = {16, 32, 64};
    const int vb = vbytes[fm_isa_current() < 3 ? fm_isa_current() : 2];
    return 4 * vb / (double_ ? 8 : 4);
}

#endif /* FASTMASK_ATTENTION_ENGINE_H */
