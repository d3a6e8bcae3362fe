/* ---- layer ${LAYER} (${CNAME}): the BitGemm kernel with this layer's shapes as constants (QC_PER_LAYER_GEMM:
 *      the AVX2 path on x86, the portable path elsewhere, and the AVX-512 path in a library generated for an
 *      AVX-512 target; the other paths run the core's kernels). Scalar popcount (hardware POPCNT on x86) over
 *      ${KWORDS} word(s) per plane, or AVX-512 VPOPCNTDQ; register tile ${GMR} rows x ${GNR} channels, each row and
 *      each weight one constant stride from a single base pointer, so the tile's counters stay in registers.
 *      Why not the core's AVX2 nibble-table kernel: on a CPU that runs POPCNT on every integer ALU (AMD Zen)
 *      scalar popcount is faster, and with K known the per-tile overhead (plane loops, strides, epilogue
 *      dispatch) compiles away, which is what short K (1024 bits = 16 words) needs (bench/RESULTS.md). ---- */
enum { ${CNAME}_GKA = ${KA}, ${CNAME}_GKB = ${KB}, ${CNAME}_GKWP = ${KWP}, ${CNAME}_GKW = ${KWORDS},
       ${CNAME}_GN = ${N}, ${CNAME}_GL = ${L}, ${CNAME}_GMODE = ${MODE}, ${CNAME}_GEPI = ${EPI} };

typedef struct {
    const uint64_t* A;       /* packed activation rows [M][KA][KWP] */
    const int32_t* rowsum;   /* [M] */
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
/* the same tile on AVX-512 VPOPCNTDQ (libraries for an AVX-512 target): 8 words per step in the lanes of one zmm
 * accumulator per (row, channel), summed across lanes at the end. Reads whole vectors: KWP is a multiple of 8 and
 * the words past K are zero in both operands. */
QC_TGT_AVX512 static inline void ${CNAME}_gmk512(const uint64_t* a, const uint64_t* w, const int mr, const int nr,
                                                 uint64_t acc[${GMR}][2 * ${GNR}]) {
    enum { KA = ${CNAME}_GKA, KB = ${CNAME}_GKB, KWP = ${CNAME}_GKWP, KV = (${CNAME}_GKW + 7) / 8,
           MODE = ${CNAME}_GMODE, AS = KA * KWP, WS = KB * KWP, APL_ = MODE == QC_AND ? KA : 1,
           BPL = MODE == QC_AND ? KB : 1 };
    qc_v512 v[${GMR}][2 * ${GNR}];
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c) v[r][c] = QC512(setzero_si512)();
#pragma GCC unroll 1
    for (int s = APL_ + BPL - 2; s >= 0; --s) {
        for (int r = 0; r < mr; ++r)
            for (int c = 0; c < nr; ++c) v[r][c] = QC512(slli_epi64)(v[r][c], 1);
#pragma GCC unroll 1
        for (int i = qc_pair_lo(s, BPL); i <= qc_pair_hi(s, APL_); ++i) {
            const uint64_t* ap = a + i * KWP;
            const uint64_t* wp = w + (s - i) * KWP;
#pragma GCC unroll 2
            for (int k = 0; k < KV * 8; k += 8)
                for (int r = 0; r < mr; ++r) {
                    const qc_v512 av = QC512(loadu_si512)((const void*)(ap + r * AS + k));
                    for (int c = 0; c < nr; ++c) {
                        const qc_v512 wv = QC512(loadu_si512)((const void*)(wp + c * WS + k));
                        v[r][c] = QC512(add_epi64)(v[r][c], QC512(popcnt_epi64)(
                            MODE == QC_AND ? QC512(and_si512)(av, wv) : QC512(xor_si512)(av, wv)));
                    }
                }
        }
    }
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c) {
            int64_t l[8];
            QC512(storeu_si512)((void*)l, v[r][c]);
            acc[r][c] = (uint64_t)(l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7]);
        }
}
#endif

