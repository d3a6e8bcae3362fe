/* ---- layer ${LAYER} (${CNAME}): BitGemm by lookup tables (x86 AVX2 path; codegen.lut_gemm says when). The
 * LUT conv's scheme (layer_lconv.c) on rows: stage 1 gives every row one 16-byte table per group of 4 codes,
 * T[e] = sum_{i<4} bit_i(e) * x[m][4g+i], laid out [M][G4][16]; stage 2 looks up 32 channels' T[e] per vpshufb
 * from index bytes [NB][G4][KB][32] (channel order as in the conv), adds bytes for up to ${LCH} lookups, then
 * widens to 16-bit sums. Register tile: ${LR} rows x 32 channels (1 row for leftovers). The epilogue writes 32
 * contiguous outputs of a row per block. ---- */
#if defined(QC_X86)
enum { ${CNAME}_G4 = ${G4}, ${CNAME}_NB = ${NB}, ${CNAME}_LR = ${LR}, ${CNAME}_LCH = ${LCH}, ${CNAME}_LMB = 16 };

typedef struct {
    const uint8_t* x;      /* this round's first row */
    uint8_t* tab;          /* [rows][G4][16] */
    int32_t* rowsum;       /* [rows] */
    ${OUT_CTYPE_C}* y;     /* this round's first output row */
    int64_t M, cb, n_cb;   /* rows this round; channel blocks per task, tasks per row block */
} ${CNAME}_lgctx;

/* stage 1: rows [16t, 16t + 16) -> tables and code sums */
__attribute__((target("avx2"))) static void ${CNAME}_lgtab(const void* vctx, int64_t t) {
    enum { K = ${K}, G4 = ${CNAME}_G4, MB = ${CNAME}_LMB };
    const ${CNAME}_lgctx* cx = (const ${CNAME}_lgctx*)vctx;
    const int64_t m1 = (t + 1) * MB < cx->M ? (t + 1) * MB : cx->M;
    for (int64_t m = t * MB; m < m1; ++m) {
        const uint8_t* row = cx->x + m * K;
        uint8_t* tm = cx->tab + m * (int64_t)G4 * 16;
        __m256i sad = _mm256_setzero_si256();
        int64_t k = 0;
        for (; k + 32 <= K; k += 32)
            sad = _mm256_add_epi64(sad, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i*)(row + k)),
                                                        _mm256_setzero_si256()));
        int64_t s = _mm256_extract_epi64(sad, 0) + _mm256_extract_epi64(sad, 1) + _mm256_extract_epi64(sad, 2) +
                    _mm256_extract_epi64(sad, 3);
        for (; k < K; ++k) s += row[k];
        cx->rowsum[m] = (int32_t)s;
        for (int g = 0; g < G4; g += 2) {
            uint64_t codes = 0;
            if (4 * g + 8 <= K) memcpy(&codes, row + 4 * g, 8);
            else memcpy(&codes, row + 4 * g, (size_t)(K - 4 * g));  /* the row's tail; missing codes are 0 */
            const __m256i tt = qc_lut_tables2(codes);
            if (g + 1 < G4) _mm256_storeu_si256((__m256i*)(tm + 16 * g), tt);
            else _mm_storeu_si128((__m128i*)(tm + 16 * g), _mm256_castsi256_si128(tt));
        }
    }
}

/* S of mr rows (tables t[r]) x the 32 channels of index block ib, as 16-bit sums (channels 0..15, 16..31) */
__attribute__((target("avx2"), always_inline)) static inline void ${CNAME}_lgmk(
        const uint8_t* const* t, const uint8_t* ib, const int mr, __m256i s16[${LR}][2]) {
    enum { G4 = ${CNAME}_G4, KB = ${KB}, CH = ${CNAME}_LCH };
    for (int r = 0; r < mr; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int j0 = 0; j0 < G4; j0 += CH) {
        const int je = j0 + CH < G4 ? j0 + CH : G4;
        __m256i s8[${LR}];
        for (int r = 0; r < mr; ++r) s8[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = j0; j < je; ++j) {
            __m256i iv[KB];
            for (int q = 0; q < KB; ++q) iv[q] = _mm256_loadu_si256((const __m256i*)(ib + (j * KB + q) * 32));
            for (int r = 0; r < mr; ++r) {
                const __m256i tb = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t[r] + j * 16)));
                s8[r] = _mm256_add_epi8(s8[r], qc_lut_lookup(tb, iv, KB));
            }
        }
        for (int r = 0; r < mr; ++r) qc_lut_widen(s8[r], s16[r]);
    }
}

