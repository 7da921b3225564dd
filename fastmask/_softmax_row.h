/*
 * fastmask/_softmax_row.h -- the per-row masked softmax kernel behind fastmask._kernels.
 *
 * Header-only C99, included once by _kernels.pyx. One call of a row function does the
 * whole masked softmax of one row (b, h, q) of a (B, H, Q, N) tensor:
 *
 *     z_k = x_k * scale (+ bias_k)        for kept k: lo <= k < hi and keep_k
 *     m   = max of kept z (NaN ignored)
 *     e_k = exp(z_k - m) for kept k, exactly 0 elsewhere;  out = e / sum(e)
 *
 * with the edge cases of fastmask.reference: a row with nothing kept, or whose kept
 * logits are all -inf, is all zeros; a kept NaN (or a kept +inf, which makes the sum
 * NaN) makes the whole row, all N positions, NaN.
 *
 * Three fused passes over the kept span [lo, hi) of a row:
 *   1. max of z over kept keys (prefetching the next row of x as it streams);
 *   2. e = exp(z - m) into a per-thread scratch row (L1-resident), plus its sum;
 *   3. out = e * (1 / sum), written once (rounded to nearest even for float16 and
 *      bfloat16 rows).
 * Positions outside [lo, hi) are never read; they are written 0 directly. A row of x
 * (or of keep / bias) that is not unit-stride is first gathered into scratch, and a
 * float16 or bfloat16 row is converted to float32 there; pass 3 scatters to any output
 * stride.
 *
 * Speed without -ffast-math: the loops are plain C that gcc/clang -O3 vectorise. The
 * exponential is a branch-free polynomial with integer bit tricks (no libm call), the
 * max and sum reductions keep FM_LANES independent lanes (a strict-IEEE compiler will
 * not reassociate a single accumulator), and IEEE semantics stay intact: exp(-inf) is
 * exactly 0, NaN propagates. setup.py adds -fno-trapping-math (values unchanged; only
 * FP exception flags lose meaning) so gcc if-converts the masked selects.
 *
 * Multiversioning: on x86 with GCC or clang (and when setup.py's probe defines
 * FASTMASK_MULTIVERSION), every entry point is compiled three times -- baseline
 * x86-64, AVX2+FMA+F16C and AVX-512 -- with __attribute__((target(...))), and
 * fm_isa_select(-1) picks the best one the CPU supports (__builtin_cpu_supports). Same
 * effect as target_clones + ifunc, but the choice is an ordinary variable: no ifunc
 * (so it also works on musl and macOS), and tests can force each variant on one CPU.
 * The AVX-512 variant rounds bfloat16 with VCVTNEPS2BF16 where the CPU has
 * AVX512_BF16 (one more runtime flag, fm_bf16_native_on, not a fourth variant).
 */

#ifndef FM_TEMPLATE_PASS /* ------------------------------------------------------------ */
#ifndef FASTMASK_SOFTMAX_ROW_H
#define FASTMASK_SOFTMAX_ROW_H

#include <assert.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef ptrdiff_t fm_ssize; /* same width and signedness as Py_ssize_t */

#if defined(__GNUC__) || defined(__clang__)
#define FM_INLINE static inline __attribute__((always_inline))
#define FM_UNUSED __attribute__((unused))
#define FM_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define FM_INLINE static __forceinline
#define FM_UNUSED
#define FM_RESTRICT __restrict
#else
#define FM_INLINE static inline
#define FM_UNUSED
#define FM_RESTRICT
#endif

/* v, rounded to double where it stands: a product passed through here is not fused
 * with the next addition (compilers contract a * b + c into one FMA, one rounding
 * where the float64 reference rounds twice). */
FM_INLINE double fm_rounded(double v)
{
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(v));
#elif defined(__GNUC__) || defined(__clang__)
    __asm__("" : "+m"(v));
#else
    volatile double box = v;
    v = box;
#endif
    return v;
}

/* Prefetch the byte at p + off: a hint that never faults (off may point past the
 * array; the address is formed as an integer, not by pointer arithmetic). */
#if defined(__GNUC__) || defined(__clang__)
#define FM_PREFETCH_AT(p, off)                                                          \
    __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(off)), 0, 3)
#else
#define FM_PREFETCH_AT(p, off) ((void)0)
#endif

#if defined(FASTMASK_MULTIVERSION) && FASTMASK_MULTIVERSION && \
    (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define FM_X86_MV 1
#if defined(__clang__)
#define FM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FM_TARGET_AVX512                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"),           \
                   min_vector_width(512)))
#else
#define FM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FM_TARGET_AVX512                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,"            \
                          "prefer-vector-width=512")))
#endif
#else
#define FM_X86_MV 0
#endif

/* ------------------------------------------------------------------ thread helpers */

#ifdef _OPENMP
static FM_UNUSED int fm_thread_num(void) { return omp_get_thread_num(); }
static FM_UNUSED int fm_openmp_version(void) { return _OPENMP; }
#else
static FM_UNUSED int fm_thread_num(void) { return 0; }
static FM_UNUSED int fm_openmp_version(void) { return 0; }
#endif

/* Free the calling thread's OpenMP thread pool (OpenMP 5.0 omp_pause_resource_all;
 * libgomp since GCC 9, LLVM libomp). Returns 0 when done. Used just before fork() so a
 * child does not inherit a pool whose threads it does not have. */
static FM_UNUSED int fm_openmp_pause(void)
{
#if defined(_OPENMP) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 9))
    return omp_pause_resource_all(omp_pause_hard);
#else
    return -1;
#endif
}

/* Parallel regions of this module in flight (any thread): fork() is only made
 * OpenMP-safe for the child when there are none. */
static int fm_regions_in_flight = 0;
static FM_UNUSED void fm_region_enter(void)
{
#if defined(__GNUC__) || defined(__clang__)
    __atomic_add_fetch(&fm_regions_in_flight, 1, __ATOMIC_SEQ_CST);
#endif
}
static FM_UNUSED void fm_region_exit(void)
{
#if defined(__GNUC__) || defined(__clang__)
    __atomic_sub_fetch(&fm_regions_in_flight, 1, __ATOMIC_SEQ_CST);
#endif
}
static FM_UNUSED int fm_regions_active(void)
{
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_load_n(&fm_regions_in_flight, __ATOMIC_SEQ_CST);
#else
    return 1; /* unknown: never claim fork safety */
#endif
}

