/*
 * fastmask/_attention_decode.h -- the engine's path for work items of few rows
 * (decode: one query per head, the query heads of a GQA group together), float32,
 * AVX-512. Included by _attention_engine.h.
 *
 * With a handful of rows the "rows in lanes" layout of _attention_tile.h leaves most
 * lanes empty and its accumulator chains short, so decode would be bound by FMA
 * latency, not by reading K and V. Here the layout is row-major instead:
 *   - q . K[j] runs along D (D / 16 FMAs per row and key); the partial sums of 16 keys
 *     are folded into one vector of 16 scores by a transpose-and-add tree;
 *   - the online softmax runs along the keys of each row (16 keys per vector);
 *   - P . V broadcasts P[r][j] against V[j] (16 accumulators in registers: 4 rows x
 *     64 values of Dv), so each K and V row is read from memory once per item, for
 *     every query head of the group.
 * The state it leaves (m, l and O^T) is laid out as _attention_tile.h's,
 * so the split-key merge and the store are shared.
 */

#define FM_AT_SMALL_ROWS 8
#define FM_AT_SMALL_DV 256

/* Lane j of the result: the sum of the 16 lanes of a[j]. */
FM_TARGET_AVX512 FM_INLINE __m512 fm_at_hsum16(const __m512 *a)
{
    __m512 t[8], u[4], w0, w1, x0, x1;
    int i;
    for (i = 0; i < 8; i++) /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (i = 0; i < 4; i++) { /* per chunk: one partial sum of each of 4 keys */
        const __m512d p = _mm512_castps_pd(t[2 * i]), q = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    x0 = _mm512_shuffle_f32x4(w0, w1, 0x88);
    x1 = _mm512_shuffle_f32x4(w0, w1, 0xdd);
    return _mm512_add_ps(x0, x1);
}

/* The keep bytes of keys [j, j + 16) of one row as a lane mask (lanes < n only). */
FM_TARGET_AVX512 FM_INLINE __mmask16 fm_at_keep16(const char *kr, fm_ssize st, fm_ssize n)
{
    if (st == 1) {
        const __m128i b = _mm_maskz_loadu_epi8((__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u), kr);
        return _mm_test_epi8_mask(b, b);
    } else {
        unsigned m = 0;
        fm_ssize i;
        for (i = 0; i < n && i < 16; i++) m |= (unsigned)(kr[i * st] != 0) << i;
        return (__mmask16)m;
    }
}

FM_TARGET_AVX512 FM_INLINE __m512 fm_at_bias16(const char *br, fm_ssize st, __mmask16 lanes)
{
    if (st == 4) return _mm512_maskz_loadu_ps(lanes, br);
    {
        FM_AT_ALIGN64 float b[16];
        int i;
        for (i = 0; i < 16; i++) b[i] = (lanes >> i) & 1 ? *(const float *)(br + i * st) : 0.0f;
        return _mm512_load_ps(b);
    }
}

/* o[r][0:16 EN] += sum_j p[r][j] * v[j][0:16 EN] for RN rows (constants once inlined:
 * the RN x EN accumulators stay in registers). With pf > 0, each V row's values at pf
 * bytes ahead (the next block's row) are prefetched as the row is read: one line per
 * key, spread over the loop, where a burst of a whole block's prefetches (16 KiB) next
 * to the Q.K loop measured 7-13% slower on decode (Zen 5, one and two threads). */
FM_TARGET_AVX512 FM_INLINE void fm_at_small_pv(const float *p, fm_ssize ps, const char *v,
                                               fm_ssize vs, fm_ssize nk, float *o, fm_ssize os,
                                               fm_ssize pf, const int RN, const int EN)
{
    __m512 c[4][4];
    fm_ssize j;
    int ri, ei;
    for (ri = 0; ri < RN; ri++)
        for (ei = 0; ei < EN; ei++) c[ri][ei] = _mm512_loadu_ps(o + ri * os + 16 * ei);
    for (j = 0; j < nk; j++) {
        const float *vj = (const float *)(v + j * vs);
        __m512 vv[4];
        if (pf)
            for (ei = 0; ei < EN; ei++) FM_PREFETCH_AT(vj, pf + 64 * ei);
        for (ei = 0; ei < EN; ei++) vv[ei] = _mm512_loadu_ps(vj + 16 * ei);
        for (ri = 0; ri < RN; ri++) {
            const __m512 pr = _mm512_set1_ps(p[ri * ps + j]);
            for (ei = 0; ei < EN; ei++) c[ri][ei] = _mm512_fmadd_ps(pr, vv[ei], c[ri][ei]);
        }
    }
    for (ri = 0; ri < RN; ri++)
        for (ei = 0; ei < EN; ei++) _mm512_storeu_ps(o + ri * os + 16 * ei, c[ri][ei]);
}

/* Can the small-row path serve this call's items of `rows` rows? */
static FM_UNUSED int fm_at_small_ok(const fm_attn_args *a, fm_ssize rows)
{
    return rows <= FM_AT_SMALL_ROWS && a->D % 16 == 0 && a->Dv % 16 == 0 && a->D <= 1024 &&
           a->Dv <= FM_AT_SMALL_DV && a->D > 0;
}

/* Same contract as fm_at_item_run: keys [ka, kb) of item `it`; leaves m, l and O^T
 * (Dv x rp) in the thread's scratch. A kept NaN or +inf score makes the row's sum NaN
 * (exp(NaN - m), exp(inf - inf)), which the store turns into a NaN row. */
static FM_TARGET_AVX512 void fm_at_small_run(fm_attn_args *a, const fm_at_item *it,
                                             fm_ssize ka, fm_ssize kb, char *scratch,
                                             const fm_at_layout *lay)
{
    const fm_ssize nr = it->nrows, rp = it->rp, d_n = a->D, dv_n = a->Dv, bk = lay->bk;
    float *st = (float *)(scratch + lay->off_st); /* scores, then weights: nr x bk */
    float *ot = (float *)(scratch + lay->off_ot);
    float *m = (float *)(scratch + lay->off_m);
    float *l = (float *)(scratch + lay->off_l);
    const int32_t *lo = (const int32_t *)it->lo, *hi = (const int32_t *)it->hi;
    const char *kbase = a->k + it->b * a->ks_b + it->kvh * a->ks_h;
    const char *vbase = a->v + it->b * a->vs_b + it->kvh * a->vs_h;
    const __m512 sc = _mm512_set1_ps((float)a->scale);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float *qr[FM_AT_SMALL_ROWS];
    FM_AT_ALIGN64 float o[FM_AT_SMALL_ROWS * FM_AT_SMALL_DV];
    float boff[FM_AT_SMALL_ROWS]; /* each row's bias offset (fm_at_bias_offset), or 0 */
    fm_ssize r, k0, j, e;

    for (r = 0; r < nr; r++) {
        qr[r] = (const float *)(a->q + it->b * a->qs_b + it->h[r] * a->qs_h + it->qi[r] * a->qs_q);
        m[r] = -INFINITY;
        l[r] = 0;
        /* over the whole row, not [ka, kb): split pieces must agree */
        boff[r] = a->bias ? (float)fm_at_bias_offset(a, it->b, it->h[r], it->qi[r], lo[r], hi[r], 0)
                          : 0.0f;
    }
    for (r = nr; r < rp; r++) {
        m[r] = -INFINITY;
        l[r] = 0;
    }
    memset(o, 0, (size_t)(nr * dv_n) * sizeof(float));

    for (k0 = ka; k0 < kb; k0 += bk) {
        const fm_ssize nk = kb - k0 < bk ? kb - k0 : bk;
        int any = 0;
        for (r = 0; r < nr; r++) any |= lo[r] < k0 + nk && hi[r] > k0;
        if (!any) continue;

        /* scores, 16 keys at a time: 16 independent accumulators along D */
        for (j = 0; j < nk; j += 16) {
            const float *kp[16];
            int jj;
            for (jj = 0; jj < 16; jj++) { /* keys past the block repeat its last (masked) */
                const fm_ssize key = k0 + (j + jj < nk ? j + jj : nk - 1);
                kp[jj] = (const float *)(kbase + key * a->ks_k);
            }
            for (jj = 0; jj < 16 && j + jj < nk; jj++) { /* the next block's K, meanwhile */
                fm_ssize d;
                const char *kn = (const char *)kp[jj] + bk * a->ks_k;
                for (d = 0; d < d_n * 4; d += 64) FM_PREFETCH_AT(kn, d);
            }
            for (r = 0; r < nr; r++) {
                __m512 acc[16];
                fm_ssize d;
                for (jj = 0; jj < 16; jj++) acc[jj] = _mm512_setzero_ps();
                for (d = 0; d < d_n; d += 16) {
                    const __m512 qd = _mm512_loadu_ps(qr[r] + d);
                    for (jj = 0; jj < 16; jj++)
                        acc[jj] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(kp[jj] + d), acc[jj]);
                }
                _mm512_storeu_ps(st + r * bk + j, fm_at_hsum16(acc));
            }
        }

        /* online softmax of each row over this block */
        for (r = 0; r < nr; r++) {
            float *sr = st + r * bk;
            const __m512i lov = _mm512_set1_epi32(lo[r]), hiv = _mm512_set1_epi32(hi[r]);
            const char *br = a->bias ? a->bias + it->b * a->bs_b + it->h[r] * a->bs_h +
                                           it->qi[r] * a->bs_q + k0 * a->bs_k
                                     : NULL;
            const char *kr = a->keep ? a->keep + it->b * a->kps_b + it->h[r] * a->kps_h +
                                           it->qi[r] * a->kps_q + k0 * a->kps_k
                                     : NULL;
            __m512 mb = ninf, lb = _mm512_setzero_ps();
            float bm, mn, mu, alpha;
            for (j = 0; j < nk; j += 16) {
                const __m512i idx = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)(k0 + j)));
                __mmask16 keep = _mm512_cmpge_epi32_mask(idx, lov) & _mm512_cmplt_epi32_mask(idx, hiv);
                __m512 s;
                keep &= (__mmask16)(nk - j >= 16 ? 0xffffu : (1u << (nk - j)) - 1u);
                if (kr) keep &= fm_at_keep16(kr + j * a->kps_k, a->kps_k, nk - j);
                s = _mm512_mul_ps(_mm512_loadu_ps(sr + j), sc);
                if (br)
                    s = _mm512_add_ps(s, _mm512_sub_ps(fm_at_bias16(br + j * a->bs_k, a->bs_k, keep),
                                                       _mm512_set1_ps(boff[r])));
                s = _mm512_mask_mov_ps(ninf, keep, s);
                mb = _mm512_max_ps(s, mb); /* a NaN s leaves mb as it was */
                _mm512_storeu_ps(sr + j, s);
            }
            bm = _mm512_reduce_max_ps(mb);
            mn = bm > m[r] ? bm : m[r];
            mu = mn == -INFINITY ? 0.0f : mn;
            {
                const __m512 muv = _mm512_set1_ps(mu);
                for (j = 0; j < nk; j += 16) {
                    const __m512 p = fm_exp16_f32(_mm512_sub_ps(_mm512_loadu_ps(sr + j), muv));
                    lb = _mm512_add_ps(lb, p);
                    _mm512_storeu_ps(sr + j, p);
                }
            }
            alpha = fm_exp_f32(m[r] - mu);
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(lb);
            m[r] = mn;
            if (alpha != 1.0f) {
                const __m512 av = _mm512_set1_ps(alpha);
                for (e = 0; e < dv_n; e += 16)
                    _mm512_storeu_ps(o + r * dv_n + e, _mm512_mul_ps(_mm512_loadu_ps(o + r * dv_n + e), av));
            }
        }

        /* O += P . V: tiles of up to 4 rows x 64 values, V read once per tile */
        {
            fm_ssize r0, e0;
            for (r0 = 0; r0 < nr; r0 += 4) {
                const fm_ssize rn = nr - r0 < 4 ? nr - r0 : 4;
                for (e0 = 0; e0 < dv_n; e0 += 64) {
                    float *ob = o + r0 * dv_n + e0;
                    const float *pb = st + r0 * bk;
                    const char *vb = vbase + k0 * a->vs_k + e0 * 4;
                    if (dv_n - e0 >= 64) {
                        switch (rn) {
                        case 1: fm_at_small_pv(pb, bk, vb, a->vs_k, nk, ob, dv_n, bk * a->vs_k, 1, 4); break;
                        case 2: fm_at_small_pv(pb, bk, vb, a->vs_k, nk, ob, dv_n, bk * a->vs_k, 2, 4); break;
                        case 3: fm_at_small_pv(pb, bk, vb, a->vs_k, nk, ob, dv_n, bk * a->vs_k, 3, 4); break;
                        default: fm_at_small_pv(pb, bk, vb, a->vs_k, nk, ob, dv_n, bk * a->vs_k, 4, 4); break;
                        }
                    } else {
                        fm_ssize ri;
                        for (ri = 0; ri < rn; ri++) /* a last 16..48 values: one row at a time */
                            fm_at_small_pv(pb + ri * bk, bk, vb, a->vs_k, nk, ob + ri * dv_n, dv_n,
                                           ri == 0 ? bk * a->vs_k : 0, 1, (int)((dv_n - e0) / 16));
                    }
                }
            }
        }
    }
    /* O^T, as the shared store and merge read it */
    for (r = 0; r < nr; r++)
        for (e = 0; e < dv_n; e++) ot[e * rp + r] = o[r * dv_n + e];
}

