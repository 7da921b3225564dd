/*
 * fastmask/_attention_tile.h -- one instantiation of the fused attention engine.
 *
 * Included by _attention_engine.h once per (compute type, ISA variant) with (and
 * undefined again at the end of this file):
 *   FM_AT_T     float or double          FM_AT_IT  int32_t or int64_t (same width)
 *   FM_AT_VB    vector bytes (16/32/64)  FM_AT_SFX name suffix, e.g. _f32_avx512
 *   FM_AT_ATTR  target attribute         FM_AT_F32 1 for float, 0 for double
 *   FM_AT_JB    keys per step of the Q.K micro-kernel (register blocking)
 *
 * Layout: "rows in lanes". A work item holds up to FM_AT_RV * VL score rows (query
 * positions of one or more heads that share a kv head). Q is packed once per item
 * as Q^T (D x Rp); for each block of keys the micro-kernel forms S^T (keys x Rp) by
 * broadcasting K[j][d] against Q^T[d][rows], so K and V are read in place (no
 * packing, no transposition) and the online softmax runs down the key axis with
 * every lane an independent row: max, exp and sum need no horizontal reduction, and
 * each row's kept interval [lo, hi) is a lane-wise compare. P . V accumulates
 * O^T (Dv x Rp) the same way, broadcasting V[j][e] against P^T[j][rows].
 */

#define FM_AT_VL ((int)(FM_AT_VB / sizeof(FM_AT_T)))
#define FM_AT_VL_ FM_AT_VL
#define FM_AT_FN(name) FM_CAT(name, FM_AT_SFX)

typedef FM_AT_T FM_AT_FN(fm_at_v) __attribute__((vector_size(FM_AT_VB), aligned(FM_AT_VB)));
typedef FM_AT_IT FM_AT_FN(fm_at_iv) __attribute__((vector_size(FM_AT_VB), aligned(FM_AT_VB)));
#define V FM_AT_FN(fm_at_v)
#define IV FM_AT_FN(fm_at_iv)

FM_AT_ATTR FM_INLINE V FM_AT_FN(fm_at_splat)(FM_AT_T x)
{
    V z = {0};
    return z + x;
}

FM_AT_ATTR FM_INLINE IV FM_AT_FN(fm_at_isplat)(FM_AT_IT x)
{
    IV z = {0};
    return z + x;
}

FM_AT_ATTR FM_INLINE V FM_AT_FN(fm_at_sel)(IV m, V a, V b) /* m ? a : b, lane-wise */
{
    return (V)(((IV)a & m) | ((IV)b & ~m));
}

/* exp(x) for x <= 0, lane-wise: the polynomial of fm_exp_f32 / fm_exp_f64, so results
 * match the softmax kernels; exactly 0 below the underflow threshold and for -inf,
 * NaN in, NaN out. */
FM_AT_ATTR FM_INLINE V FM_AT_FN(fm_at_exp)(V x)
{
#if FM_AT_F32
    const V magic = FM_AT_FN(fm_at_splat)(12582912.0f);
    const V t = x * 1.44269502f + magic;
    const V n = t - magic;
    V r = x - n * 0.693115234375f;
    V p;
    IV e;
    r = r - n * 3.19461833e-05f;
    p = FM_AT_FN(fm_at_splat)(1.98412698e-04f);
    p = p * r + 1.38888889e-03f;
    p = p * r + 8.33333377e-03f;
    p = p * r + 4.16666679e-02f;
    p = p * r + 1.66666672e-01f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    e = (IV)((uint32_t __attribute__((vector_size(FM_AT_VB))))((IV)t - (IV)magic + 127)
             << 23);
    p = p * (V)e;
    return FM_AT_FN(fm_at_sel)(x < FM_EXP_MIN_F32, FM_AT_FN(fm_at_splat)(0.0f), p);
#else
    const V magic = FM_AT_FN(fm_at_splat)(6755399441055744.0);
    const V t = x * 1.4426950408889634 + magic;
    const V n = t - magic;
    V r = x - n * 0.69314718055989033;
    V p;
    IV e;
    r = r - n * 5.4979230187083712e-14;
    p = FM_AT_FN(fm_at_splat)(1.6059043836821613e-10);
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
    e = (IV)((uint64_t __attribute__((vector_size(FM_AT_VB))))((IV)t - (IV)magic + 1023)
             << 52);
    p = p * (V)e;
    return FM_AT_FN(fm_at_sel)(x < FM_EXP_MIN_F64, FM_AT_FN(fm_at_splat)(0.0), p);
#endif
}

/* S^T[j][rows] = sum_d K[j][d] * Q^T[d][rows] for JB keys at a time; NRV row vectors
 * (a compile-time constant once inlined, so the accumulators live in registers). */
