/* ---- layer ${LAYER} (${CNAME}): BitGemm, x uint8 [batch, ${K}] -> y ${OUT_CTYPE} [batch, ${N}];
 *      bits_a=${KA} bits_w=${KB} mode=${MODE} epilogue=${EPI} ---- */
__asm__(".section .rodata\n.balign 64\nqc_blob_${CNAME}:\n.incbin \"${BLOB}\"\n.previous\n");
extern const uint8_t qc_blob_${CNAME}[] __attribute__((visibility("hidden")));

${DIRECT_CODE}${EXPORT}(const uint8_t* x, void* y, int64_t batch) {
    enum { K = ${K}, N = ${N}, KA = ${KA}, KB = ${KB}, KWP = ${KWP}, L = ${L} };
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
${LUT_CALL}    qc_job j;
    memset(&j, 0, sizeof j);
    j.ka = KA; j.kb = KB; j.mode = ${MODE}; j.kwp = KWP; j.kw = ${KWORDS}; j.a_stride = (int64_t)KA * KWP;
    j.W = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_W});
    j.wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2});
    j.N = N; j.epi = ${EPI}; j.L = L;
    j.mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    j.bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    j.thr = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THR});
    j.y = y; j.P = 1; j.n_total = N; j.n0 = 0;
    j.nthreads = qc_num_threads();
    /* pack activations in chunks of rows so the packed copy stays within 32 MiB */
    int64_t chunk = ((int64_t)32 << 20) / (j.a_stride * 8 + 4);
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    /* a small batch packs on the stack: no allocation per call (a visible share of a one-row call) */
    uint64_t a_small[1024] __attribute__((aligned(64)));
    int32_t rs_small[64];
    const int small = chunk <= 64 && chunk * j.a_stride <= 1024;
    uint64_t* A;
    int32_t* rowsum;
    if (small) {
        A = a_small; rowsum = rs_small;
        memset(A, 0, (size_t)(chunk * j.a_stride) * 8);  /* padding words stay 0 */
    } else {
        A = (uint64_t*)qc_alloc((size_t)(chunk * j.a_stride) * 8);  /* zeroed: padding words stay 0 */
        rowsum = (int32_t*)qc_alloc((size_t)chunk * 4);
        if (!A || !rowsum) { free(A); free(rowsum); return QC_ERR_NOMEM; }
    }
    j.A = A; j.rowsum = rowsum;
    for (int64_t r0 = 0; r0 < batch; r0 += chunk) {
        const int64_t rows = batch - r0 < chunk ? batch - r0 : chunk;
        if (QC_PER_LAYER_GEMM(path)) {  /* this layer's own kernel (layer_dgemm.c); it packs the rows itself */
            ${CNAME}_gemm_direct(x + r0 * K, A, rowsum, rows, (uint8_t*)y + r0 * N * (int64_t)sizeof(${OUT_CTYPE_C}),
                                 path, j.nthreads);
            continue;
        }
        qc_pack_rows(path, x + r0 * K, rows, K, KA, ${MODE} != QC_AND, KWP, A, rowsum, j.nthreads);
        j.M = rows; j.row0 = r0;
        qc_run_job(path, &j);
    }
    if (!small) { free(A); free(rowsum); }
    return QC_OK;
}