/* ---------------------------------------------------------------- 16 x 16 transposes */

/* Transpose the 16 x 16 float block held in r[0..15] (rows) in place (columns). */
FM_TARGET_AVX512 FM_INLINE void fm_at_transpose16(__m512 *r)
{
    __m512 t[16], u[16];
    int i;
    for (i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (i = 0; i < 16; i += 4) {
        u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* u[4q + c] holds, in 128-bit chunk k, column c of rows 4q..4q+3 of chunk k's columns */
    for (i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xdd);
    }
    for (i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

/* Q^T (D x rp) of an item's rows, 16 x 16 blocks at a time (missing rows: zeros). */
static FM_TARGET_AVX512 void fm_at_pack_qt_avx512(const fm_attn_args *a, const fm_at_item *it,
                                                  float *qt)
{
    const fm_ssize rp = it->rp, d_n = a->D;
    fm_ssize r0, d0;
    for (r0 = 0; r0 < rp; r0 += 16) {
        const float *qr[16];
        int i;
        for (i = 0; i < 16; i++)
            qr[i] = r0 + i < it->nrows
                        ? (const float *)(a->q + it->b * a->qs_b + it->h[r0 + i] * a->qs_h +
                                          it->qi[r0 + i] * a->qs_q)
                        : NULL;
        for (d0 = 0; d0 < d_n; d0 += 16) {
            const fm_ssize dn = d_n - d0 < 16 ? d_n - d0 : 16;
            const __mmask16 lanes = (__mmask16)(dn == 16 ? 0xffffu : (1u << dn) - 1u);
            __m512 blk[16];
            for (i = 0; i < 16; i++)
                blk[i] = qr[i] ? _mm512_maskz_loadu_ps(lanes, qr[i] + d0) : _mm512_setzero_ps();
            fm_at_transpose16(blk);
            for (i = 0; i < dn; i++) _mm512_store_ps(qt + (d0 + i) * rp + r0, blk[i]);
        }
    }
}

/* 16 output values rounded to bfloat16 (NaN rows: y is NaN, giving FM_BF16_NAN). */
FM_TARGET_AVX512 FM_INLINE __m256i fm_at_f2bf16(__m512 y)
{
#if FM_BF16_NATIVE
    if (fm_bf16_native_on) return fm_f2bf16_native(y); /* a call: wider target */
#endif
    return fm_f2bf16_avx512(y);
}

/* The item's output rows from O^T: row r = O^T[:, r] / l[r] (0 for rows with nothing
 * kept, NaN for rows with a kept NaN/+inf), 16 x 16 blocks at a time. */
static FM_TARGET_AVX512 void fm_at_store_avx512(const fm_attn_args *a, const fm_at_item *it,
                                                const float *l, const float *ot)
{
    const fm_ssize rp = it->rp, dv_n = a->Dv;
    fm_ssize r0, e0;
    for (r0 = 0; r0 < it->nrows; r0 += 16) {
        const int rn = it->nrows - r0 < 16 ? (int)(it->nrows - r0) : 16;
        float inv[16];
        int nan[16], zero[16], i;
        for (i = 0; i < rn; i++) {
            const float li = l[r0 + i];
            nan[i] = li != li;
            zero[i] = !nan[i] && !(li > 0); /* nothing kept: zeros, whatever V holds */
            inv[i] = (!nan[i] && li > 0) ? 1.0f / li : 0.0f;
        }
        for (e0 = 0; e0 < dv_n; e0 += 16) {
            const fm_ssize en = dv_n - e0 < 16 ? dv_n - e0 : 16;
            const __mmask16 lanes = (__mmask16)(en == 16 ? 0xffffu : (1u << en) - 1u);
            __m512 blk[16];
            for (i = 0; i < 16; i++)
                blk[i] = i < en ? _mm512_load_ps(ot + (e0 + i) * rp + r0) : _mm512_setzero_ps();
            fm_at_transpose16(blk);
            for (i = 0; i < rn; i++) {
                char *orow = a->o + it->b * a->os_b + it->h[r0 + i] * a->os_h +
                             it->qi[r0 + i] * a->os_q;
                const __m512 y = nan[i]    ? _mm512_set1_ps(NAN)
                                 : zero[i] ? _mm512_setzero_ps()
                                           : _mm512_mul_ps(blk[i], _mm512_set1_ps(inv[i]));
                if (a->out_kind == FM_OUT_F16)
                    _mm256_mask_storeu_epi16((uint16_t *)orow + e0, lanes,
                                             _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
                else if (a->out_kind == FM_OUT_BF16)
                    _mm256_mask_storeu_epi16((uint16_t *)orow + e0, lanes, fm_at_f2bf16(y));
                else
                    _mm512_mask_storeu_ps((float *)orow + e0, lanes, y);
            }
        }
    }
}