FM_AT_ATTR FM_INLINE void FM_AT_FN(fm_at_qk_n)(const FM_AT_T *qt, fm_ssize rp, fm_ssize d_n,
                                               const char *kr, fm_ssize ks, fm_ssize nk,
                                               FM_AT_T *st, const int NRV)
{
    fm_ssize j = 0, d;
    int i, jj;
    for (; j + FM_AT_JB <= nk; j += FM_AT_JB) {
        V c[FM_AT_JB][FM_AT_RV];
        const FM_AT_T *kp[FM_AT_JB];
        for (jj = 0; jj < FM_AT_JB; jj++) {
            kp[jj] = (const FM_AT_T *)(kr + (j + jj) * ks);
            for (i = 0; i < NRV; i++) c[jj][i] = FM_AT_FN(fm_at_splat)(0);
        }
        for (d = 0; d < d_n; d++) {
            V qv[FM_AT_RV];
            for (i = 0; i < NRV; i++) qv[i] = *(const V *)(qt + d * rp + i * FM_AT_VL);
            for (jj = 0; jj < FM_AT_JB; jj++) {
                const FM_AT_T kv = kp[jj][d];
                for (i = 0; i < NRV; i++) c[jj][i] += kv * qv[i];
            }
        }
        for (jj = 0; jj < FM_AT_JB; jj++)
            for (i = 0; i < NRV; i++) *(V *)(st + (j + jj) * rp + i * FM_AT_VL) = c[jj][i];
    }
    for (; j < nk; j++) {
        V c[FM_AT_RV];
        const FM_AT_T *k1 = (const FM_AT_T *)(kr + j * ks);
        for (i = 0; i < NRV; i++) c[i] = FM_AT_FN(fm_at_splat)(0);
        for (d = 0; d < d_n; d++) {
            const FM_AT_T kv = k1[d];
            for (i = 0; i < NRV; i++) c[i] += kv * *(const V *)(qt + d * rp + i * FM_AT_VL);
        }
        for (i = 0; i < NRV; i++) *(V *)(st + j * rp + i * FM_AT_VL) = c[i];
    }
}

/* O^T[e][rows] += sum_j V[j][e] * P^T[j][rows], four values of e at a time (first:
 * O^T = ..., it holds nothing yet). */
FM_AT_ATTR FM_INLINE void FM_AT_FN(fm_at_pv_n)(const FM_AT_T *pt, fm_ssize rp, fm_ssize nk,
                                               const char *vr, fm_ssize vs, fm_ssize dv_n,
                                               FM_AT_T *ot, int first, const int NRV)
{
    fm_ssize e = 0, j;
    int i, ee;
    for (; e < dv_n; e += 4) {
        const int ne = dv_n - e >= 4 ? 4 : (int)(dv_n - e);
        V c[4][FM_AT_RV];
        for (ee = 0; ee < 4; ee++)
            for (i = 0; i < NRV; i++)
                c[ee][i] = (ee < ne && !first) ? *(V *)(ot + (e + ee) * rp + i * FM_AT_VL)
                                               : FM_AT_FN(fm_at_splat)(0);
        if (ne == 4) {
            for (j = 0; j < nk; j++) {
                const FM_AT_T *vj = (const FM_AT_T *)(vr + j * vs) + e;
                V pv[FM_AT_RV];
                for (i = 0; i < NRV; i++) pv[i] = *(const V *)(pt + j * rp + i * FM_AT_VL);
                for (ee = 0; ee < 4; ee++) {
                    const FM_AT_T x = vj[ee];
                    for (i = 0; i < NRV; i++) c[ee][i] += x * pv[i];
                }
            }
        } else {
            for (j = 0; j < nk; j++) {
                const FM_AT_T *vj = (const FM_AT_T *)(vr + j * vs) + e;
                for (ee = 0; ee < ne; ee++) {
                    const FM_AT_T x = vj[ee];
                    for (i = 0; i < NRV; i++)
                        c[ee][i] += x * *(const V *)(pt + j * rp + i * FM_AT_VL);
                }
            }
        }
        for (ee = 0; ee < ne; ee++)
            for (i = 0; i < NRV; i++) *(V *)(ot + (e + ee) * rp + i * FM_AT_VL) = c[ee][i];
    }
}

/* Row vectors [0, nrv) of qt / st (offset by the caller); rp stays the row stride. */
static FM_AT_ATTR void FM_AT_FN(fm_at_qk)(const FM_AT_T *qt, fm_ssize rp, fm_ssize d_n,
                                          const char *kr, fm_ssize ks, fm_ssize nk,
                                          FM_AT_T *st, fm_ssize nrv)
{
    switch (nrv) {
    case 1: FM_AT_FN(fm_at_qk_n)(qt, rp, d_n, kr, ks, nk, st, 1); break;
    case 2: FM_AT_FN(fm_at_qk_n)(qt, rp, d_n, kr, ks, nk, st, 2); break;
    case 3: FM_AT_FN(fm_at_qk_n)(qt, rp, d_n, kr, ks, nk, st, 3); break;
    default: FM_AT_FN(fm_at_qk_n)(qt, rp, d_n, kr, ks, nk, st, FM_AT_RV); break;
    }
}

static FM_AT_ATTR void FM_AT_FN(fm_at_pv)(const FM_AT_T *pt, fm_ssize rp, fm_ssize nk,
                                          const char *vr, fm_ssize vs, fm_ssize dv_n,
                                          FM_AT_T *ot, int first, fm_ssize nrv)
{
    switch (nrv) {
    case 1: FM_AT_FN(fm_at_pv_n)(pt, rp, nk, vr, vs, dv_n, ot, first, 1); break;
    case 2: FM_AT_FN(fm_at_pv_n)(pt, rp, nk, vr, vs, dv_n, ot, first, 2); break;
    case 3: FM_AT_FN(fm_at_pv_n)(pt, rp, nk, vr, vs, dv_n, ot, first, 3); break;
    default: FM_AT_FN(fm_at_pv_n)(pt, rp, nk, vr, vs, dv_n, ot, first, FM_AT_RV); break;
    }
}

/* One row vector (the rows of lanes [0, VL) of qt / st) against 8 keys at a time: 8
 * accumulator chains where fm_at_qk_n with NRV = 1 has JB, so a row vector's own key
 * range (the staggered rows of causal diagonals and window edges) runs at the FMA
 * units' throughput rather than at their latency. */