static FM_UNUSED int fm_debug_build(void)
{
#if defined(FASTMASK_DEBUG) && FASTMASK_DEBUG
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------- call arguments */

/* What every row of one call shares. Strides are in bytes; "inner" = along N. */
typedef struct {
    fm_ssize n;            /* N, keys per row */
    fm_ssize x_stride;     /* inner stride of x */
    fm_ssize out_stride;   /* inner stride of out */
    fm_ssize keep_stride;  /* inner stride of keep (bool, 1 byte) */
    fm_ssize bias_stride;  /* inner stride of bias (compute dtype) */
    fm_ssize pf_dist;      /* x: bytes from a row to the next one processed (prefetch) */
    fm_ssize off_x;        /* byte offsets of the scratch rows in a thread's scratch: */
    fm_ssize off_e;        /*   gathered x, exp values, gathered bias, gathered keep */
    fm_ssize off_b;
    fm_ssize off_k;
    double scale;
    int has_keep;
    int has_bias;
    int stream; /* float32 rows written with streaming stores (see fm_row_f32_avx512_stream) */
    /* Byte extents [lo, hi) of each array, checked by FM_CHECK_SPAN in debug builds. */
    const char *x_lo, *x_hi, *o_lo, *o_hi, *k_lo, *k_hi, *b_lo, *b_hi;
} fm_row_args;

enum { FM_ROW_OK = 0, FM_ROW_ZERO = 1, FM_ROW_NAN = 2 };

/* Elements of the two reductions' lane arrays, and the block after which the float
 * lanes are flushed into a double total (so long rows sum accurately). */
#define FM_LANES_F32 32
#define FM_LANES_F64 16
#define FM_BLOCK 1024

/* Debug check (FASTMASK_DEBUG: the FASTMASK_BOUNDSCHECK=1 build): elements [from, to)
 * of a row at `base` with stride `st` and item size `sz` lie in the extent [elo, ehi). */
#if defined(FASTMASK_DEBUG) && FASTMASK_DEBUG
#define FM_CHECK_SPAN(base, st, from, to, sz, elo, ehi)                                 \
    do {                                                                                \
        if ((to) > (from)) {                                                            \
            const char *p0_ = (const char *)(base) + (from) * (st);                     \
            const char *p1_ = (const char *)(base) + ((to)-1) * (st);                   \
            assert(p0_ >= (elo) && p0_ + (sz) <= (ehi));                                \
            assert(p1_ >= (elo) && p1_ + (sz) <= (ehi));                                \
        }                                                                               \
    } while (0)
#else
#define FM_CHECK_SPAN(base, st, from, to, sz, elo, ehi) ((void)0)
#endif

/* ------------------------------------------------------------------------ bit casts */

FM_INLINE uint32_t fm_bits_f32(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
FM_INLINE float fm_from_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
FM_INLINE uint64_t fm_bits_f64(double f)
{
    uint64_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
FM_INLINE double fm_from_bits_f64(uint64_t u)
{
    double f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---------------------------------------------------------------------- exponential */

/*
 * exp(x) for x <= 0 (and a little above 0): x = n ln2 + r with n = round(x / ln2)
 * (found by adding 1.5 * 2^(mantissa bits), which leaves the rounded integer in the
 * low bits), r by Cody-Waite in two steps (ln2_hi has trailing zero bits, so n * ln2_hi
 * is exact), exp(r) by its Taylor polynomial on |r| <= ln2/2, and 2^n built directly in
 * the exponent field. Below the underflow threshold the result is exactly 0 (as is
 * exp(-inf)); NaN compares false and so propagates through the polynomial.
 * All integer arithmetic is unsigned, so out-of-range lanes (selected away) are defined.
 */
#define FM_EXP_MIN_F32 (-87.3f)  /* 2^n stays a normal number above this */
#define FM_EXP_MIN_F64 (-708.0)

FM_INLINE float fm_exp_f32(float x)
{
    const float magic = 12582912.0f;           /* 1.5 * 2^23 */
    const float log2e = 1.44269502f;
    const float ln2_hi = 0.693115234375f;      /* 0x1.62ep-1: 12 trailing zero bits */
    const float ln2_lo = 3.19461833e-05f;      /* ln2 - ln2_hi */
    const float t = x * log2e + magic;
    const float n = t - magic;                 /* exactly the integer round(x log2 e) */
    float r = x - n * ln2_hi;
    float p;
    uint32_t e;
    r = r - n * ln2_lo;
    p = 1.98412698e-04f;                       /* 1/7! ... 1/0!, Horner */
    p = p * r + 1.38888889e-03f;
    p = p * r + 8.33333377e-03f;
    p = p * r + 4.16666679e-02f;
    p = p * r + 1.66666672e-01f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    e = (fm_bits_f32(t) - fm_bits_f32(magic) + 127u) << 23; /* bits of 2^n */
    p = p * fm_from_bits_f32(e);
    return x < FM_EXP_MIN_F32 ? 0.0f : p;
}

FM_INLINE double fm_exp_f64(double x)
{
    const double magic = 6755399441055744.0;   /* 1.5 * 2^52 */
    const double log2e = 1.4426950408889634;
    const double ln2_hi = 0.69314718055989033; /* 0x1.62e42fefa38p-1: 11 trailing zeros */
    const double ln2_lo = 5.4979230187083712e-14;
    const double t = x * log2e + magic;
    const double n = t - magic;
    double r = x - n * ln2_hi;
    double p;
    uint64_t e;
    r = r - n * ln2_lo;
    p = 1.6059043836821613e-10;                /* 1/13! ... 1/0!, Horner */
    p = p * r + 2.08767569878681e-09;
    p = p * r + 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 1.984126984126984e-04;
    p = p * r + 1.388888888888889e-03;
    p = p * r + 8.333333333333333e-03;
    p = p * r + 4.1666666666666664e-02;
    p = p * r + 1.6666666666666666e-01;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    e = (fm_bits_f64(t) - fm_bits_f64(magic) + 1023u) << 52;
    p = p * fm_from_bits_f64(e);
    return x < FM_EXP_MIN_F64 ? 0.0 : p;
}

/* ------------------------------------------------------------------------- float16 */

/* IEEE binary16 -> binary32, exact for every one of the 65536 inputs, integer-only
 * apart from one exact int->float conversion for subnormals (so DAZ/FTZ modes do not
 * matter). Branch-free: vectorises. */
FM_INLINE float fm_half_to_float(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                     /* exponent and mantissa */
    const uint32_t normal = (em << 13) + 0x38000000u;    /* rebias exponent 15 -> 127 */
    const uint32_t infnan = (em << 13) | 0x7f800000u;    /* keeps the NaN payload */
    const float subf = (float)(int32_t)em * 5.9604644775390625e-08f; /* em * 2^-24 */
    const uint32_t r = em < 0x0400u ? fm_bits_f32(subf) : (em >= 0x7c00u ? infnan : normal);
    return fm_from_bits_f32(r | sign);
}

/* binary32 -> binary16, round to nearest even, overflow to inf, subnormals and NaN
 * (quietened, top payload bits kept) right. Branch-free: vectorises. */
FM_INLINE uint16_t fm_float_to_half(float f)
{
    const uint32_t u = fm_bits_f32(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const int32_t a = (int32_t)(u & 0x7fffffffu);
    /* normal half: drop 13 mantissa bits with round-half-even, rebias 127 -> 15; a
     * mantissa carry rolls into the exponent, up to inf at 65520. */
    const uint32_t nrm =
        ((uint32_t)a + 0x0fffu + (((uint32_t)a >> 13) & 1u) - 0x38000000u) >> 13;
    /* subnormal half (|f| < 2^-14): round(|f| * 2^24); adding 2^23 rounds to an
     * integer in the current (nearest-even) mode and leaves it in the low bits. */
    const float t = fm_from_bits_f32((uint32_t)a) * 16777216.0f + 8388608.0f;
    const uint32_t sub = fm_bits_f32(t) - 0x4b000000u;
    const uint32_t nan = 0x7e00u | (((uint32_t)a >> 13) & 0x3ffu);
    const uint32_t r = a > 0x7f800000 ? nan
                     : a >= 0x47800000 ? 0x7c00u
                     : a >= 0x38800000 ? nrm
                                       : sub;
    return (uint16_t)(r | sign);
}

/* ------------------------------------------------------------------------ bfloat16 */

/* bfloat16 is the upper half of a binary32 (same sign, exponent and top 7 mantissa
 * bits), so widening is exact: a shift, which gcc/clang vectorise at every ISA level
 * (vpmovzxwd + vpslld). */
FM_INLINE float fm_bf16_to_float(uint16_t h) { return fm_from_bits_f32((uint32_t)h << 16); }

/* binary32 -> bfloat16, round to nearest even on the bit pattern: adding 0x7fff plus
 * the kept lsb carries into the kept bits exactly when the dropped half is above (or,
 * for an odd lsb, at) the midpoint. Integer-only, so it needs no MXCSR mode and is
 * exact for subnormals too (bfloat16 has binary32's exponent range); a carry out of
 * the mantissa rolls into the exponent, up to inf. NaN stays NaN: the high half with
 * the quiet bit set (sign and top payload bits kept), which is bit for bit what
 * VCVTNEPS2BF16 gives, so both conversions agree on every input. Branch-free:
 * vectorises. */
FM_INLINE uint16_t fm_float_to_bf16(float f)
{
    const uint32_t u = fm_bits_f32(f);
    const uint32_t rne = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rne);
}

#define FM_BF16_NAN 0x7fc0u /* what a NaN row is filled with */

#if FM_X86_MV
/* F16C (every AVX2 CPU has it): exact IEEE conversions, 8 per instruction; only the
 * AVX2 / AVX-512 variants call these. Tails use the integer code above, which gives
 * the same bits (NaN payloads aside: F16C quietens signalling NaNs). */
#include <cpuid.h>
#include <immintrin.h>
#define FM_TARGET_F16C __attribute__((target("avx,f16c")))

static FM_TARGET_F16C void fm_h2f_f16c(const uint16_t *in, float *out, fm_ssize n,
                                       fm_ssize pf)
{
    fm_ssize i = 0;
    for (; i + 32 <= n; i += 32) { /* 64 bytes of float16 per step */
        int j;
        FM_PREFETCH_AT(in + i, pf);
        for (j = 0; j < 32; j += 8)
            _mm256_storeu_ps(out + i + j,
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i + j))));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    for (; i < n; i++) out[i] = fm_half_to_float(in[i]);
}

/* out = float16(in * scale), rounded to nearest even. */
static FM_TARGET_F16C void fm_f2h_f16c(const float *in, float scale, uint16_t *out,
                                       fm_ssize n)
{
    const __m256 sv = _mm256_set1_ps(scale);
    fm_ssize i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(in + i), sv),
                                         _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = fm_float_to_half(in[i] * scale);
}

static int fm_cpu_has_f16c(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
    return (int)((ecx >> 29) & 1u) && (int)((ecx >> 28) & 1u); /* F16C and AVX */
}

/* float32 -> bfloat16 of 16 lanes with AVX-512F: fm_float_to_bf16, lane-wise. */
FM_TARGET_AVX512 FM_INLINE __m256i fm_f2bf16_avx512(__m512 v)
{
    const __m512i u = _mm512_castps_si512(v);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
    const __m512i rne = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(
        _mm512_mask_mov_epi32(rne, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40))));
}
#endif

/*
 * AVX512_BF16 (Zen 4/5, Cooper Lake, Sapphire Rapids): VCVTNEPS2BF16 rounds 16 floats
 * to nearest even in one instruction. It is the conversion of the "avx512" variant
 * on CPUs that have it (fm_bf16_native_on); elsewhere fm_float_to_bf16 is used.
 * Unlike the integer code it treats subnormal inputs as zero (regardless of MXCSR):
 * a float32 weight below 2^-126 would come out as a signed 0 instead of the nearest
 * bfloat16 subnormal. Such lanes are found with VFPCLASSPS and converted by the
 * integer code instead (rare: a branch that is almost never taken), so both paths
 * give the same bits for every input, NaN included. Normal inputs never round to a
 * bfloat16 subnormal (the exponent ranges are the same), and the instruction neither
 * raises nor reads FP exceptions or rounding modes. Needs the compiler to know the
 * target (GCC 10, clang 9); without it the integer code serves every CPU.
 */
