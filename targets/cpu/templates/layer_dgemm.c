/* ---- layer ${LAYER} (${CNAME}): the BitGemm kernel with this layer's shapes as constants (QC_PER_LAYER_GEMM:
 *      the AVX2 path on x86, the portable path elsewhere, and the AVX-512 path in a library generated for an
 *      AVX-512 target; the other paths run the core's kernels). Scalar popcount (hardware POPCNT on x86) over
 *      ${KWORDS} word(s) per plane, register tile ${GMR} rows x ${GNR} channels, each row and each weight one
 *      constant stride from a single base pointer, so the tile's counters stay in registers; or AVX-512 VPOPCNTDQ
 *      with channels in lanes (below).
 *      Why not the core's AVX2 nibble-table kernel: on a CPU that runs POPCNT on every integer ALU (AMD Zen)
 *      scalar popcount is faster, and with K known the per-tile overhead (plane loops, strides, epilogue
 *      dispatch) compiles away, which is what short K (1024 bits = 16 words) needs (bench/RESULTS.md). ---- */
enum { ${CNAME}_GKA = ${KA}, ${CNAME}_GKB = ${KB}, ${CNAME}_GKWP = ${KWP}, ${CNAME}_GKW = ${KWORDS},
       ${CNAME}_GN = ${N}, ${CNAME}_GL = ${L}, ${CNAME}_GMODE = ${MODE}, ${CNAME}_GEPI = ${EPI} };

typedef struct {
    const uint64_t* A;       /* packed activation rows [M][KA][KWP] */
    const int32_t* rowsum;   /* [M] */
    const uint8_t* x;        /* the codes [M][K] when each task packs its own rows into A (row split), else NULL */
    ${OUT_CTYPE_C}* y;       /* [M][N] */
    int64_t M, mb, nb, n_nb; /* rows, rows per block, channels per block, channel blocks */
} ${CNAME}_gctx;

/* mr rows x nr channels (constants after inlining) of popcount sums, plane pairs weighted 2^(i+j): pairs by
 * descending s = i + j, the counters doubled between (Horner), so only the tile's counters are live */
QC_INLINE void ${CNAME}_gmk(const uint64_t* a, const uint64_t* w, const int mr, const int nr,
                            uint64_t acc[${GMR}][2 * ${GNR}]) {
    enum { KA = ${CNAME}_GKA, KB = ${CNAME}_GKB, KWP = ${CNAME}_GKWP, KW = ${CNAME}_GKW, MODE = ${CNAME}_GMODE,
           AS = KA * KWP, WS = KB * KWP, APL_ = MODE == QC_AND ? KA : 1, BPL = MODE == QC_AND ? KB : 1 };
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c) acc[r][c] = 0;
#pragma GCC unroll 1
    for (int s = APL_ + BPL - 2; s >= 0; --s) {
        for (int r = 0; r < mr; ++r)
            for (int c = 0; c < nr; ++c) acc[r][c] <<= 1;  /* a no-op on zeros for the first s */
#pragma GCC unroll 1
        for (int i = qc_pair_lo(s, BPL); i <= qc_pair_hi(s, APL_); ++i) {
            const int j = s - i;
            const uint64_t* ap = a + i * KWP;
            const uint64_t* wp = w + j * KWP;
#pragma GCC unroll 4
            for (int k = 0; k < KW; ++k)
                for (int r = 0; r < mr; ++r) {
                    const uint64_t av = ap[r * AS + k];
                    for (int c = 0; c < nr; ++c)
                        acc[r][c] += (uint64_t)__builtin_popcountll(MODE == QC_AND ? av & wp[c * WS + k]
                                                                                   : av ^ wp[c * WS + k]);
                }
        }
    }
}

#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
/* AVX-512 VPOPCNTDQ with channels in lanes (libraries for an AVX-512 target): the blob's W8 holds the weights
 * [N/8][KB][KWP][8], so one zmm is word k of 8 channels, and each activation word is broadcast against it. The
 * counters of a tile (mr rows x ng groups of 8 channels) stay in zmm registers and are never summed across lanes:
 * with a (row, channel) per accumulator, that sum cost more than the popcounts at K = 1024 (23% of the popcount
 * peak, measured on a Xeon with VPOPCNTDQ). */
enum { ${CNAME}_G8MR = 4, ${CNAME}_G8NG = 4, ${CNAME}_G8NG1 = 8 };