/* the tile by the task's kernel: AVX-512 (simd) or scalar popcount */
QC_INLINE void ${CNAME}_gmkx(const int simd, const uint64_t* a, const uint64_t* w, const int mr, const int nr,
                             uint64_t acc[${GMR}][2 * ${GNR}]) {
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
    if (simd) {
        ${CNAME}_gmk512(a, w, mr, nr, acc);
        return;
    }
#endif
    (void)simd;
    ${CNAME}_gmk(a, w, mr, nr, acc);
}

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
QC_INLINE void ${CNAME}_gtask(const void* vctx, int64_t t, const int simd) {
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
            if (nc == 2 * NR) ${CNAME}_gmkx(simd, a, w, 1, 2 * NR, acc);
            else for (int c = 0; c < nc; ++c) {
                uint64_t one[MR][2 * NR];
                ${CNAME}_gmkx(simd, a, w + c * KB * KWP, 1, 1, one);
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
            if (mr == MR && nc == NR) ${CNAME}_gmkx(simd, a, w, MR, NR, acc);
            else if (nc == NR)
                for (int r = 0; r < mr; ++r) ${CNAME}_gmkx(simd, a + r * KA * KWP, w, 1, NR, (uint64_t (*)[2 * NR])acc[r]);
            else for (int r = 0; r < mr; ++r)
                for (int c = 0; c < nc; ++c) {
                    uint64_t one[MR][2 * NR];
                    ${CNAME}_gmkx(simd, a + r * KA * KWP, w + c * KB * KWP, 1, 1, one);
                    acc[r][c] = one[0][0];
                }
            ${CNAME}_gstore(cx, m0, mr, n0, nc, acc, wz2, mult, bias, thr);
        }
    }
}

#if defined(QC_X86)
__attribute__((target("popcnt"))) static void ${CNAME}_gtask_popcnt(const void* vctx, int64_t t) {
    ${CNAME}_gtask(vctx, t, 0);
}
#else
static void ${CNAME}_gtask_generic(const void* vctx, int64_t t) { ${CNAME}_gtask(vctx, t, 0); }
#endif
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
QC_TGT_AVX512 static void ${CNAME}_gtask_avx512(const void* vctx, int64_t t) { ${CNAME}_gtask(vctx, t, 1); }
#endif

/* packed rows [M] -> y [M][N] on up to nt threads */
static void ${CNAME}_gemm_direct(const uint64_t* A, const int32_t* rowsum, int64_t M, void* y, int path, int nt) {
    enum { AS = ${CNAME}_GKA * ${CNAME}_GKWP, N = ${CNAME}_GN, MR = ${GMR}, NR = ${GNR} };
    ${CNAME}_gctx cx = {A, rowsum, (${OUT_CTYPE_C}*)y, M, 0, 0, 0};
    /* a block's packed rows fill at most ~24 KiB of L1 */
    int64_t mb = 24576 / (AS * 8);
    mb = mb < MR ? MR : mb > 256 ? 256 : mb;
    mb = (mb + MR - 1) / MR * MR;
    const int64_t n_mb = (M + mb - 1) / mb;
    /* enough blocks for every thread (x4 for balance), at most 64 channels each, a multiple of 2*NR */
    const int64_t want = 4 * (int64_t)nt, split = (want + n_mb - 1) / n_mb;
    int64_t nb = split > 1 ? (N + split - 1) / split : 64;
    nb = nb > 64 ? 64 : nb < NR ? NR : nb;
    nb = (nb + 2 * NR - 1) / (2 * NR) * (2 * NR);  /* whole tiles of the one-row path too */
    cx.mb = mb; cx.nb = nb; cx.n_nb = (N + nb - 1) / nb;
#if defined(QC_X86)
    qc_task_fn fn = ${CNAME}_gtask_popcnt;  /* the AVX2 path (QC_PER_LAYER) ... */
#else
    qc_task_fn fn = ${CNAME}_gtask_generic;
#endif
#if defined(QC_LAYER_AVX512) && defined(QC_HAVE_SIMD)
    if (path == QC_PATH_AVX512) fn = ${CNAME}_gtask_avx512;  /* ... or AVX-512 (QC_PER_LAYER_GEMM) */
#endif
    (void)path;
    /* below ~2^13 words of work (~10 us on one core) waking threads costs more than it saves */
    const int64_t work = M * N * ${CNAME}_GKW * (${CNAME}_GMODE == QC_AND ? ${CNAME}_GKA * ${CNAME}_GKB : 1);
    qc_parallel(work > (1 << 13) ? nt : 1, n_mb * cx.n_nb, fn, &cx);
}

