/* ---- layer ${LAYER} (${CNAME}): its input arrives as float32 NCHW [batch, ${C}, ${H}, ${W}] and becomes codes
 * here, code = #{k : x >= T[k]}, T = the exact boundaries of the onnxruntime Clip -> QuantizeLinear this replaces
 * (qcompile.input_quant probed them; NaN = a level never reached, and a NaN input gets code 0). The x86 SIMD
 * paths' LUT kernel compares as it builds its tables (codegen: lut_float); other paths quantize chunks of images
 * into scratch (threads over blocks of values) and run the conv on those codes. ---- */
static const float ${CNAME}_qthr[${QL}] = {${QTHR}};

typedef struct {
    const float* x;
    uint8_t* codes;
    int64_t n;
} ${CNAME}_qctx;

enum { ${CNAME}_QBLOCK = 1 << 15 };

static void ${CNAME}_qtask(const void* vctx, int64_t t) {
    const ${CNAME}_qctx* cx = (const ${CNAME}_qctx*)vctx;
    const int64_t i1 = (t + 1) * ${CNAME}_QBLOCK < cx->n ? (t + 1) * ${CNAME}_QBLOCK : cx->n;
    const float* x = cx->x;
    uint8_t* c = cx->codes;
    for (int64_t i = t * ${CNAME}_QBLOCK; i < i1; ++i) {  /* branch-free compares: the compiler vectorizes them */
        const float v = x[i];
        int q = 0;
        for (int k = 0; k < ${QL}; ++k) q += v >= ${CNAME}_qthr[k];
        c[i] = (uint8_t)q;
    }
}

QC_EXPORT int qc_layer_${CNAME}(const uint8_t* x, void* y, int64_t batch) {
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
${LUT_CALL}    const int64_t in_img = (int64_t)${C} * ${H} * ${W}, out_img_bytes = ${OUT_IMG_BYTES};
    int64_t chunk = ((int64_t)4 << 20) / in_img;  /* <= 4 MiB of codes */
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    uint8_t* codes = (uint8_t*)qc_alloc((size_t)(chunk * in_img));
    if (!codes) return QC_ERR_NOMEM;
    const int nt = qc_num_threads();
    int rc = QC_OK;
    for (int64_t b0 = 0; b0 < batch && rc == QC_OK; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        ${CNAME}_qctx q = {(const float*)x + b0 * in_img, codes, bc * in_img};
        qc_parallel(q.n > (1 << 16) ? nt : 1, (q.n + ${CNAME}_QBLOCK - 1) / ${CNAME}_QBLOCK, ${CNAME}_qtask, &q);
        rc = ${INNER}(codes, (uint8_t*)y + b0 * out_img_bytes, bc);
    }
    free(codes);
    return rc;
}