#if FM_X86_MV && defined(__clang__) && defined(__apple_build_version__)
#define FM_BF16_NATIVE (__clang_major__ >= 12)
#elif FM_X86_MV && defined(__clang__)
#define FM_BF16_NATIVE (__clang_major__ >= 9)
#elif FM_X86_MV
#define FM_BF16_NATIVE (__GNUC__ >= 10)
#else
#define FM_BF16_NATIVE 0
#endif

#if FM_BF16_NATIVE
#if defined(__clang__)
#define FM_TARGET_AVX512BF16                                                              \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,avx512bf16"), \
                   min_vector_width(512)))
#else
#define FM_TARGET_AVX512BF16                                                              \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,avx512bf16," \
                          "prefer-vector-width=512")))
#endif

static FM_TARGET_AVX512BF16 __m256i fm_f2bf16_native(__m512 v)
{
    const __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
    const __mmask16 sub = _mm512_fpclass_ps_mask(v, 0x20); /* subnormal, either sign */
    return sub ? _mm256_mask_blend_epi16(sub, r, fm_f2bf16_avx512(v)) : r;
}

/* out = bfloat16(in * scale), rounded to nearest even; a last partial vector with
 * masked loads and stores (nothing outside [0, n) is touched). */
static FM_TARGET_AVX512BF16 void fm_f2bf_native(const float *in, float scale, uint16_t *out,
                                                fm_ssize n)
{
    const __m512 sv = _mm512_set1_ps(scale);
    fm_ssize i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(out + i),
                            fm_f2bf16_native(_mm512_mul_ps(_mm512_loadu_ps(in + i), sv)));
    if (i < n) {
        const __mmask16 lanes = (__mmask16)((1u << (n - i)) - 1u);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, in + i), sv);
        _mm256_mask_storeu_epi16(out + i, lanes, fm_f2bf16_native(v));
    }
}

/* AVX512_BF16 (CPUID leaf 7, subleaf 1, EAX bit 5). OS support for the AVX-512
 * state is checked with the "avx512" variant, which the native path belongs to. */
static int fm_cpu_has_avx512bf16(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return 0;
    return (int)((eax >> 5) & 1u);
}
#endif /* FM_BF16_NATIVE */

/* Whether the variant in use converts float32 -> bfloat16 with VCVTNEPS2BF16 (set by
 * fm_isa_select; tests turn it off with fm_bf16_allow_native(0) to run the integer
 * conversion inside the AVX-512 variant). */
static int fm_bf16_native_on = 0;
static int fm_bf16_native_allowed = 1;

/* --------------------------------------------------------------------- keep rows */

/* Keep bytes for [lo, lo + n) as a contiguous array (NULL: keep everything), gathered
 * into scratch when not unit-stride. A 0-stride keep was resolved by the caller. */
FM_INLINE const unsigned char *fm_keep_row(const fm_row_args *a, const char *k, fm_ssize lo,
                                           fm_ssize n, char *scratch)
{
    unsigned char *kb;
    fm_ssize i;
    if (!a->has_keep || a->keep_stride == 0) return NULL;
    FM_CHECK_SPAN(k, a->keep_stride, lo, lo + n, 1, a->k_lo, a->k_hi);
    if (a->keep_stride == 1) return (const unsigned char *)k + lo;
    kb = (unsigned char *)(scratch + a->off_k);
    for (i = 0; i < n; i++) kb[i] = (unsigned char)(k[(lo + i) * a->keep_stride] != 0);
    return kb;
}

/* ------------------------------------------------------ per-type code, instantiated */

/* Keeps gcc from fully unrolling a lane loop before the loop vectoriser sees it (it
 * then fails to vectorise the enclosing reduction, e.g. for 16 double lanes). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 8
#define FM_NO_UNROLL _Pragma("GCC unroll 1")
#else
#define FM_NO_UNROLL
#endif

#define FM_CAT_(a, b) a##b
#define FM_CAT(a, b) FM_CAT_(a, b)
#define FM_FN(name) FM_CAT(name, FM_SFX)

#define FM_TEMPLATE_PASS 1

#define FM_T float
#define FM_SFX _f32
#define FM_EXP fm_exp_f32
#define FM_LANES FM_LANES_F32
#define FM_NEG_INF (-HUGE_VALF)
#define FM_Z_FUSED_MAX 16777216.0f /* 2^24: below it the fused rounding error is < 1 */
#define FM_Z_OFFSET_MAX 1073741824.0f /* 2^30: m's rounding error <= 32, exp's range holds */
#define FM_Z_BIAS_STAGE 64.0 /* |x * scale| from which a biased row is staged in double */
#define FM_NAN_BITS uint32_t
#define FM_NAN_PATTERN 0x7fc00000u
#include "_softmax_row.h"
#undef FM_T
#undef FM_SFX
#undef FM_EXP
#undef FM_LANES
#undef FM_NEG_INF
#undef FM_Z_FUSED_MAX
#undef FM_Z_OFFSET_MAX
#undef FM_Z_BIAS_STAGE
#undef FM_NAN_BITS
#undef FM_NAN_PATTERN

#define FM_T double
#define FM_SFX _f64
#define FM_EXP fm_exp_f64
#define FM_LANES FM_LANES_F64
#define FM_NEG_INF (-HUGE_VAL)
#define FM_Z_FUSED_MAX 9007199254740992.0 /* 2^53 */
#define FM_Z_OFFSET_MAX 576460752303423488.0 /* 2^59 */
#define FM_Z_BIAS_STAGE HUGE_VAL /* float64 is not staged (fm_bias_z_to_memory) */
#define FM_NAN_BITS uint64_t
#define FM_NAN_PATTERN 0x7ff8000000000000ull
#include "_softmax_row.h"
#undef FM_T
#undef FM_SFX
#undef FM_EXP
#undef FM_LANES
#undef FM_NEG_INF
#undef FM_Z_FUSED_MAX
#undef FM_Z_OFFSET_MAX
#undef FM_Z_BIAS_STAGE
#undef FM_NAN_BITS
#undef FM_NAN_PATTERN

#undef FM_TEMPLATE_PASS

/* ------------------------------------------------------- float16 and bfloat16 rows */

/* Fill positions [from, to) of a 16-bit row with the bit pattern v. */
FM_INLINE void fm_fill_u16(char *o, fm_ssize os, fm_ssize from, fm_ssize to, uint16_t v)
{
    fm_ssize i;
    if (to <= from) return;
    if (os == 2) {
        uint16_t *p = (uint16_t *)o;
        volatile uint16_t box = v; /* no memset: see fm_fill_f32 */
        const uint16_t w = box;
        for (i = from; i < to; i++) p[i] = w;
        return;
    }
    for (i = from; i < to; i++) *(uint16_t *)(o + i * os) = v;
}

/* A 16-bit element (float16, or bfloat16 when bf16) widened to float32. */
FM_INLINE float fm_u16_to_float(uint16_t h, const int bf16)
{
    return bf16 ? fm_bf16_to_float(h) : fm_half_to_float(h);
}

FM_INLINE uint16_t fm_float_to_u16(float f, const int bf16)
{
    return bf16 ? fm_float_to_bf16(f) : fm_float_to_half(f);
}

/* A float16 (bf16 = 0) or bfloat16 (bf16 = 1) row: converted to a float32 scratch
 * row, computed in float32, rounded back to nearest even in pass 3. hw: convert with
 * the CPU's instructions -- float16: F16C both ways (a constant of the variant);
 * bfloat16: VCVTNEPS2BF16 for the store (read from fm_bf16_native_on once per row:
 * one branch, not a second copy of the float32 core), the load being a shift that
 * compiles to vector code at every ISA level anyway. */
FM_INLINE void fm_row_body_u16(const fm_row_args *a, const char *x, char *o, const char *k,
                               const char *b, fm_ssize lo, fm_ssize hi, char *scratch,
                               const int bf16, const int hw)
{
    const fm_ssize N = a->n;
    const unsigned char *kp;
    const float *bp = NULL;
    float *xb = (float *)(scratch + a->off_x);
    float *e = (float *)(scratch + a->off_e);
    float inv;
    fm_ssize n, i;
    int st, l;
    (void)hw;

    if (lo < 0) lo = 0;
    if (hi > N) hi = N;
    if (a->has_keep && a->keep_stride == 0 && hi > lo && !k[0]) hi = lo;
    FM_CHECK_SPAN(o, a->out_stride, 0, N, 2, a->o_lo, a->o_hi);
    if (hi <= lo) {
        fm_fill_u16(o, a->out_stride, 0, N, 0);
        return;
    }
    n = hi - lo;
    FM_CHECK_SPAN(x, a->x_stride, lo, hi, 2, a->x_lo, a->x_hi);
    kp = fm_keep_row(a, k, lo, n, scratch);
    if (a->has_bias) bp = fm_bias_row_f32(a, b, lo, n, scratch);
#if FM_X86_MV
    if (!bf16 && hw && a->x_stride == 2) {
        fm_h2f_f16c((const uint16_t *)x + lo, xb, n, a->pf_dist);
    } else
#endif
    if (a->x_stride == 2) {
        const uint16_t *xp = (const uint16_t *)x + lo;
        const fm_ssize nfull = n - n % 32;
        for (i = 0; i < nfull; i += 32) { /* 64 bytes of 16-bit values per step */
            FM_PREFETCH_AT(xp + i, a->pf_dist);
            for (l = 0; l < 32; l++) xb[i + l] = fm_u16_to_float(xp[i + l], bf16);
        }
        for (; i < n; i++) xb[i] = fm_u16_to_float(xp[i], bf16);
    } else {
        const char *xp = x + lo * a->x_stride;
        const fm_ssize xs = a->x_stride;
        for (i = 0; i < n; i++) xb[i] = fm_u16_to_float(*(const uint16_t *)(xp + i * xs), bf16);
    }
    st = fm_core_dispatch_f32(xb, kp, bp, a->scale, n, e, &inv, 0);
    if (st != FM_ROW_OK) {
        /* a constant pattern per type (a selected one makes gcc lay out the whole
         * float16 row differently from the float16-only code it replaces) */
        if (bf16)
            fm_fill_u16(o, a->out_stride, 0, N, st == FM_ROW_NAN ? FM_BF16_NAN : 0u);
        else
            fm_fill_u16(o, a->out_stride, 0, N, st == FM_ROW_NAN ? 0x7e00u : 0u);
        return;
    }
#if FM_X86_MV
    if (!bf16 && hw && a->out_stride == 2) {
        fm_f2h_f16c(e, inv, (uint16_t *)o + lo, n);
    } else
#endif
#if FM_BF16_NATIVE
    if (bf16 && hw && a->out_stride == 2) {
        fm_f2bf_native(e, inv, (uint16_t *)o + lo, n);
    } else
#endif
    if (a->out_stride == 2) {
        uint16_t *op = (uint16_t *)o + lo;
        for (i = 0; i < n; i++) op[i] = fm_float_to_u16(e[i] * inv, bf16);
    } else {
        char *op = o + lo * a->out_stride;
        const fm_ssize os = a->out_stride;
        for (i = 0; i < n; i++)
            *(uint16_t *)(op + i * os) = fm_float_to_u16(e[i] * inv, bf16);
    }
    fm_fill_u16(o, a->out_stride, 0, lo, 0);
    fm_fill_u16(o, a->out_stride, hi, N, 0);
}