static FM_AT_ATTR void FM_AT_FN(fm_at_qk_rv)(const FM_AT_T *qt, fm_ssize rp, fm_ssize d_n,
                                             const char *kr, fm_ssize ks, fm_ssize nk,
                                             FM_AT_T *st)
{
    fm_ssize j = 0, d;
    int jj;
    for (; j + 8 <= nk; j += 8) {
        V c[8];
        const FM_AT_T *kp[8];
        for (jj = 0; jj < 8; jj++) {
            kp[jj] = (const FM_AT_T *)(kr + (j + jj) * ks);
            c[jj] = FM_AT_FN(fm_at_splat)(0);
        }
        for (d = 0; d < d_n; d++) {
            const V qv = *(const V *)(qt + d * rp);
            for (jj = 0; jj < 8; jj++) c[jj] += kp[jj][d] * qv;
        }
        for (jj = 0; jj < 8; jj++) *(V *)(st + (j + jj) * rp) = c[jj];
    }
    if (j < nk) FM_AT_FN(fm_at_qk_n)(qt, rp, d_n, kr + j * ks, ks, nk - j, st + j * rp, 1);
}

/* O^T[e][lanes] += sum_j V[j][e] * P^T[j][lanes] for one row vector, FM_AT_EV values
 * of e at a time (as many chains; one V row's values are broadcast from one pointer).
 * 16 with AVX-512's 32 vector registers, 8 with the 16 of AVX2 and SSE. */
#define FM_AT_EV (FM_AT_VB == 64 ? 16 : 8)
static FM_AT_ATTR void FM_AT_FN(fm_at_pv_rv)(const FM_AT_T *pt, fm_ssize rp, fm_ssize nk,
                                             const char *vr, fm_ssize vs, fm_ssize dv_n,
                                             FM_AT_T *ot)
{
    fm_ssize e = 0, j;
    int ee;
    for (; e + FM_AT_EV <= dv_n; e += FM_AT_EV) {
        V c[FM_AT_EV];
        for (ee = 0; ee < FM_AT_EV; ee++) c[ee] = *(V *)(ot + (e + ee) * rp);
        for (j = 0; j < nk; j++) {
            const FM_AT_T *vj = (const FM_AT_T *)(vr + j * vs) + e;
            const V pv = *(const V *)(pt + j * rp);
            for (ee = 0; ee < FM_AT_EV; ee++) c[ee] += vj[ee] * pv;
        }
        for (ee = 0; ee < FM_AT_EV; ee++) *(V *)(ot + (e + ee) * rp) = c[ee];
    }
    if (e < dv_n)
        FM_AT_FN(fm_at_pv_n)(pt, rp, nk, vr + e * (fm_ssize)sizeof(FM_AT_T), vs, dv_n - e,
                             ot + e * rp, 0, 1);
}

/* Online softmax of one block of scores S^T (nk x rp, in place -> P^T), lane = row:
 * scale, bias, the rows' intervals and the dense keep mask; the running max m and sum
 * l of every row are updated and O^T is rescaled. A kept NaN or +inf score makes the
 * row's sum NaN (exp(NaN - m) or exp(inf - inf)), which the store turns into a NaN row,
 * so the hot loop carries no NaN test. `full`: every lane keeps every key of the block
 * and there is no bias or keep array (most blocks of padding and causal calls). */