QC_TGT_AVX512 static inline void ${CNAME}_g8mk(const uint64_t* a, const uint64_t* w8, const int mr, const int ng,
                                               qc_v512 acc[${CNAME}_G8MR][${CNAME}_G8NG1]) {
    enum { KA = ${CNAME}_GKA, KB = ${CNAME}_GKB, KWP = ${CNAME}_GKWP, KW = ${CNAME}_GKW, MODE = ${CNAME}_GMODE,
           AS = KA * KWP, GS = KB * KWP * 8, APL_ = MODE == QC_AND ? KA : 1, BPL = MODE == QC_AND ? KB : 1 };
    for (int r = 0; r < mr; ++r)
        for (int g = 0; g < ng; ++g) acc[r][g] = QC512(setzero_si512)();
#pragma GCC unroll 1
    for (int s = APL_ + BPL - 2; s >= 0; --s) {
        for (int r = 0; r < mr; ++r)
            for (int g = 0; g < ng; ++g) acc[r][g] = QC512(slli_epi64)(acc[r][g], 1);
#pragma GCC unroll 1
        for (int i = qc_pair_lo(s, BPL); i <= qc_pair_hi(s, APL_); ++i) {
            const uint64_t* ap = a + i * KWP;
            const uint64_t* wp = w8 + (s - i) * KWP * 8;
#pragma GCC unroll 4
            for (int k = 0; k < KW; ++k) {
                qc_v512 wv[${CNAME}_G8NG1];
                for (int g = 0; g < ng; ++g) wv[g] = QC512(loadu_si512)((const void*)(wp + g * GS + k * 8));
                for (int r = 0; r < mr; ++r) {
                    const qc_v512 av = QC512(set1_epi64)((long long)ap[r * AS + k]);
                    for (int g = 0; g < ng; ++g)
                        acc[r][g] = QC512(add_epi64)(acc[r][g], QC512(popcnt_epi64)(
                            MODE == QC_AND ? QC512(and_si512)(av, wv[g]) : QC512(xor_si512)(av, wv[g])));
                }
            }
        }
    }
}

/* the epilogue of row m, channels [n0, n0 + 8): int32 arithmetic wraps exactly like the scalar int64-then-int32
 * cast; the channel arrays are padded to 32 (WZ2P, MULTP, BIASP, THRT [L][32*NB]), so whole vectors are read */
QC_TGT_AVX512 static inline void ${CNAME}_g8store(const ${CNAME}_gctx* cx, int64_t m, int64_t n0, qc_v512 cnt) {
    enum { N = ${CNAME}_GN, L = ${CNAME}_GL, MODE = ${CNAME}_GMODE, EPI = ${CNAME}_GEPI, NPAD = (N + 31) / 32 * 32 };
    const int32_t* wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2P});
    const qc_v256 s = QC512(cvtepi64_epi32)(cnt);
    const qc_v256 rs = QC256(set1_epi32)(cx->rowsum[m]);
    const qc_v256 v = MODE == QC_AND
        ? QC256(sub_epi32)(QC256(add_epi32)(s, s), QC256(mullo_epi32)(rs, QC256(loadu_si256)((const void*)(wz2 + n0))))
        : QC256(sub_epi32)(rs, QC256(add_epi32)(s, s));
    const int nv = N - n0 < 8 ? (int)(N - n0) : 8;
    ${OUT_CTYPE_C}* yo = cx->y + m * N + n0;
    if (EPI == QC_EPI_NONE) {
        if (nv == 8) { QC256(storeu_si256)((void*)yo, v); return; }
        int32_t t[8];
        QC256(storeu_si256)((void*)t, v);
        memcpy(yo, t, (size_t)nv * 4);
    } else if (EPI == QC_EPI_FLOAT) {  /* float32 multiply, then a separate add (-ffp-contract=off) */
        qc_f256 f = QC256(cvtepi32_ps)(v);
        f = QC256(mul_ps)(f, QC256(loadu_ps)((const float*)(qc_blob_${CNAME} + ${OFF_MULTP}) + n0));
        f = QC256(add_ps)(f, QC256(loadu_ps)((const float*)(qc_blob_${CNAME} + ${OFF_BIASP}) + n0));
        if (nv == 8) { QC256(storeu_ps)((float*)yo, f); return; }
        float t[8];
        QC256(storeu_ps)(t, f);
        memcpy(yo, t, (size_t)nv * 4);
    } else {  /* code = L + sum_q (T[q][n] > v ? -1 : 0) */
        const int32_t* thrt = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THRT});
        qc_v256 q = QC256(set1_epi32)(L);
        for (int j = 0; j < L; ++j)
            q = QC256(add_epi32)(q, QC256(cmpgt_epi32)(QC256(loadu_si256)((const void*)(thrt + j * NPAD + n0)), v));
        int32_t t[8];
        QC256(storeu_si256)((void*)t, q);
        for (int c = 0; c < nv; ++c) yo[c] = (${OUT_CTYPE_C})t[c];
    }
}
#endif