/* ----------------------------------------------------------- ISA variants, dispatch */

#define FM_ROW_PARAMS                                                                   \
    const fm_row_args *a, const char *x, char *o, const char *k, const char *b,          \
        fm_ssize lo, fm_ssize hi, char *scratch
#define FM_ROW_ARGS a, x, o, k, b, lo, hi, scratch

/* One row: IN a (shared call arguments), IN x (row of x at key 0), OUT o (row of out at
 * key 0), IN k, b (rows of keep / bias at key 0, or NULL), IN lo, hi (kept span, any
 * values: clipped to [0, N)), scratch (this thread's scratch rows). */
typedef void (*fm_row_fn)(FM_ROW_PARAMS);
typedef void (*fm_map_f32_fn)(const float *in, float *out, fm_ssize n);
typedef void (*fm_map_f64_fn)(const double *in, double *out, fm_ssize n);
typedef void (*fm_h2f_fn)(const uint16_t *in, float *out, fm_ssize n);
typedef void (*fm_f2h_fn)(const float *in, uint16_t *out, fm_ssize n);

/* bf16hw: the variant may convert to bfloat16 with VCVTNEPS2BF16 (when
 * fm_bf16_native_on says the CPU has it and tests have not turned it off). */
#define FM_DEFINE_ISA(isa, attr, f16c, bf16hw)                                           \
    static attr void fm_row_f16_##isa(FM_ROW_PARAMS)                                     \
    {                                                                                    \
        fm_row_body_u16(FM_ROW_ARGS, 0, f16c);                                           \
    }                                                                                    \
    static attr void fm_row_bf16_##isa(FM_ROW_PARAMS)                                    \
    {                                                                                    \
        fm_row_body_u16(FM_ROW_ARGS, 1, FM_BF16_HW(bf16hw));                             \
    }                                                                                    \
    static attr void fm_row_f32_##isa(FM_ROW_PARAMS) { fm_row_body_f32(FM_ROW_ARGS); }   \
    static attr void fm_row_f64_##isa(FM_ROW_PARAMS) { fm_row_body_f64(FM_ROW_ARGS); }   \
    static attr void fm_exp_map_f32_##isa(const float *in, float *out, fm_ssize n)      \
    {                                                                                    \
        fm_ssize i;                                                                      \
        for (i = 0; i < n; i++) out[i] = fm_exp_f32(in[i]);                              \
    }                                                                                    \
    static attr void fm_exp_map_f64_##isa(const double *in, double *out, fm_ssize n)    \
    {                                                                                    \
        fm_ssize i;                                                                      \
        for (i = 0; i < n; i++) out[i] = fm_exp_f64(in[i]);                              \
    }                                                                                    \
    static attr void fm_h2f_map_##isa(const uint16_t *in, float *out, fm_ssize n)       \
    {                                                                                    \
        fm_ssize i;                                                                      \
        FM_IF_F16C(f16c, fm_h2f_f16c(in, out, n, 0); return;)                            \
        for (i = 0; i < n; i++) out[i] = fm_half_to_float(in[i]);                        \
    }                                                                                    \
    static attr void fm_f2h_map_##isa(const float *in, uint16_t *out, fm_ssize n)       \
    {                                                                                    \
        fm_ssize i;                                                                      \
        FM_IF_F16C(f16c, fm_f2h_f16c(in, 1.0f, out, n); return;)                         \
        for (i = 0; i < n; i++) out[i] = fm_float_to_half(in[i]);                        \
    }                                                                                    \
    static attr void fm_bf2f_map_##isa(const uint16_t *in, float *out, fm_ssize n)      \
    {                                                                                    \
        fm_ssize i;                                                                      \
        for (i = 0; i < n; i++) out[i] = fm_bf16_to_float(in[i]);                        \
    }                                                                                    \
    static attr void fm_f2bf_map_##isa(const float *in, uint16_t *out, fm_ssize n)      \
    {                                                                                    \
        fm_ssize i;                                                                      \
        FM_IF_BF16HW(bf16hw, fm_f2bf_native(in, 1.0f, out, n); return;)                 \
        for (i = 0; i < n; i++) out[i] = fm_float_to_bf16(in[i]);                        \
    }

#if FM_X86_MV
#define FM_IF_F16C(flag, stmts) if (flag) { stmts }
#else
#define FM_IF_F16C(flag, stmts)
#endif
#if FM_BF16_NATIVE
#define FM_BF16_HW(flag) ((flag) && fm_bf16_native_on)
#define FM_IF_BF16HW(flag, stmts) if (FM_BF16_HW(flag)) { stmts }
#else
#define FM_BF16_HW(flag) 0
#define FM_IF_BF16HW(flag, stmts)
#endif

#define FM_NO_ATTR
FM_DEFINE_ISA(generic, FM_NO_ATTR, 0, 0)
#if FM_X86_MV
FM_DEFINE_ISA(avx2, FM_TARGET_AVX2, 1, 0)
FM_DEFINE_ISA(avx512, FM_TARGET_AVX512, 1, 1)

/*
 * Short float32 rows (N <= 64: W4-sized attention heads, 64-token windows) with
 * AVX-512: the whole row lives in four registers, so the three passes become a
 * dozen vector instructions each, with no lane arrays, overlapping blocks or loop
 * set-up. The general row spends ~100 cycles of such fixed cost per row, which is
 * most of a 64-key row's time. Lanes outside [lo, hi) are masked off: never
 * loaded, -inf in the max and exactly 0 after exp and in the output. Every
 * unusual row (nothing kept, a kept -inf/+inf max or NaN) goes to the general row
 * body, so the edge cases have one definition.
 */
FM_TARGET_AVX512 FM_INLINE __m512 fm_exp16_f32(__m512 x)
{
    const __m512 magic = _mm512_set1_ps(12582912.0f);
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269502f), magic);
    const __m512 n = _mm512_sub_ps(t, magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693115234375f), x);
    __m512 p = _mm512_set1_ps(1.98412698e-04f);
    __m512i e;
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(3.19461833e-05f), r);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888889e-03f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333377e-03f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666679e-02f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666672e-01f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic)),
                         _mm512_set1_epi32(127)),
        23);
    p = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
    /* below the underflow threshold (and -inf): exactly 0; NaN compares false */
    return _mm512_mask_mov_ps(
        p, _mm512_cmp_ps_mask(x, _mm512_set1_ps(FM_EXP_MIN_F32), _CMP_LT_OQ),
        _mm512_setzero_ps());
}

/* Lanes [from, to) of a 16-lane vector starting at key `base`. */
FM_TARGET_AVX512 FM_INLINE __mmask16 fm_lanes16(fm_ssize base, fm_ssize from, fm_ssize to)
{
    fm_ssize a = from - base, b = to - base;
    if (a < 0) a = 0;
    if (b > 16) b = 16;
    if (b <= a) return 0;
    return (__mmask16)((0xffffu >> (16 - (b - a))) << a);
}

#define FM_SHORT_MAX 64

/*
 * Long float32 rows of a large output with AVX-512: computed by the general core,
 * then written with streaming (non-temporal) stores of whole 64-byte lines, kept
 * values and the zeros around them alike. A normal store first reads each output
 * line into the cache (read for ownership): a third of the memory traffic of an
 * output far larger than the caches, for lines that are overwritten whole. The
 * caller sets a->stream only for unit-stride float32 x and out whose rows start on
 * 64-byte boundaries (a row's last partial line gets an ordinary store), and
 * calls fm_store_fence() when its rows are done. Rows that do not start on a line
 * boundary are not streamed: measured on Zen 5, W6 with such an output took 8.5 ms
 * streamed against 5.8 ms with ordinary stores (and 5.2 ms streamed when aligned). Unusual rows (nothing kept, NaN) take the general path.
 */