FM_AT_ATTR FM_INLINE void FM_AT_FN(fm_at_softmax_n)(const fm_at_item *it, fm_ssize k0,
                                                    fm_ssize nk, FM_AT_T *st,
                                                    const FM_AT_T *bt,
                                                    const unsigned char *kt, FM_AT_T *m,
                                                    FM_AT_T *l, FM_AT_T *ot, fm_ssize dv_n,
                                                    double scale, int full, int first,
                                                    const int NRV)
{
    const fm_ssize rp = it->rp;
    const V sc = FM_AT_FN(fm_at_splat)((FM_AT_T)scale);
    const V ninf = FM_AT_FN(fm_at_splat)(-(FM_AT_T)INFINITY);
    const V zero = FM_AT_FN(fm_at_splat)(0);
    V mb[FM_AT_RV], mu[FM_AT_RV], lb[FM_AT_RV], alpha[FM_AT_RV];
    fm_ssize j, e;
    int i;
    for (i = 0; i < NRV; i++) mb[i] = ninf;
    if (full) {
        /* the max of the raw scores; the scale (> 0) is applied with the exp */
        for (j = 0; j < nk; j++)
            for (i = 0; i < NRV; i++) {
                const V s = *(V *)(st + j * rp + i * FM_AT_VL);
                mb[i] = FM_AT_FN(fm_at_sel)(s > mb[i], s, mb[i]);
            }
        for (i = 0; i < NRV; i++) mb[i] = FM_AT_FN(fm_at_sel)(mb[i] == ninf, mb[i], mb[i] * sc);
    } else {
        const FM_AT_IT *lo = (const FM_AT_IT *)it->lo;
        const FM_AT_IT *hi = (const FM_AT_IT *)it->hi;
        IV lov[FM_AT_RV], hiv[FM_AT_RV];
        for (i = 0; i < NRV; i++) {
            lov[i] = *(const IV *)(lo + i * FM_AT_VL);
            hiv[i] = *(const IV *)(hi + i * FM_AT_VL);
        }
        for (j = 0; j < nk; j++) {
            const IV jv = FM_AT_FN(fm_at_isplat)((FM_AT_IT)(k0 + j));
            for (i = 0; i < NRV; i++) {
                const fm_ssize at = j * rp + i * FM_AT_VL;
                IV keep = (jv >= lov[i]) & (jv < hiv[i]);
                V s = *(V *)(st + at) * sc;
                if (bt) s += *(const V *)(bt + at);
                if (kt) {
                    IV kk = {0};
                    int q;
                    for (q = 0; q < FM_AT_VL; q++) kk[q] = kt[at + q] ? -1 : 0;
                    keep &= kk;
                }
                s = FM_AT_FN(fm_at_sel)(keep, s, ninf);
                mb[i] = FM_AT_FN(fm_at_sel)(s > mb[i], s, mb[i]);
                *(V *)(st + at) = s;
            }
        }
    }
    for (i = 0; i < NRV; i++) {
        const V mo = *(V *)(m + i * FM_AT_VL);
        const V mn = FM_AT_FN(fm_at_sel)(mb[i] > mo, mb[i], mo);
        mu[i] = FM_AT_FN(fm_at_sel)(mn == ninf, zero, mn); /* no (-inf) - (-inf) */
        alpha[i] = FM_AT_FN(fm_at_exp)(mo - mu[i]);      /* 1 where the max did not grow */
        *(V *)(m + i * FM_AT_VL) = mn;
        lb[i] = zero;
    }
    if (full) {
        for (j = 0; j < nk; j++)
            for (i = 0; i < NRV; i++) {
                const fm_ssize at = j * rp + i * FM_AT_VL;
                const V p = FM_AT_FN(fm_at_exp)(*(V *)(st + at) * sc - mu[i]);
                *(V *)(st + at) = p;
                lb[i] += p;
            }
    } else {
        for (j = 0; j < nk; j++)
            for (i = 0; i < NRV; i++) {
                const fm_ssize at = j * rp + i * FM_AT_VL;
                const V p = FM_AT_FN(fm_at_exp)(*(V *)(st + at) - mu[i]);
                *(V *)(st + at) = p;
                lb[i] += p;
            }
    }
    for (i = 0; i < NRV; i++) {
        const IV grew = alpha[i] != FM_AT_FN(fm_at_splat)(1);
        FM_AT_IT any = 0;
        int q;
        *(V *)(l + i * FM_AT_VL) = *(V *)(l + i * FM_AT_VL) * alpha[i] + lb[i];
        for (q = 0; q < FM_AT_VL; q++) any |= grew[q];
        if (any && !first) /* O^T rescaled only where some row's max grew */
            for (e = 0; e < dv_n; e++) *(V *)(ot + e * rp + i * FM_AT_VL) *= alpha[i];
    }
}

static FM_AT_ATTR void FM_AT_FN(fm_at_softmax_block)(const fm_at_item *it, fm_ssize k0,
                                                     fm_ssize nk, FM_AT_T *st,
                                                     const FM_AT_T *bt,
                                                     const unsigned char *kt, FM_AT_T *m,
                                                     FM_AT_T *l, FM_AT_T *ot, fm_ssize dv_n,
                                                     double scale, int first)
{
    int full = !bt && !kt && scale > 0;
    fm_ssize r;
    const FM_AT_IT *lo = (const FM_AT_IT *)it->lo, *hi = (const FM_AT_IT *)it->hi;
    for (r = 0; r < it->nrows && full; r++) full = lo[r] <= k0 && hi[r] >= k0 + nk;
    switch (it->rp / FM_AT_VL) {
    case 1: FM_AT_FN(fm_at_softmax_n)(it, k0, nk, st, bt, kt, m, l, ot, dv_n, scale, full, first, 1); break;
    case 2: FM_AT_FN(fm_at_softmax_n)(it, k0, nk, st, bt, kt, m, l, ot, dv_n, scale, full, first, 2); break;
    case 3: FM_AT_FN(fm_at_softmax_n)(it, k0, nk, st, bt, kt, m, l, ot, dv_n, scale, full, first, 3); break;
    default: FM_AT_FN(fm_at_softmax_n)(it, k0, nk, st, bt, kt, m, l, ot, dv_n, scale, full, first, FM_AT_RV); break;
    }
}

/* One work item's split [ka, kb) of keys: Q^T packed, then every key block computed.
 * State (m, l, O^T) is left in the thread's scratch. */