/* the epilogue of row m, channels n0 .. n0+nc (nc <= 32): 32 contiguous outputs */
__attribute__((target("avx2"), always_inline)) static inline void ${CNAME}_lgstore(
        const ${CNAME}_lgctx* cx, int64_t m, int64_t n0, int nc, const __m256i s16[2]) {
    enum { N = ${N}, NB = ${CNAME}_NB, L = ${L}, EPI = ${EPI} };
    const int32_t* wz2p = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2P});
    const int32_t* thrt = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THRT});
    const float* multp = (const float*)(qc_blob_${CNAME} + ${OFF_MULTP});
    const float* biasp = (const float*)(qc_blob_${CNAME} + ${OFF_BIASP});
    (void)thrt; (void)multp; (void)biasp;
    ${OUT_CTYPE_C} out[32] __attribute__((aligned(32)));
    ${OUT_CTYPE_C}* yo = cx->y + m * (int64_t)N + n0;
    ${OUT_CTYPE_C}* dst = nc == 32 ? yo : out;
    int32_t q32[32] __attribute__((aligned(32)));
    for (int h = 0; h < 4; ++h) {
        const __m256i a = qc_lut_acc8(s16, h, wz2p + n0, cx->rowsum[m]);
        if (EPI == QC_EPI_THRESHOLD) {
            _mm256_store_si256((__m256i*)(q32 + 8 * h), qc_lut_thr8(a, thrt + n0 + 8 * h, (int64_t)NB * 32, L));
        } else if (EPI == QC_EPI_FLOAT) {  /* float32(acc) * mult, rounded, then + bias: no fused multiply-add */
            __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_loadu_ps(multp + n0 + 8 * h));
            f = _mm256_add_ps(f, _mm256_loadu_ps(biasp + n0 + 8 * h));
            _mm256_storeu_ps((float*)dst + 8 * h, f);
        } else {
            _mm256_storeu_si256((__m256i*)((int32_t*)dst + 8 * h), a);
        }
    }
    if (EPI == QC_EPI_THRESHOLD)
        for (int c = 0; c < 32; ++c) ((uint8_t*)dst)[c] = (uint8_t)q32[c];
    if (nc < 32) memcpy(yo, out, (size_t)nc * sizeof(${OUT_CTYPE_C}));
}

/* stage 2, task t: row block t / n_cb (16 rows) x channel blocks [cb * (t % n_cb), ...) */
__attribute__((target("avx2"))) static void ${CNAME}_lgtask(const void* vctx, int64_t t) {
    enum { N = ${N}, G4 = ${CNAME}_G4, NB = ${CNAME}_NB, KB = ${KB}, R = ${CNAME}_LR, MB = ${CNAME}_LMB };
    const ${CNAME}_lgctx* cx = (const ${CNAME}_lgctx*)vctx;
    const uint8_t* widx = qc_blob_${CNAME} + ${OFF_WL};
    const int64_t rb = t / cx->n_cb, c0 = (t - rb * cx->n_cb) * cx->cb;
    const int64_t m_lo = rb * MB, m_hi = m_lo + MB < cx->M ? m_lo + MB : cx->M;
    const int64_t c1 = c0 + cx->cb < NB ? c0 + cx->cb : NB;
    for (int64_t nb = c0; nb < c1; ++nb) {
        const uint8_t* ib = widx + nb * (int64_t)G4 * KB * 32;
        const int64_t n0 = nb * 32;
        const int nc = N - n0 < 32 ? (int)(N - n0) : 32;
        int64_t m = m_lo;
        for (; m + R <= m_hi; m += R) {
            const uint8_t* tr[R];
            for (int r = 0; r < R; ++r) tr[r] = cx->tab + (m + r) * (int64_t)G4 * 16;
            __m256i s16[R][2];
            ${CNAME}_lgmk(tr, ib, R, s16);
            for (int r = 0; r < R; ++r) ${CNAME}_lgstore(cx, m + r, n0, nc, s16[r]);
        }
        for (; m < m_hi; ++m) {
            const uint8_t* tr[R] = {cx->tab + m * (int64_t)G4 * 16};
            __m256i s16[R][2];
            ${CNAME}_lgmk(tr, ib, 1, s16);
            ${CNAME}_lgstore(cx, m, n0, nc, s16[0]);
        }
    }
}

static int ${CNAME}_lut(const uint8_t* x, void* y, int64_t batch) {
    enum { K = ${K}, N = ${N}, G4 = ${CNAME}_G4, NB = ${CNAME}_NB, MB = ${CNAME}_LMB, KB = ${KB} };
    const int nt = qc_num_threads();
    /* rows per round: ~1 MiB of tables (stage 2 reads them back from cache), whole row blocks */
    int64_t chunk = ((int64_t)1 << 20) / ((int64_t)G4 * 16 + 4) / MB * MB;
    if (chunk < 2 * nt * MB) chunk = 2 * nt * MB;
    if (chunk > batch) chunk = batch;
    ${CNAME}_lgctx cx;
    memset(&cx, 0, sizeof cx);
    uint8_t tab_small[8192] __attribute__((aligned(32)));  /* small batches: no allocation per call */
    int32_t rs_small[64];
    const int small = chunk <= 64 && chunk * G4 * 16 <= 8192;
    cx.tab = small ? tab_small : (uint8_t*)qc_alloc((size_t)chunk * G4 * 16);
    cx.rowsum = small ? rs_small : (int32_t*)qc_alloc((size_t)chunk * 4);
    if (!cx.tab || !cx.rowsum) {
        if (!small) { free(cx.tab); free(cx.rowsum); }
        return QC_ERR_NOMEM;
    }
    for (int64_t r0 = 0; r0 < batch; r0 += chunk) {
        const int64_t rows = batch - r0 < chunk ? batch - r0 : chunk;
        cx.x = x + r0 * K;
        cx.y = (${OUT_CTYPE_C}*)y + r0 * N;
        cx.M = rows;
        const int64_t n_rb = (rows + MB - 1) / MB;
        /* enough tasks for every thread (x4 for balance): split the channel blocks when rows are few */
        const int64_t split = (4 * (int64_t)nt + n_rb - 1) / n_rb;
        cx.cb = split > 1 ? (NB + split - 1) / split : NB;
        cx.n_cb = (NB + cx.cb - 1) / cx.cb;
        const int threads = rows * (int64_t)N * K * KB > (1 << 16) ? nt : 1;
        qc_parallel(rows * K > 32768 ? threads : 1, n_rb, ${CNAME}_lgtab, &cx);
        qc_parallel(threads, n_rb * cx.n_cb, ${CNAME}_lgtask, &cx);
    }
    if (!small) { free(cx.tab); free(cx.rowsum); }
    return QC_OK;
}
#endif