/* Weights of keys j .. j+15: e[k - lo] * inv for kept keys k in [lo, hi), 0 elsewhere
 * (lanes outside [lo, hi) are not read). */
FM_TARGET_AVX512 FM_INLINE __m512 fm_weights16(const float *e, __m512 iv, fm_ssize j, fm_ssize lo,
                                               fm_ssize hi)
{
    const float *src = (const float *)((uintptr_t)e + (uintptr_t)((j - lo) * 4));
    return _mm512_mul_ps(_mm512_maskz_loadu_ps(fm_lanes16(j, lo, hi), src), iv);
}

static FM_TARGET_AVX512 void fm_row_f32_avx512_stream(FM_ROW_PARAMS)
{
    const fm_ssize N = a->n;
    float *e = (float *)(scratch + a->off_e);
    float *op = (float *)o;
    const unsigned char *kp;
    const float *bp = NULL;
    float inv;
    fm_ssize n, j;
    if (lo < 0) lo = 0;
    if (hi > N) hi = N;
    if (a->has_keep && a->keep_stride == 0 && hi > lo && !k[0]) hi = lo;
    if (hi <= lo) {
        fm_row_f32_avx512(FM_ROW_ARGS);
        return;
    }
    n = hi - lo;
    FM_CHECK_SPAN(x, 4, lo, hi, 4, a->x_lo, a->x_hi);
    FM_CHECK_SPAN(o, 4, 0, N, 4, a->o_lo, a->o_hi);
    kp = fm_keep_row(a, k, lo, n, scratch);
    if (a->has_bias) bp = fm_bias_row_f32(a, b, lo, n, scratch);
    if (fm_core_dispatch_f32((const float *)x + lo, kp, bp, a->scale, n, e, &inv,
                             a->pf_dist) != FM_ROW_OK) {
        fm_row_f32_avx512(FM_ROW_ARGS);
        return;
    }
    {
        const __m512 iv = _mm512_set1_ps(inv);
        assert(((uintptr_t)op & 63u) == 0);
        for (j = 0; j + 16 <= N; j += 16) _mm512_stream_ps(op + j, fm_weights16(e, iv, j, lo, hi));
        /* a last partial line: an ordinary masked store */
        if (j < N) _mm512_mask_storeu_ps(op + j, fm_lanes16(j, j, N), fm_weights16(e, iv, j, lo, hi));
    }
}

static FM_TARGET_AVX512 void fm_row_f32_avx512_short(FM_ROW_PARAMS)
{
    const fm_ssize N = a->n;
    const float *xp = (const float *)x;
    float *op = (float *)o;
    const __m512 ninf = _mm512_set1_ps(-HUGE_VALF);
    const __m512 scale = _mm512_set1_ps((float)a->scale);
    __m512 z[4], acc = ninf, sum = _mm512_setzero_ps();
    float m, s;
    int v;
    if (a->stream) {
        fm_row_f32_avx512_stream(FM_ROW_ARGS);
        return;
    }
    if (N > FM_SHORT_MAX || a->x_stride != 4 || a->out_stride != 4 || a->has_keep ||
        a->has_bias || lo >= hi || lo < 0 || hi > N) {
        fm_row_f32_avx512(FM_ROW_ARGS);
        return;
    }
    FM_CHECK_SPAN(x, a->x_stride, lo, hi, 4, a->x_lo, a->x_hi);
    FM_CHECK_SPAN(o, a->out_stride, 0, N, 4, a->o_lo, a->o_hi);
    for (v = 0; v < 4; v++) {
        const __mmask16 kept = fm_lanes16(16 * v, lo, hi);
        const __m512 zv = _mm512_mul_ps(_mm512_maskz_loadu_ps(kept, xp + 16 * v), scale);
        z[v] = _mm512_mask_mov_ps(ninf, kept, zv);
        acc = _mm512_max_ps(z[v], acc); /* a NaN in z[v] yields acc: ignored, as FM_MAX */
    }
    m = _mm512_reduce_max_ps(acc);
    /* Nothing kept, a kept +-inf or NaN, or |m| >= 64: the general row. Here z = x * scale
     * is rounded before m is subtracted, an error of |z| * 2^-24 in exp's argument, which
     * the contract's 1e-5 allows only while |z| stays below ~100; the general row fuses
     * the product with the subtraction (and stages |m| >= 2^24 in double). */
    if (!(m > -64.0f) || !(m < 64.0f)) {
        fm_row_f32_avx512(FM_ROW_ARGS);
        return;
    }
    for (v = 0; v < 4; v++) {
        z[v] = fm_exp16_f32(_mm512_sub_ps(z[v], _mm512_set1_ps(m)));
        sum = _mm512_add_ps(sum, z[v]);
    }
    s = _mm512_reduce_add_ps(sum);
    if (!(s == s)) { /* a kept NaN */
        fm_row_f32_avx512(FM_ROW_ARGS);
        return;
    }
    {
        const __m512 inv = _mm512_set1_ps((float)(1.0 / (double)s));
        for (v = 0; v < 4; v++) /* masked lanes hold exp(-inf) = 0 */
            _mm512_mask_storeu_ps(op + 16 * v, fm_lanes16(16 * v, 0, N),
                                  _mm512_mul_ps(z[v], inv));
    }
}

/* Two short rows at once. One row's passes are a chain of dependent steps (load,
 * max, horizontal max, exp, sum, horizontal sum, divide, scale) of ~130 cycles of
 * latency and few instructions; interleaving two independent chains fills the
 * gaps. Rows that are not plain (see above) take the one-row path. */
static FM_TARGET_AVX512 void fm_row2_f32_avx512_short(const fm_row_args *a, const char *x0,
                                                     char *o0, fm_ssize lo0, fm_ssize hi0,
                                                     const char *x1, char *o1, fm_ssize lo1,
                                                     fm_ssize hi1, char *scratch)
{
    const fm_ssize N = a->n;
    const __m512 ninf = _mm512_set1_ps(-HUGE_VALF);
    const __m512 scale = _mm512_set1_ps((float)a->scale);
    __m512 z0[4], z1[4], acc0 = ninf, acc1 = ninf;
    __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
    float m0, m1, s0, s1;
    int v;
    if (lo0 >= hi0 || lo0 < 0 || hi0 > N || lo1 >= hi1 || lo1 < 0 || hi1 > N) goto one_by_one;
    FM_CHECK_SPAN(x0, 4, lo0, hi0, 4, a->x_lo, a->x_hi);
    FM_CHECK_SPAN(x1, 4, lo1, hi1, 4, a->x_lo, a->x_hi);
    FM_CHECK_SPAN(o0, 4, 0, N, 4, a->o_lo, a->o_hi);
    FM_CHECK_SPAN(o1, 4, 0, N, 4, a->o_lo, a->o_hi);
    for (v = 0; v < 4; v++) {
        const __mmask16 k0 = fm_lanes16(16 * v, lo0, hi0);
        const __mmask16 k1 = fm_lanes16(16 * v, lo1, hi1);
        z0[v] = _mm512_mask_mov_ps(
            ninf, k0, _mm512_mul_ps(_mm512_maskz_loadu_ps(k0, (const float *)x0 + 16 * v), scale));
        z1[v] = _mm512_mask_mov_ps(
            ninf, k1, _mm512_mul_ps(_mm512_maskz_loadu_ps(k1, (const float *)x1 + 16 * v), scale));
        acc0 = _mm512_max_ps(z0[v], acc0);
        acc1 = _mm512_max_ps(z1[v], acc1);
    }
    m0 = _mm512_reduce_max_ps(acc0);
    m1 = _mm512_reduce_max_ps(acc1);
    if (!(m0 > -64.0f) || !(m0 < 64.0f) || !(m1 > -64.0f) || !(m1 < 64.0f))
        goto one_by_one; /* as in fm_row_f32_avx512_short */
    for (v = 0; v < 4; v++) {
        z0[v] = fm_exp16_f32(_mm512_sub_ps(z0[v], _mm512_set1_ps(m0)));
        z1[v] = fm_exp16_f32(_mm512_sub_ps(z1[v], _mm512_set1_ps(m1)));
        sum0 = _mm512_add_ps(sum0, z0[v]);
        sum1 = _mm512_add_ps(sum1, z1[v]);
    }
    s0 = _mm512_reduce_add_ps(sum0);
    s1 = _mm512_reduce_add_ps(sum1);
    if (!(s0 == s0) || !(s1 == s1)) goto one_by_one;
    {
        const __m512 inv0 = _mm512_set1_ps((float)(1.0 / (double)s0));
        const __m512 inv1 = _mm512_set1_ps((float)(1.0 / (double)s1));
        for (v = 0; v < 4; v++) {
            const __mmask16 all = fm_lanes16(16 * v, 0, N);
            _mm512_mask_storeu_ps((float *)o0 + 16 * v, all, _mm512_mul_ps(z0[v], inv0));
            _mm512_mask_storeu_ps((float *)o1 + 16 * v, all, _mm512_mul_ps(z1[v], inv1));
        }
    }
    return;
one_by_one: /* a row that is not plain: each row on its own (nothing written yet) */
    fm_row_f32_avx512_short(a, x0, o0, NULL, NULL, lo0, hi0, scratch);
    fm_row_f32_avx512_short(a, x1, o1, NULL, NULL, lo1, hi1, scratch);
}
#endif