static FM_AT_ATTR void FM_AT_FN(fm_at_item_run)(fm_attn_args *a, const fm_at_item *it,
                                                fm_ssize ka, fm_ssize kb, char *scratch,
                                                const fm_at_layout *lay)
{
    const fm_ssize rp = it->rp, d_n = a->D, dv_n = a->Dv, bk = lay->bk;
    FM_AT_T *qt = (FM_AT_T *)(scratch + lay->off_qt);
    FM_AT_T *st = (FM_AT_T *)(scratch + lay->off_st);
    FM_AT_T *ot = (FM_AT_T *)(scratch + lay->off_ot);
    FM_AT_T *bt = a->bias ? (FM_AT_T *)(scratch + lay->off_bt) : NULL;
    unsigned char *kt = (a->keep || a->pred) ? (unsigned char *)(scratch + lay->off_kt) : NULL;
    char *ub = (a->pred || a->score) ? scratch + lay->off_ub : NULL; /* a user row */
    FM_AT_T *m = (FM_AT_T *)(scratch + lay->off_m);
    FM_AT_T *l = (FM_AT_T *)(scratch + lay->off_l);
    FM_AT_IT *lo = (FM_AT_IT *)it->lo, *hi = (FM_AT_IT *)it->hi;
    const char *kbase = a->k + it->b * a->ks_b + it->kvh * a->ks_h;
    const char *vbase = a->v + it->b * a->vs_b + it->kvh * a->vs_h;
    const fm_ssize nrv = rp / FM_AT_VL;
    fm_ssize r, d, k0, i0;
    fm_ssize rv_lo[FM_AT_RV], rv_hi[FM_AT_RV]; /* keys kept by some row of a row vector */
    fm_ssize rv_a[FM_AT_RV], rv_b[FM_AT_RV];   /* ... within this block: [a, b) */
    int first = 1; /* no block computed yet: O^T holds nothing (written, not added to) */
    int whole;     /* every row vector keeps the whole block */
    FM_AT_T boff[FM_AT_RMAX]; /* each row's bias offset (fm_at_bias_offset), or 0 */

    for (r = 0; r < it->nrows; r++) /* over the whole row: split pieces must agree */
        boff[r] = bt ? (FM_AT_T)fm_at_bias_offset(a, it->b, it->h[r], it->qi[r], lo[r], hi[r],
                                                  !FM_AT_F32)
                     : 0;

    for (i0 = 0; i0 < nrv; i0++) {
        rv_lo[i0] = kb;
        rv_hi[i0] = 0;
        for (r = i0 * FM_AT_VL; r < (i0 + 1) * FM_AT_VL && r < it->nrows; r++)
            if (lo[r] < hi[r]) {
                if (lo[r] < rv_lo[i0]) rv_lo[i0] = lo[r];
                if (hi[r] > rv_hi[i0]) rv_hi[i0] = hi[r];
            }
    }

    for (r = 0; r < rp; r++) {
        m[r] = -(FM_AT_T)INFINITY;
        l[r] = 0;
    }
#ifdef FM_AT_PACK_QT
    FM_AT_PACK_QT(a, it, qt);
    (void)d;
#else
    memset(qt, 0, (size_t)(d_n * rp) * sizeof(FM_AT_T));
    for (r = 0; r < it->nrows; r++) {
        const FM_AT_T *qr = (const FM_AT_T *)(a->q + it->b * a->qs_b + it->h[r] * a->qs_h +
                                              it->qi[r] * a->qs_q);
        for (d = 0; d < d_n; d++) qt[d * rp + r] = qr[d];
    }
#endif
    for (k0 = ka; k0 < kb; k0 += bk) {
        const fm_ssize nk = kb - k0 < bk ? kb - k0 : bk;
        int any = 0;
        for (r = 0; r < it->nrows; r++) any |= lo[r] < k0 + nk && hi[r] > k0;
        if (!any) continue; /* no row keeps a key of this block (segments, gaps) */
        if (bt || kt) {
            for (r = 0; r < it->nrows; r++) {
                const fm_ssize h = it->h[r], q = it->qi[r];
                fm_ssize j;
                if (bt) {
                    const char *br = a->bias + it->b * a->bs_b + h * a->bs_h + q * a->bs_q +
                                     k0 * a->bs_k;
                    for (j = 0; j < nk; j++)
                        bt[j * rp + r] = *(const FM_AT_T *)(br + j * a->bs_k) - boff[r];
                }
                if (kt && a->keep) {
                    const char *kr = a->keep + it->b * a->kps_b + h * a->kps_h +
                                     q * a->kps_q + k0 * a->kps_k;
                    for (j = 0; j < nk; j++) kt[j * rp + r] = kr[j * a->kps_k] != 0;
                } else if (kt) {
                    for (j = 0; j < nk; j++) kt[j * rp + r] = 1;
                }
                if (a->pred) { /* the predicate over the row's kept keys of this block */
                    const fm_ssize j0 = lo[r] > k0 ? lo[r] - k0 : 0;
                    const fm_ssize j1 = hi[r] < k0 + nk ? hi[r] - k0 : nk;
                    if (j1 > j0) {
                        const int64_t ub_b = a->fn_swap ? h + a->fn_h0 : it->b;
                        const int64_t ub_h = a->fn_swap ? 0 : h + a->fn_h0;
                        if (a->pred((uint8_t *)ub, ub_b, ub_h, q, k0 + j0, j1 - j0)) {
                            fm_at_fail(a, it->b, h, q);
                            memset(ub, 0, (size_t)(j1 - j0)); /* the row keeps nothing */
                        }
                        for (j = j0; j < j1; j++) kt[j * rp + r] &= ub[j - j0] != 0;
                    }
                }
            }
            for (r = it->nrows; r < rp; r++) { /* padding lanes: masked by [0, 0) anyway */
                fm_ssize j;
                for (j = 0; j < nk; j++) {
                    if (bt) bt[j * rp + r] = 0;
                    if (kt) kt[j * rp + r] = 0;
                }
            }
        }
        /* Staggered rows (the diagonal of causal masks, the edges of windows): when some
         * row vector keeps only part of the block, each row vector's scores are computed
         * over its own kept range [a, b) alone; the rest of S^T is masked by the
         * softmax. */
        whole = 1;
        for (i0 = 0; i0 < nrv; i0++) {
            rv_a[i0] = rv_lo[i0] > k0 ? rv_lo[i0] - k0 : 0;
            rv_b[i0] = rv_hi[i0] < k0 + nk ? rv_hi[i0] - k0 : nk;
            if (rv_b[i0] < rv_a[i0]) rv_b[i0] = rv_a[i0];
            whole &= rv_a[i0] == 0 && rv_b[i0] == nk;
        }
        if (a->score) whole = 1; /* user code sees every score it rewrites */
        if (whole) {
            FM_AT_FN(fm_at_qk)(qt, rp, d_n, kbase + k0 * a->ks_k, a->ks_k, nk, st, nrv);
        } else {
            for (i0 = 0; i0 < nrv; i0++)
                if (rv_a[i0] < rv_b[i0])
                    FM_AT_FN(fm_at_qk_rv)(qt + i0 * FM_AT_VL, rp, d_n,
                                          kbase + (k0 + rv_a[i0]) * a->ks_k, a->ks_k,
                                          rv_b[i0] - rv_a[i0], st + rv_a[i0] * rp + i0 * FM_AT_VL);
            if (first) { /* O^T is accumulated row vector by row vector: it starts at zero */
                memset(ot, 0, (size_t)(dv_n * rp) * sizeof(FM_AT_T));
            }
        }
        if (a->score) {
            /* z = s * scale + bias, rewritten by the user's function row by row; the
             * softmax then takes z as it is (scale 1, no bias) */
            FM_AT_T *zb = (FM_AT_T *)ub;
            for (r = 0; r < it->nrows; r++) {
                const fm_ssize h = it->h[r], q = it->qi[r];
                const fm_ssize j0 = lo[r] > k0 ? lo[r] - k0 : 0;
                const fm_ssize j1 = hi[r] < k0 + nk ? hi[r] - k0 : nk;
                fm_ssize j;
                if (j1 <= j0) continue;
                for (j = j0; j < j1; j++) {
                    FM_AT_T z = st[j * rp + r] * (FM_AT_T)a->scale;
                    if (bt) z += bt[j * rp + r];
                    zb[j - j0] = z;
                }
                if (a->score(zb, a->fn_swap ? h + a->fn_h0 : it->b, a->fn_swap ? 0 : h + a->fn_h0,
                             q, k0 + j0, j1 - j0)) {
                    fm_at_fail(a, it->b, h, q);
                    for (j = j0; j < j1; j++) zb[j - j0] = -(FM_AT_T)INFINITY;
                }
                for (j = j0; j < j1; j++) st[j * rp + r] = zb[j - j0];
            }
            FM_AT_FN(fm_at_softmax_block)(it, k0, nk, st, NULL, kt, m, l, ot, dv_n, 1.0, first);
        } else {
            FM_AT_FN(fm_at_softmax_block)(it, k0, nk, st, bt, kt, m, l, ot, dv_n, a->scale,
                                          first);
        }
        if (whole) {
            FM_AT_FN(fm_at_pv)(st, rp, nk, vbase + k0 * a->vs_k, a->vs_k, dv_n, ot, first, nrv);
        } else {
            for (i0 = 0; i0 < nrv; i0++)
                if (rv_a[i0] < rv_b[i0])
                    FM_AT_FN(fm_at_pv_rv)(st + rv_a[i0] * rp + i0 * FM_AT_VL, rp,
                                          rv_b[i0] - rv_a[i0], vbase + (k0 + rv_a[i0]) * a->vs_k,
                                          a->vs_k, dv_n, ot + i0 * FM_AT_VL);
        }
        first = 0;
    }
    if (first) memset(ot, 0, (size_t)(dv_n * rp) * sizeof(FM_AT_T));
}