/* the epilogue of an mr x nc tile whose first output is (m0, n0) */
QC_INLINE void ${CNAME}_gstore(const ${CNAME}_gctx* cx, int64_t m0, int mr, int64_t n0, int nc,
                               uint64_t acc[${GMR}][2 * ${GNR}], const int32_t* wz2, const float* mult,
                               const float* bias, const int32_t* thr) {
    enum { N = ${CNAME}_GN, L = ${CNAME}_GL, MODE = ${CNAME}_GMODE, EPI = ${CNAME}_GEPI };
    for (int r = 0; r < mr; ++r) {
        const int64_t m = m0 + r;
        const int32_t rs = cx->rowsum[m];
        ${OUT_CTYPE_C}* yo = cx->y + m * N;
        for (int c = 0; c < nc; ++c) {
            const int64_t n = n0 + c, s = (int64_t)acc[r][c];
            /* int64 then truncated to int32, exactly as qc_store and the reference */
            const int32_t v = (int32_t)(MODE == QC_AND ? 2 * s - (int64_t)wz2[n] * rs : (int64_t)rs - 2 * s);
            if (EPI == QC_EPI_NONE) {
                yo[n] = (${OUT_CTYPE_C})v;
            } else if (EPI == QC_EPI_FLOAT) {
                float f = (float)v;
                f = f * mult[n];  /* float32 multiply, then a separate add: no FMA (-ffp-contract=off) */
                f = f + bias[n];
                yo[n] = (${OUT_CTYPE_C})f;
            } else {
                int q8 = 0;
                for (int q = 0; q < L; ++q) q8 += v >= thr[n * L + q];
                yo[n] = (${OUT_CTYPE_C})q8;
            }
        }
    }
}

/* one block: rows [bm*mb, +mb) x channels [bn*nb, +nb); the block's activation rows stay in L1 while the
 * channel tiles pass over them */
QC_INLINE void ${CNAME}_gtask(const void* vctx, int64_t t) {
    enum { KA = ${CNAME}_GKA, KB = ${CNAME}_GKB, KWP = ${CNAME}_GKWP, N = ${CNAME}_GN, L = ${CNAME}_GL,
           MODE = ${CNAME}_GMODE, EPI = ${CNAME}_GEPI, MR = ${GMR}, NR = ${GNR} };
    const ${CNAME}_gctx* cx = (const ${CNAME}_gctx*)vctx;
    const uint64_t* W = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_W});
    const int32_t* wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2});
    const float* mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    const float* bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    const int32_t* thr = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THR});
    const int64_t bm = t / cx->n_nb, bn = t - bm * cx->n_nb;
    const int64_t m_lo = bm * cx->mb, m_hi = m_lo + cx->mb < cx->M ? m_lo + cx->mb : cx->M;
    const int64_t n_lo = bn * cx->nb, n_hi = n_lo + cx->nb < N ? n_lo + cx->nb : N;
    if (m_hi - m_lo == 1) {  /* one row (a batch-1 call): tiles twice as wide, the row's words loaded half as often */
        const uint64_t* a = cx->A + m_lo * (int64_t)KA * KWP;
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += 2 * NR) {
            const int nc = n_hi - n0 < 2 * NR ? (int)(n_hi - n0) : 2 * NR;
            const uint64_t* w = W + n0 * (int64_t)KB * KWP;
            uint64_t acc[MR][2 * NR];
            if (nc == 2 * NR) ${CNAME}_gmk(a, w, 1, 2 * NR, acc);
            else for (int c = 0; c < nc; ++c) {
                uint64_t one[MR][2 * NR];
                ${CNAME}_gmk(a, w + c * KB * KWP, 1, 1, one);
                acc[0][c] = one[0][0];
            }
            ${CNAME}_gstore(cx, m_lo, 1, n0, nc, acc, wz2, mult, bias, thr);
        }
        return;
    }
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += NR) {
        const int nc = n_hi - n0 < NR ? (int)(n_hi - n0) : NR;
        const uint64_t* w = W + n0 * (int64_t)KB * KWP;
        for (int64_t m0 = m_lo; m0 < m_hi; m0 += MR) {
            const int mr = m_hi - m0 < MR ? (int)(m_hi - m0) : MR;
            const uint64_t* a = cx->A + m0 * (int64_t)KA * KWP;
            uint64_t acc[MR][2 * NR];
            if (mr == MR && nc == NR) ${CNAME}_gmk(a, w, MR, NR, acc);
            else if (nc == NR)
                for (int r = 0; r < mr; ++r) ${CNAME}_gmk(a + r * KA * KWP, w, 1, NR, (uint64_t (*)[2 * NR])acc[r]);
            else for (int r = 0; r < mr; ++r)
                for (int c = 0; c < nc; ++c) {
                    uint64_t one[MR][2 * NR];
                    ${CNAME}_gmk(a + r * KA * KWP, w + c * KB * KWP, 1, 1, one);
                    acc[r][c] = one[0][0];
                }
            ${CNAME}_gstore(cx, m0, mr, n0, nc, acc, wz2, mult, bias, thr);
        }
    }
}