typedef void (*fm_row2_fn)(const fm_row_args *a, const char *x0, char *o0, fm_ssize lo0,
                           fm_ssize hi0, const char *x1, char *o1, fm_ssize lo1, fm_ssize hi1,
                           char *scratch);

typedef struct {
    const char *name;
    fm_row_fn row[4]; /* by dtype code: float16, float32, float64, bfloat16 */
    fm_map_f32_fn exp_f32;
    fm_map_f64_fn exp_f64;
    fm_h2f_fn h2f;
    fm_f2h_fn f2h;
    fm_h2f_fn bf2f;
    fm_f2h_fn f2bf;
} fm_isa_t;

#define FM_ISA_ENTRY(isa)                                                                \
    {                                                                                    \
        #isa, {fm_row_f16_##isa, fm_row_f32_##isa, fm_row_f64_##isa, fm_row_bf16_##isa}, \
            fm_exp_map_f32_##isa, fm_exp_map_f64_##isa, fm_h2f_map_##isa,                \
            fm_f2h_map_##isa, fm_bf2f_map_##isa, fm_f2bf_map_##isa                       \
    }

static const fm_isa_t fm_isas[] = {
    FM_ISA_ENTRY(generic),
#if FM_X86_MV
    FM_ISA_ENTRY(avx2),
    /* the AVX-512 variant's float32 rows try the short-row path first */
    {"avx512",
     {fm_row_f16_avx512, fm_row_f32_avx512_short, fm_row_f64_avx512, fm_row_bf16_avx512},
     fm_exp_map_f32_avx512, fm_exp_map_f64_avx512, fm_h2f_map_avx512, fm_f2h_map_avx512,
     fm_bf2f_map_avx512, fm_f2bf_map_avx512},
#endif
};

#define FM_N_ISAS ((int)(sizeof fm_isas / sizeof fm_isas[0]))

static int fm_isa_index = 0; /* the variant in use */

static FM_UNUSED int fm_isa_count(void) { return FM_N_ISAS; }

static FM_UNUSED const char *fm_isa_name(int i)
{
    return (i >= 0 && i < FM_N_ISAS) ? fm_isas[i].name : "";
}