/* Few rows (decode): the row-major path where this variant has one. */
#ifdef FM_AT_SMALL_RUN
#define FM_AT_RUN_ITEM(a, it, ka, kb, scratch, lay)                                        \
    do {                                                                                    \
        if (lay->small && (it)->nrows <= FM_AT_SMALL_ROWS)                                  \
            FM_AT_SMALL_RUN(a, it, ka, kb, scratch, lay);                                   \
        else                                                                                \
            FM_AT_FN(fm_at_item_run)(a, it, ka, kb, scratch, lay);                          \
    } while (0)
#else
#define FM_AT_RUN_ITEM(a, it, ka, kb, scratch, lay)                                        \
    FM_AT_FN(fm_at_item_run)(a, it, ka, kb, scratch, lay)
#endif

/* The rows of work item `idx`: heads and query positions, and each row's interval. */
static FM_AT_ATTR void FM_AT_FN(fm_at_item_build)(const fm_attn_args *a, const fm_at_plan *pl,
                                                  fm_ssize idx, fm_at_item *it)
{
    FM_AT_IT *lo = (FM_AT_IT *)it->lo, *hi = (FM_AT_IT *)it->hi;
    const fm_ssize qb = pl->nqb - 1 - idx % pl->nqb; /* long causal rows first */
    fm_ssize rest = idx / pl->nqb, h0, ng, q0, nqe, g, q, r;
    const fm_ssize sub = rest % pl->nsub;
    rest /= pl->nsub;
    it->kvh = rest % pl->hkv;
    it->b = rest / pl->hkv;
    h0 = it->kvh * a->group + sub * pl->gsub;
    ng = a->group - sub * pl->gsub < pl->gsub ? a->group - sub * pl->gsub : pl->gsub;
    q0 = qb * pl->nq;
    nqe = a->Lq - q0 < pl->nq ? a->Lq - q0 : pl->nq;
    it->nrows = ng * nqe;
    it->rp = (it->nrows + FM_AT_VL_ - 1) / FM_AT_VL_ * FM_AT_VL_;
    it->k_lo = a->Lk;
    it->k_hi = 0;
    for (g = 0; g < ng; g++) {
        for (q = 0; q < nqe; q++) {
            fm_ssize l0 = 0, l1 = a->Lk;
            r = g * nqe + q;
            it->h[r] = h0 + g;
            it->qi[r] = q0 + q;
            if (a->bounds) {
                const char *bp = a->bounds + it->b * a->bds_b + (h0 + g) * a->bds_h +
                                 (q0 + q) * a->bds_q;
                const int64_t b0 = *(const int64_t *)bp, b1 = *(const int64_t *)(bp + a->bds_p);
                l0 = b0 < 0 ? 0 : (b0 > a->Lk ? a->Lk : (fm_ssize)b0);
                l1 = b1 < 0 ? 0 : (b1 > a->Lk ? a->Lk : (fm_ssize)b1);
            }
            if (l0 >= l1) l0 = l1 = 0;
            lo[r] = (FM_AT_IT)l0;
            hi[r] = (FM_AT_IT)l1;
            if (l0 < l1) {
                if (l0 < it->k_lo) it->k_lo = l0;
                if (l1 > it->k_hi) it->k_hi = l1;
            }
        }
    }
    for (r = it->nrows; r < it->rp; r++) lo[r] = hi[r] = 0;
    if (it->k_lo >= it->k_hi) it->k_lo = it->k_hi = 0;
}