#if defined(QC_X86)
__attribute__((target("popcnt"))) static void ${CNAME}_gtask_popcnt(const void* vctx, int64_t t) {
    ${CNAME}_gtask(vctx, t);
}
#else
static void ${CNAME}_gtask_generic(const void* vctx, int64_t t) { ${CNAME}_gtask(vctx, t); }
#endif
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
/* one block on AVX-512: 4 rows x 32 channels per tile, one row x 64 channels when the block has one row */
QC_TGT_AVX512 static void ${CNAME}_gtask_avx512(const void* vctx, int64_t t) {
    enum { KA = ${CNAME}_GKA, KB = ${CNAME}_GKB, KWP = ${CNAME}_GKWP, N = ${CNAME}_GN, MR = ${CNAME}_G8MR,
           NG = ${CNAME}_G8NG, NG1 = ${CNAME}_G8NG1, GS = KB * KWP * 8 };
    const ${CNAME}_gctx* cx = (const ${CNAME}_gctx*)vctx;
    const uint64_t* W8 = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_W8});
    const int64_t bm = t / cx->n_nb, bn = t - bm * cx->n_nb;
    const int64_t m_lo = bm * cx->mb, m_hi = m_lo + cx->mb < cx->M ? m_lo + cx->mb : cx->M;
    if (cx->x)  /* row split: this task alone reads these rows, so it packs them (in parallel with the others) */
        qc_pack_rows(QC_PATH_AVX512, cx->x + m_lo * ${K}, m_hi - m_lo, ${K}, KA, ${CNAME}_GMODE != QC_AND, KWP,
                     (uint64_t*)cx->A + m_lo * (int64_t)KA * KWP, (int32_t*)cx->rowsum + m_lo, 1);
    const int64_t g_lo = bn * cx->nb / 8, g_end = (bn * cx->nb + cx->nb < N ? bn * cx->nb + cx->nb : N);
    const int64_t g_hi = (g_end + 7) / 8;  /* groups of 8 channels; the last may be partly padding */
    qc_v512 acc[MR][NG1];
    if (m_hi - m_lo == 1) {
        const uint64_t* a = cx->A + m_lo * (int64_t)KA * KWP;
        int64_t g = g_lo;
        for (; g + NG1 <= g_hi; g += NG1) {
            ${CNAME}_g8mk(a, W8 + g * GS, 1, NG1, acc);
            for (int c = 0; c < NG1; ++c) ${CNAME}_g8store(cx, m_lo, (g + c) * 8, acc[0][c]);
        }
        for (; g < g_hi; ++g) {
            ${CNAME}_g8mk(a, W8 + g * GS, 1, 1, acc);
            ${CNAME}_g8store(cx, m_lo, g * 8, acc[0][0]);
        }
        return;
    }
    for (int64_t g = g_lo; g < g_hi; g += NG) {
        const int ng = g_hi - g < NG ? (int)(g_hi - g) : NG;
        const uint64_t* w = W8 + g * GS;
        for (int64_t m0 = m_lo; m0 < m_hi; m0 += MR) {
            const int mr = m_hi - m0 < MR ? (int)(m_hi - m0) : MR;
            const uint64_t* a = cx->A + m0 * (int64_t)KA * KWP;
            if (mr == MR && ng == NG) {
                ${CNAME}_g8mk(a, w, MR, NG, acc);
                for (int r = 0; r < MR; ++r)
                    for (int c = 0; c < NG; ++c) ${CNAME}_g8store(cx, m0 + r, (g + c) * 8, acc[r][c]);
                continue;
            }
            for (int r = 0; r < mr; ++r)
                for (int c = 0; c < ng; ++c) {
                    ${CNAME}_g8mk(a + r * KA * KWP, w + c * GS, 1, 1, acc);
                    ${CNAME}_g8store(cx, m0 + r, (g + c) * 8, acc[0][0]);
                }
        }
    }
}
#endif