/* Can this CPU (and OS) run variant i? */
static FM_UNUSED int fm_isa_supported(int i)
{
    if (i == 0) return 1;
#if FM_X86_MV
    __builtin_cpu_init();
    if (i == 1)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               fm_cpu_has_f16c();
    if (i == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               fm_cpu_has_f16c();
#endif
    return 0;
}

/* Whether the variant in use, on this CPU, would convert to bfloat16 natively. */
static int fm_bf16_native_possible(void)
{
#if FM_BF16_NATIVE
    return strcmp(fm_isas[fm_isa_index].name, "avx512") == 0 && fm_cpu_has_avx512bf16();
#else
    return 0;
#endif
}

/* Select variant i (-1: the best supported). Returns the index in use. */
static FM_UNUSED int fm_isa_select(int i)
{
    if (i < 0) {
        for (i = FM_N_ISAS - 1; i > 0 && !fm_isa_supported(i); i--) {
        }
    } else if (i >= FM_N_ISAS || !fm_isa_supported(i)) {
        return -1;
    }
    fm_isa_index = i;
    fm_bf16_native_on = fm_bf16_native_allowed && fm_bf16_native_possible();
    return i;
}

/* Allow (1) or forbid (0) VCVTNEPS2BF16 (tests compare both conversions on one CPU);
 * returns whether the variant in use now converts natively. */
static FM_UNUSED int fm_bf16_allow_native(int allow)
{
    fm_bf16_native_allowed = allow != 0;
    fm_bf16_native_on = fm_bf16_native_allowed && fm_bf16_native_possible();
    return fm_bf16_native_on;
}

static FM_UNUSED int fm_bf16_native(void) { return fm_bf16_native_on; }

static FM_UNUSED int fm_isa_current(void) { return fm_isa_index; }
static FM_UNUSED const fm_isa_t *fm_isa(void) { return &fm_isas[fm_isa_index]; }

/* Row function for dtype code 0 = float16, 1 = float32, 2 = float64, 3 = bfloat16. */
static FM_UNUSED fm_row_fn fm_row_for(int dtype_code) { return fm_isas[fm_isa_index].row[dtype_code]; }

/* Can this call's float32 rows use streaming stores (the AVX-512 variant only)? */
static FM_UNUSED int fm_can_stream(int dtype_code)
{
#if FM_X86_MV
    return dtype_code == 1 && strcmp(fm_isas[fm_isa_index].name, "avx512") == 0;
#else
    (void)dtype_code;
    return 0;
#endif
}

/* Make this thread's streaming stores visible before its rows count as done. */
static FM_UNUSED void fm_store_fence(void)
{
#if FM_X86_MV
    _mm_sfence();
#endif
}

/* A two-row function for calls whose rows are all short and plain (float32, N <= 64,
 * unit strides, no keep or bias array), or NULL: rows then go one by one. */
static FM_UNUSED fm_row2_fn fm_row2_for(int dtype_code, const fm_row_args *a)
{
#if FM_X86_MV
    if (dtype_code == 1 && strcmp(fm_isas[fm_isa_index].name, "avx512") == 0 &&
        a->n <= FM_SHORT_MAX && a->x_stride == 4 && a->out_stride == 4 && !a->has_keep &&
        !a->has_bias)
        return fm_row2_f32_avx512_short;
#endif
    (void)dtype_code;
    (void)a;
    return NULL;
}

#endif /* FASTMASK_SOFTMAX_ROW_H */

#else /* FM_TEMPLATE_PASS: instantiated for FM_T = float (FM_SFX _f32) and double ---- */

/* z at position i: scaled logit plus bias, or -inf where keep is false. Everything is
 * computed unconditionally and then selected, so the loops need no speculation. */
FM_INLINE FM_T FM_FN(fm_z)(const FM_T *src, const unsigned char *FM_RESTRICT keep,
                           const FM_T *FM_RESTRICT bias, FM_T scale, fm_ssize i,
                           const int hk, const int hb)
{
    FM_T z = src[i] * scale;
    if (hb) z = z + bias[i];
    if (hk) z = keep[i] ? z : FM_NEG_INF;
    return z;
}

/* max(a, b) that ignores a NaN in b: `b > a ? b : a` is maxps-shaped. */
#define FM_MAX(a, b) ((b) > (a) ? (b) : (a))

/* Lane reductions in constant-width steps (each one a vector op after SLP). */
FM_INLINE FM_T FM_FN(fm_reduce_max)(FM_T *acc)
{
    int l;
#define FM_MAX_STEP(w)                                                                  \
    if (FM_LANES > (w))                                                                 \
        for (l = 0; l < (w); l++) acc[l] = FM_MAX(acc[l], acc[l + (w)]);
    FM_MAX_STEP(32)
    FM_MAX_STEP(16)
    FM_MAX_STEP(8)
    FM_MAX_STEP(4)
    FM_MAX_STEP(2)
    FM_MAX_STEP(1)
#undef FM_MAX_STEP
    return acc[0];
}

/* max |src[i]| over n keys (NaN ignored), in whole blocks plus a scalar tail. */
FM_INLINE FM_T FM_FN(fm_abs_max)(const FM_T *src, fm_ssize n)
{
    FM_T acc[FM_LANES], r;
    fm_ssize i;
    int l;
    for (l = 0; l < FM_LANES; l++) acc[l] = 0;
    for (i = 0; i + FM_LANES <= n; i += FM_LANES) {
        FM_NO_UNROLL
        for (l = 0; l < FM_LANES; l++) acc[l] = FM_MAX(acc[l], FM_MAX(src[i + l], -src[i + l]));
    }
    r = FM_FN(fm_reduce_max)(acc);
    for (; i < n; i++) r = FM_MAX(r, FM_MAX(src[i], -src[i]));
    return r;
}

FM_INLINE double FM_FN(fm_reduce_sum)(FM_T *acc)
{
    int l;
#define FM_SUM_STEP(w)                                                                  \
    if (FM_LANES > (w))                                                                 \
        for (l = 0; l < (w); l++) acc[l] += acc[l + (w)];
    FM_SUM_STEP(32)
    FM_SUM_STEP(16)
    FM_SUM_STEP(8)
    FM_SUM_STEP(4)
    FM_SUM_STEP(2)
    FM_SUM_STEP(1)
#undef FM_SUM_STEP
    return (double)acc[0];
}

/*
 * Pass 2 recomputes z = x * scale and subtracts m, which compilers fuse into one
 * rounding: exp's argument is then exact(x * scale) - round(x_max * scale), off by the
 * max's own rounding error, a shift that cancels in the normalisation while it is
 * small. Once |m| reaches 2^(mantissa bits) that error can exceed the range of exp
 * (float32 1e20 * 0.1 is off by ~1e12: exp gives inf or 0, the row NaN or empty), so
 * such rows (rare; not with a bias) store z - max into e, computed in double with the
 * call's double scale, as the float64 reference forms z: near-ties keep their weights
 * at any magnitude, and products that overflow float32 (m = +-inf from finite logits;
 * m = -inf also for a row with nothing kept, told apart here) stay finite; for float64
 * the reference's own rounding. keep (or NULL) masks keys out. *m becomes 0. Returns
 * whether it did.
 */
FM_INLINE int FM_FN(fm_z_to_memory)(const FM_T *src, const unsigned char *keep,
                                     double scale, fm_ssize n, FM_T *e, FM_T *m)
{
    fm_ssize i;
    double md = -HUGE_VAL;
    if (*m > FM_NEG_INF ? FM_MAX(*m, -*m) < FM_Z_FUSED_MAX : !(FM_MAX(scale, -scale) > 1.0))
        return 0; /* m = -inf with |scale| > 1: maybe every kept product overflowed */
    for (i = 0; i < n; i++) {
        const double z = keep != NULL && !keep[i] ? -HUGE_VAL : (double)src[i] * scale;
        e[i] = (FM_T)z;
        md = z > md ? z : md; /* NaN ignored, as in pass 1 */
    }
    if (!(md > -HUGE_VAL)) return 0; /* nothing finite kept after all */
    if (sizeof(FM_T) == sizeof(double)) /* from memory: a product fused with the */
        for (i = 0; i < n; i++) e[i] = (FM_T)(e[i] - md); /* subtraction is unrounded */
    else /* float32: the products in double, with the reference's double scale */
        for (i = 0; i < n; i++)
            e[i] = keep != NULL && !keep[i] ? FM_NEG_INF
                                            : (FM_T)((double)src[i] * scale - md);
    *m = 0;
    return 1;
}

/*
 * A float32 row with a bias whose logits are large (|x * scale| >= FM_Z_BIAS_STAGE), or
 * whose max z is beyond the offset form's reach (|m| >= FM_Z_OFFSET_MAX, or overflowed
 * to +-inf from finite terms): fm_exp_offset rounds (bias - m) on its own, an error of
 * |bias - m| * 2^-24 per key, and for the keys that matter |bias - m| is about
 * |x * scale| (a bias that cancels large logits, or large logits beside a small bias;
 * at 1e3 that is already 2x the contract's 1e-5). Such rows store z - max into e from
 * z = x * scale + bias formed in double, the float64 reference's own arithmetic (with
 * the call's double scale: float32's rounded scale would be off by (x_i - x_j) * scale
 * * 2^-24 between keys whose logits the bias brings together; and the product rounded
 * before the bias is added, not fused with it). keep (or NULL) masks keys out; amax is
 * max |x| over the row. *m becomes 0. Returns whether it did; not for float64 (its own
 * rounding is the reference's) nor when nothing kept is finite in double.
 */
FM_INLINE int FM_FN(fm_bias_z_to_memory)(const FM_T *src, const unsigned char *keep,
                                          const FM_T *bias, double scale, fm_ssize n, FM_T *e,
                                          FM_T *m, FM_T amax)
{
    fm_ssize i;
    double md = -HUGE_VAL;
    if (sizeof(FM_T) == sizeof(double)) return 0;
    if ((double)amax * FM_MAX(scale, -scale) < FM_Z_BIAS_STAGE &&
        FM_MAX(*m, -*m) < FM_Z_OFFSET_MAX)
        return 0;
    for (i = 0; i < n; i++) {
        const double z = keep != NULL && !keep[i]
                             ? -HUGE_VAL
                             : fm_rounded((double)src[i] * scale) + (double)bias[i];
        md = z > md ? z : md; /* NaN ignored, as in pass 1 */
    }
    if (!(md > -HUGE_VAL)) return 0; /* nothing finite kept: the caller's zero / NaN scan */
    for (i = 0; i < n; i++)
        e[i] = keep != NULL && !keep[i]
                   ? FM_NEG_INF
                   : (FM_T)(fm_rounded((double)src[i] * scale) + (double)bias[i] - md);
    *m = 0;
    return 1;
}

/*
 * exp(z - m) of a key with a bias, from x and the bias rather than the rounded z:
 * (bias - m) first, whose rounding error is relative to that difference, then x * scale
 * added in one rounding. Rounding z = x * scale + bias first loses what the bias'
 * magnitude hides (a row whose every key carries -1e9, as TensorFlow masks a padding
 * row, has z all equal in float32: uniform weights instead of softmax(x)). m is the
 * max of the rounded z, so every argument shares its rounding error, which cancels in
 * the normalisation (|m| < FM_Z_OFFSET_MAX keeps it within 32, exp's range and the
 * sum's hold). Masked keys (z = -inf) stay exactly 0.
 */
FM_INLINE FM_T FM_FN(fm_exp_offset)(FM_T x, FM_T scale, FM_T b, FM_T m, FM_T z)
{
    const FM_T v = FM_EXP(x * scale + (b - m));
    return z == FM_NEG_INF ? (FM_T)0 : v; /* a kept NaN stays NaN */
}

/*
 * Passes 1 and 2 over a contiguous span of n >= 1 keys of src (with keep / bias rows,
 * or NULL). On FM_ROW_OK, e[0, n) holds exp(z - m) and *inv = 1 / sum(e); otherwise
 * the whole row (the caller's job) must be zeros (FM_ROW_ZERO) or NaN (FM_ROW_NAN).
 * pf is a prefetch distance in bytes for src (the next row), or 0.
 *
 * Every loop is either a plain map (which vectorises at any length) or a reduction over
 * whole blocks of FM_LANES keys into FM_LANES accumulators (no vector epilogue). A row
 * whose length is not a multiple of FM_LANES ends with one block that overlaps the
 * previous one: max is idempotent, and in the sum only its new lanes count. Rows
 * shorter than a block run the same arithmetic in a scalar loop.
 *
 * Without keep and bias, z = x * scale is recomputed in pass 2 (cheaper than a store
 * and a load). With either, pass 1 first writes z into e with plain map loops, so the
 * reductions and the exp loop see floats only (a keep byte per lane in those loops
 * makes compilers pick narrower vectors).
 */
FM_INLINE int FM_FN(fm_core)(const FM_T *src, const unsigned char *FM_RESTRICT keep,
                             const FM_T *FM_RESTRICT bias, FM_T scale, double sd, fm_ssize n,
                             FM_T *FM_RESTRICT e, FM_T *inv, fm_ssize pf, const int hk,
                             const int hb)
{
    const int zmap = hk || hb;
    int zread = zmap; /* pass 2 reads z from e (else recomputes x * scale) */
    int staged = 0;   /* e holds z - max, from double (fm_z_to_memory and its bias form) */
    const fm_ssize nfull = n - n % FM_LANES;
    const int rem = (int)(n - nfull);
    FM_T acc[FM_LANES];
    FM_T m;
    double s = 0.0;
    fm_ssize i, start;
    int l;

    if (zmap) {
        for (i = 0; i < nfull; i += FM_LANES) {
            FM_PREFETCH_AT(src + i, pf);
            if (FM_LANES * sizeof(FM_T) > 64) FM_PREFETCH_AT(src + i, pf + 64);
            FM_NO_UNROLL
            for (l = 0; l < FM_LANES; l++)
                e[i + l] = hb ? src[i + l] * scale + bias[i + l] : src[i + l] * scale;
        }
        for (; i < n; i++) e[i] = hb ? src[i] * scale + bias[i] : src[i] * scale;
        if (hk)
            for (i = 0; i < n; i++) e[i] = keep[i] ? e[i] : FM_NEG_INF;
    }

    if (n < FM_LANES) {
        /* A short row, scalar. */
        m = FM_NEG_INF;
        for (i = 0; i < n; i++) {
            const FM_T z = zmap ? e[i] : src[i] * scale;
            m = FM_MAX(m, z);
        }
        if (hb ? FM_FN(fm_bias_z_to_memory)(src, hk ? keep : NULL, bias, sd, n, e, &m,
                                            FM_FN(fm_abs_max)(src, n))
               : FM_FN(fm_z_to_memory)(src, hk ? keep : NULL, sd, n, e, &m))
            zread = 1, staged = 1;
        if (m > FM_NEG_INF) {
            const int offset = hb && !staged && FM_MAX(m, -m) < FM_Z_OFFSET_MAX;
            for (i = 0; i < n; i++) {
                const FM_T z = zread ? e[i] : src[i] * scale;
                e[i] = offset ? FM_FN(fm_exp_offset)(src[i], scale, bias[i], m, z)
                              : FM_EXP(z - m);
                s += (double)e[i];
            }
        }
    } else {
        /* Pass 1: max of z, NaN ignored. */
        for (l = 0; l < FM_LANES; l++) acc[l] = FM_NEG_INF;
        for (i = 0; i < nfull; i += FM_LANES) {
            if (!zmap) {
                FM_PREFETCH_AT(src + i, pf);
                if (FM_LANES * sizeof(FM_T) > 64) FM_PREFETCH_AT(src + i, pf + 64);
            }
            FM_NO_UNROLL
            for (l = 0; l < FM_LANES; l++) {
                const FM_T z = zmap ? e[i + l] : src[i + l] * scale;
                acc[l] = FM_MAX(acc[l], z);
            }
        }
        if (rem) {
            i = n - FM_LANES;
            FM_NO_UNROLL
            for (l = 0; l < FM_LANES; l++) {
                const FM_T z = zmap ? e[i + l] : src[i + l] * scale;
                acc[l] = FM_MAX(acc[l], z);
            }
        }
        m = FM_FN(fm_reduce_max)(acc);

        /* Pass 2: e = exp(z - m) (exactly 0 where masked: exp(-inf)), summed in blocks
         * of FM_BLOCK keys while they are in L1; each lane sums at most
         * FM_BLOCK / FM_LANES terms before the block total joins a double. */
        if (hb ? FM_FN(fm_bias_z_to_memory)(src, hk ? keep : NULL, bias, sd, n, e, &m,
                                            FM_FN(fm_abs_max)(src, n))
               : FM_FN(fm_z_to_memory)(src, hk ? keep : NULL, sd, n, e, &m))
            zread = 1, staged = 1;
        if (m > FM_NEG_INF) {
            const int offset = hb && !staged && FM_MAX(m, -m) < FM_Z_OFFSET_MAX;
            for (start = 0; start < nfull; start += FM_BLOCK) {
                const fm_ssize end = nfull - start > FM_BLOCK ? start + FM_BLOCK : nfull;
                if (offset)
                    for (i = start; i < end; i++)
                        e[i] = FM_FN(fm_exp_offset)(src[i], scale, bias[i], m, e[i]);
                else if (zread)
                    for (i = start; i < end; i++) e[i] = FM_EXP(e[i] - m);
                else
                    for (i = start; i < end; i++) e[i] = FM_EXP(src[i] * scale - m);
                for (l = 0; l < FM_LANES; l++) acc[l] = 0;
                for (i = start; i < end; i += FM_LANES) {
                    FM_NO_UNROLL
                    for (l = 0; l < FM_LANES; l++) acc[l] += e[i + l];
                }
                s += FM_FN(fm_reduce_sum)(acc);
            }
            if (rem) {
                /* The overlapping last block: its first FM_LANES - rem lanes are done. */
                i = n - FM_LANES;
                FM_NO_UNROLL
                for (l = 0; l < FM_LANES; l++) {
                    const FM_T z = zread ? e[i + l] : src[i + l] * scale;
                    const FM_T v = offset ? FM_FN(fm_exp_offset)(src[i + l], scale,
                                                                 bias[i + l], m, z)
                                          : FM_EXP(z - m);
                    const int fresh = l >= FM_LANES - rem;
                    e[i + l] = fresh ? v : e[i + l];
                    acc[l] = fresh ? v : 0;
                }
                s += FM_FN(fm_reduce_sum)(acc);
            }
        }
    }

    if (!(m > FM_NEG_INF)) {
        /* Nothing kept, or every kept z is -inf or NaN: a rare path, scanned for NaN. */
        for (i = 0; i < n; i++) {
            const FM_T z = FM_FN(fm_z)(src, keep, bias, scale, i, hk, hb);
            if (z != z) return FM_ROW_NAN;
        }
        return FM_ROW_ZERO;
    }
    if (s != s) return FM_ROW_NAN; /* a kept NaN, or a kept +inf (inf - inf) */
    *inv = (FM_T)(1.0 / s);        /* s >= 1: the max itself contributes exp(0) */
    return FM_ROW_OK;
}

/* Pass 3 for a unit-stride output: dst[0, n) = e[0, n) * inv, in whole blocks (the last
 * one overlapping, for rows that are not a multiple of FM_LANES). */
FM_INLINE void FM_FN(fm_scale_out)(FM_T *FM_RESTRICT dst, const FM_T *FM_RESTRICT e,
                                   FM_T inv, fm_ssize n)
{
    fm_ssize i;
    int l;
    if (n < FM_LANES) {
        for (i = 0; i < n; i++) dst[i] = e[i] * inv;
        return;
    }
    for (i = 0; i + FM_LANES <= n; i += FM_LANES)
        for (l = 0; l < FM_LANES; l++) dst[i + l] = e[i + l] * inv;
    if (i < n) {
        i = n - FM_LANES;
        for (l = 0; l < FM_LANES; l++) dst[i + l] = e[i + l] * inv;
    }
}

/* fm_core with the keep / bias cases as compile-time constants. */
FM_INLINE int FM_FN(fm_core_dispatch)(const FM_T *src, const unsigned char *FM_RESTRICT keep,
                                      const FM_T *FM_RESTRICT bias, double scale, fm_ssize n,
                                      FM_T *FM_RESTRICT e, FM_T *inv, fm_ssize pf)
{
    /* An unbiased row's staging forms products in double from the scale rounded to
     * FM_T: exact for float32, so a fused and an unfused evaluation agree to the bit (a
     * double scale would make them differ by a rounding of |z|, beyond exp's range at
     * 1e18). A biased row's staging keeps the call's double scale, as the reference
     * forms z: with the rounded one, keys whose logits the bias brings together would
     * be off by (x_i - x_j) * scale * 2^-24 (2e-5 relative at |x_i - x_j| ~ 8e3). */
    const FM_T sc = (FM_T)scale;
    if (!bias) scale = (double)sc;
    if (keep) {
        if (bias) return FM_FN(fm_core)(src, keep, bias, sc, scale, n, e, inv, pf, 1, 1);
        return FM_FN(fm_core)(src, keep, NULL, sc, scale, n, e, inv, pf, 1, 0);
    }
    if (bias) return FM_FN(fm_core)(src, NULL, bias, sc, scale, n, e, inv, pf, 0, 1);
    return FM_FN(fm_core)(src, NULL, NULL, sc, scale, n, e, inv, pf, 0, 0);
}

/* Bias for [lo, lo + n) as a contiguous array, gathered when not unit-stride. */
FM_INLINE const FM_T *FM_FN(fm_bias_row)(const fm_row_args *a, const char *b, fm_ssize lo,
                                         fm_ssize n, char *scratch)
{
    FM_T *bb;
    fm_ssize i;
    FM_CHECK_SPAN(b, a->bias_stride, lo, lo + n, (fm_ssize)sizeof(FM_T), a->b_lo, a->b_hi);
    if (a->bias_stride == (fm_ssize)sizeof(FM_T)) return (const FM_T *)b + lo;
    bb = (FM_T *)(scratch + a->off_b);
    for (i = 0; i < n; i++) bb[i] = *(const FM_T *)(b + (lo + i) * a->bias_stride);
    return bb;
}

FM_INLINE FM_T FM_FN(fm_opaque)(FM_T v)
{
    volatile FM_T box = v; /* hides the value from the optimiser */
    return box;
}

/* Fill positions [from, to) of a row with v. */
FM_INLINE void FM_FN(fm_fill)(char *o, fm_ssize os, fm_ssize from, fm_ssize to, FM_T v)
{
    fm_ssize i;
    if (to <= from) return;
    if (os == (fm_ssize)sizeof(FM_T)) {
        /* A plain vector loop: gcc would turn a known-zero fill into memset, whose
         * `rep stosb` start-up cost per row is larger than the fill itself here. */
        FM_T *p = (FM_T *)o;
        const FM_T w = FM_FN(fm_opaque)(v);
        for (i = from; i < to; i++) p[i] = w;
        return;
    }
    for (i = from; i < to; i++) *(FM_T *)(o + i * os) = v;
}

FM_INLINE FM_T FM_FN(fm_quiet_nan)(void)
{
    const FM_NAN_BITS bits = FM_NAN_PATTERN;
    FM_T v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* A float32 or float64 row (x has the compute dtype). x is read in place when
 * unit-stride, else gathered; out is written once, in pass 3, at any stride. */
FM_INLINE void FM_FN(fm_row_body)(const fm_row_args *a, const char *x, char *o, const char *k,
                                  const char *b, fm_ssize lo, fm_ssize hi, char *scratch)
{
    const fm_ssize N = a->n, sz = (fm_ssize)sizeof(FM_T);
    const unsigned char *kp;
    const FM_T *bp = NULL;
    const FM_T *src;
    FM_T *e = (FM_T *)(scratch + a->off_e);
    FM_T inv;
    fm_ssize n, i, pf = 0;
    int st;

    if (lo < 0) lo = 0;
    if (hi > N) hi = N;
    if (a->has_keep && a->keep_stride == 0 && hi > lo && !k[0]) hi = lo;
    FM_CHECK_SPAN(o, a->out_stride, 0, N, sz, a->o_lo, a->o_hi);
    if (hi <= lo) {
        FM_FN(fm_fill)(o, a->out_stride, 0, N, 0);
        return;
    }
    n = hi - lo;
    FM_CHECK_SPAN(x, a->x_stride, lo, hi, sz, a->x_lo, a->x_hi);
    kp = fm_keep_row(a, k, lo, n, scratch);
    if (a->has_bias) bp = FM_FN(fm_bias_row)(a, b, lo, n, scratch);
    if (a->x_stride == sz) {
        src = (const FM_T *)x + lo;
        pf = a->pf_dist;
    } else {
        FM_T *xb = (FM_T *)(scratch + a->off_x);
        const char *xp = x + lo * a->x_stride;
        const fm_ssize xs = a->x_stride;
        for (i = 0; i < n; i++) xb[i] = *(const FM_T *)(xp + i * xs);
        src = xb;
    }

    st = FM_FN(fm_core_dispatch)(src, kp, bp, a->scale, n, e, &inv, pf);
    if (st != FM_ROW_OK) {
        FM_FN(fm_fill)(o, a->out_stride, 0, N, st == FM_ROW_NAN ? FM_FN(fm_quiet_nan)() : 0);
        return;
    }
    /* Pass 3 (x may be out: every read of x is done by now). */
    if (a->out_stride == sz) {
        FM_FN(fm_scale_out)((FM_T *)o + lo, e, inv, n);
    } else {
        char *op = o + lo * a->out_stride;
        const fm_ssize os = a->out_stride;
        for (i = 0; i < n; i++) *(FM_T *)(op + i * os) = e[i] * inv;
    }
    FM_FN(fm_fill)(o, a->out_stride, 0, lo, 0);
    FM_FN(fm_fill)(o, a->out_stride, hi, N, 0);
}

#endif /* FM_TEMPLATE_PASS */