/* Write rows [0, nrows) of the output from (l, O^T): a NaN sum (a kept NaN or +inf)
 * gives a NaN row, a zero sum (nothing kept) a zero row. */
static FM_AT_ATTR void FM_AT_FN(fm_at_store)(const fm_attn_args *a, const fm_at_item *it,
                                             const FM_AT_T *l, const FM_AT_T *ot)
#ifdef FM_AT_STORE
{
    FM_AT_STORE(a, it, l, ot);
}
#else
{
    const fm_ssize rp = it->rp, dv_n = a->Dv;
    fm_ssize r, e;
    for (r = 0; r < it->nrows; r++) {
        char *orow = a->o + it->b * a->os_b + it->h[r] * a->os_h + it->qi[r] * a->os_q;
        const int nan = l[r] != l[r], zero = !(l[r] > 0);
        const FM_AT_T inv = (nan || zero) ? 0 : (FM_AT_T)1 / l[r];
#if FM_AT_F32
        if (a->out_kind == FM_OUT_F16) {
            uint16_t *op = (uint16_t *)orow;
            for (e = 0; e < dv_n; e++)
                op[e] = nan ? 0x7e00u : zero ? 0u : fm_float_to_half(ot[e * rp + r] * inv);
            continue;
        }
        if (a->out_kind == FM_OUT_BF16) {
            uint16_t *op = (uint16_t *)orow;
            for (e = 0; e < dv_n; e++)
                op[e] = nan ? FM_BF16_NAN : zero ? 0u : fm_float_to_bf16(ot[e * rp + r] * inv);
            continue;
        }
#endif
        {
            FM_AT_T *op = (FM_AT_T *)orow;
            for (e = 0; e < dv_n; e++)
                op[e] = nan ? (FM_AT_T)NAN : zero ? (FM_AT_T)0 : ot[e * rp + r] * inv;
        }
    }
}
#endif

static FM_AT_ATTR void FM_AT_FN(fm_at_zero_rows)(const fm_attn_args *a, const fm_at_item *it)
{
    const size_t bytes = (size_t)a->Dv * (a->out_kind != FM_OUT_COMPUTE ? 2 : sizeof(FM_AT_T));
    fm_ssize r;
    for (r = 0; r < it->nrows; r++)
        memset(a->o + it->b * a->os_b + it->h[r] * a->os_h + it->qi[r] * a->os_q, 0, bytes);
}

/* Merge the splits of one item (log-sum-exp rescaling) and write its rows. */
static FM_AT_ATTR void FM_AT_FN(fm_at_merge)(const fm_attn_args *a, const fm_at_plan *pl,
                                             fm_ssize idx, const char *parts, char *scratch,
                                             const fm_at_layout *lay)
{
    fm_at_item it;
    FM_AT_T *l = (FM_AT_T *)(scratch + lay->off_l);
    FM_AT_T *ot = (FM_AT_T *)(scratch + lay->off_ot);
    fm_ssize c, r, e, rp, dv_n = a->Dv;
    FM_AT_FN(fm_at_item_build)(a, pl, idx, &it);
    rp = it.rp;
    for (r = 0; r < rp; r++) {
        FM_AT_T mx = -(FM_AT_T)INFINITY, sum = 0;
        int nan = 0;
        for (c = 0; c < pl->nsplit; c++) {
            const char *pc = parts + (idx * pl->nsplit + c) * lay->part_bytes;
            const FM_AT_T mc = ((const FM_AT_T *)(pc + lay->poff_m))[r];
            const FM_AT_T lc = ((const FM_AT_T *)(pc + lay->poff_l))[r];
            nan |= lc != lc;
            if (mc > mx) mx = mc;
        }
        for (e = 0; e < dv_n; e++) ot[e * rp + r] = 0;
        if (!nan && mx > -(FM_AT_T)INFINITY) {
            for (c = 0; c < pl->nsplit; c++) {
                const char *pc = parts + (idx * pl->nsplit + c) * lay->part_bytes;
                const FM_AT_T mc = ((const FM_AT_T *)(pc + lay->poff_m))[r];
                const FM_AT_T *oc = (const FM_AT_T *)(pc + lay->poff_ot);
                FM_AT_T w;
                if (!(mc > -(FM_AT_T)INFINITY)) continue; /* nothing kept in this split */
#if FM_AT_F32
                w = fm_exp_f32(mc - mx);
#else
                w = fm_exp_f64(mc - mx);
#endif
                sum += w * ((const FM_AT_T *)(pc + lay->poff_l))[r];
                for (e = 0; e < dv_n; e++) ot[e * rp + r] += w * oc[e * rp + r];
            }
        }
        l[r] = nan ? (FM_AT_T)NAN : sum;
    }
    FM_AT_FN(fm_at_store)(a, &it, l, ot);
}