/* codes x [M][K] -> y [M][N] on up to nt threads, through packed rows A [M][KA][KWP] (zeroed by the caller: the
 * padding words stay 0) and their code sums rowsum [M] */
static void ${CNAME}_gemm_direct(const uint8_t* x, uint64_t* A, int32_t* rowsum, int64_t M, void* y, int path,
                                 int nt) {
    enum { AS = ${CNAME}_GKA * ${CNAME}_GKWP, N = ${CNAME}_GN, MR = ${GMR}, NR = ${GNR} };
    ${CNAME}_gctx cx = {A, rowsum, NULL, (${OUT_CTYPE_C}*)y, M, 0, 0, 0};
    /* a block's packed rows fill at most ~24 KiB of L1 */
    int64_t mb = 24576 / (AS * 8);
    mb = mb < MR ? MR : mb > 256 ? 256 : mb;
    mb = (mb + MR - 1) / MR * MR;
    const int64_t n_mb = (M + mb - 1) / mb;
    int simd = 0;
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
    simd = path == QC_PATH_AVX512;  /* this layer's AVX-512 kernel (QC_PER_LAYER_GEMM) */
#endif
    /* enough blocks for every thread (x4 for balance), at most 64 channels each, whole tiles of the kernel's
     * one-row path (2*NR channels) or of its AVX-512 tile (32) */
    const int64_t unit = simd ? 32 : 2 * NR;
    const int64_t want = 4 * (int64_t)nt, split = (want + n_mb - 1) / n_mb;
    int64_t nb = split > 1 ? (N + split - 1) / split : 64;
    nb = nb > 64 ? 64 : nb < NR ? NR : nb;
    nb = (nb + unit - 1) / unit * unit;
    /* AVX-512, weights within 256 KiB (a core's L2) and rows enough for every thread: split rows only, each task
     * every channel. A thread then writes whole output rows (no cache line shared with another thread's block) and
     * packs nothing twice: W1A1 M=64 K=N=256 5.1 against 5.9-6.4 us, K=256 N=1024 M=256 52 against 63-65 us,
     * K=1024 equal or better (Zen 4, 2 threads) */
    /* below ~2^13 words of work (~10 us on one core; 2^14 on AVX-512, 8 words per instruction: W1A1 M=64 K=N=256
     * took 6.0 us on 2 threads against 7.1 on one, M=16 2.1 us on one against 2.7, Zen 4) waking threads costs
     * more than it saves */
    const int64_t work = M * N * ${CNAME}_GKW * (${CNAME}_GMODE == QC_AND ? ${CNAME}_GKA * ${CNAME}_GKB : 1);
    const int threads = work > (simd ? (1 << 14) : (1 << 13)) ? nt : 1;
    if (simd && threads > 1 && (int64_t)N * ${CNAME}_GKB * ${CNAME}_GKWP * 8 <= (256 << 10) && M >= 4 * nt * 4) {
        mb = (M + want - 1) / want;
        mb = (mb + 3) / 4 * 4;                      /* whole 4-row tiles of the AVX-512 kernel */
        nb = (N + unit - 1) / unit * unit;
        cx.x = x;                                   /* and each task packs its own rows */
    } else {
        qc_pack_rows(path, x, M, ${K}, ${CNAME}_GKA, ${CNAME}_GMODE != QC_AND, ${CNAME}_GKWP, A, rowsum, nt);
    }
    cx.mb = mb; cx.nb = nb; cx.n_nb = (N + nb - 1) / nb;
#if defined(QC_X86)
    qc_task_fn fn = ${CNAME}_gtask_popcnt;
#else
    qc_task_fn fn = ${CNAME}_gtask_generic;
#endif
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
    if (simd) fn = ${CNAME}_gtask_avx512;
#endif
    (void)path;
    qc_parallel(threads, ((M + mb - 1) / mb) * cx.n_nb, fn, &cx);
}