/* Task t: item t / nsplit, split t % nsplit of the item's kept key range. */
static FM_AT_ATTR void FM_AT_FN(fm_at_task)(fm_attn_args *a, const fm_at_plan *pl,
                                            fm_ssize t, char *parts, char *scratch,
                                            const fm_at_layout *lay)
{
    fm_at_item it;
    const fm_ssize idx = t / pl->nsplit, c = t % pl->nsplit;
    fm_ssize ka, kb;
    FM_AT_FN(fm_at_item_build)(a, pl, idx, &it);
    if (pl->nsplit == 1) {
        if (it.k_lo >= it.k_hi) { /* nothing kept: zero rows (the output is not zeroed) */
            FM_AT_FN(fm_at_zero_rows)(a, &it);
            return;
        }
        FM_AT_RUN_ITEM(a, &it, it.k_lo, it.k_hi, scratch, lay);
        FM_AT_FN(fm_at_store)(a, &it, (const FM_AT_T *)(scratch + lay->off_l),
                              (const FM_AT_T *)(scratch + lay->off_ot));
        return;
    }
    {
        const fm_ssize span = it.k_hi - it.k_lo;
        const fm_ssize chunk = ((span + pl->nsplit - 1) / pl->nsplit + lay->bk - 1) /
                               lay->bk * lay->bk;
        char *pc = parts + t * lay->part_bytes;
        ka = it.k_lo + c * chunk;
        kb = ka + chunk;
        if (ka > it.k_hi) ka = it.k_hi;
        if (kb > it.k_hi) kb = it.k_hi;
        FM_AT_RUN_ITEM(a, &it, ka, kb, scratch, lay);
        memcpy(pc + lay->poff_m, scratch + lay->off_m, (size_t)it.rp * sizeof(FM_AT_T));
        memcpy(pc + lay->poff_l, scratch + lay->off_l, (size_t)it.rp * sizeof(FM_AT_T));
        memcpy(pc + lay->poff_ot, scratch + lay->off_ot,
               (size_t)(a->Dv * it.rp) * sizeof(FM_AT_T));
    }
}

/* The whole call: plan, then one parallel region (tasks from an atomic counter; with
 * split keys, a barrier and the merges). Returns 0, or -1 when memory ran out. */
static FM_AT_ATTR int FM_AT_FN(fm_attn_run)(fm_attn_args *a)
{
    fm_at_plan pl;
    fm_at_layout lay;
    char *mem, *scratch, *parts = NULL;
    fm_ssize ntasks, next = 0, next_merge = 0;
    int nt;
    const fm_ssize rmax = FM_AT_RV * FM_AT_VL_;

    if (a->B * a->H * a->Lq == 0 || a->Lk == 0 || a->group < 1) return 0;
    fm_at_plan_make(a, rmax, &pl);
    fm_at_layout_make(a, rmax, FM_AT_BK, sizeof(FM_AT_T), &lay);
#ifdef FM_AT_SMALL_RUN
    lay.small = fm_at_small_ok(a, pl.gsub * pl.nq) && !a->pred && !a->score;
#endif
    ntasks = pl.items * pl.nsplit;
    nt = a->nthreads < 1 ? 1 : a->nthreads;
    if (nt > ntasks) nt = (int)ntasks;
    mem = (char *)malloc((size_t)(lay.thread_bytes * nt + 64 +
                                  (pl.nsplit > 1 ? lay.part_bytes * ntasks + 64 : 0)));
    if (!mem) return -1;
    scratch = (char *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    if (pl.nsplit > 1) parts = scratch + lay.thread_bytes * nt;

#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            char *mine = scratch + lay.thread_bytes * omp_get_thread_num();
            for (;;) {
                const fm_ssize t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
                if (t >= ntasks) break;
                FM_AT_FN(fm_at_task)(a, &pl, t, parts, mine, &lay);
            }
            if (pl.nsplit > 1) {
#pragma omp barrier
                for (;;) {
                    const fm_ssize i = __atomic_fetch_add(&next_merge, 1, __ATOMIC_RELAXED);
                    if (i >= pl.items) break;
                    FM_AT_FN(fm_at_merge)(a, &pl, i, parts, mine, &lay);
                }
            }
        }
    } else
#endif
    {
        fm_ssize t;
        (void)next;
        (void)next_merge;
        for (t = 0; t < ntasks; t++) FM_AT_FN(fm_at_task)(a, &pl, t, parts, scratch, &lay);
        if (pl.nsplit > 1)
            for (t = 0; t < pl.items; t++) FM_AT_FN(fm_at_merge)(a, &pl, t, parts, scratch, &lay);
    }
    free(mem);
    return 0;
}

#undef FM_AT_RUN_ITEM
#undef FM_AT_EV
#undef V
#undef IV
#undef FM_AT_VL
#undef FM_AT_VL_
#undef FM_AT_FN
#undef FM_AT_T
#undef FM_AT_IT
#undef FM_AT_F32
#undef FM_AT_VB
#undef FM_AT_JB
#undef FM_AT_SFX
#undef FM_AT_ATTR
