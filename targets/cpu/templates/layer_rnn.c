/* ---- recurrent layer ${LAYER} (${CNAME}): ${DESC}.
 * One call runs the whole sequence, every direction (ONNX LSTM/GRU semantics, layout 0):
 *   x_t's codes for all steps, then W x_t for all steps as ONE BitGemm call (M = seq * batch: the input products do
 *   not depend on the recurrence); per step the codes of h, R h as one BitGemm call (M = batch), the gate arithmetic.
 * The products are the BitGemm layers ${CNAME}_W/_R/_Rh of this library (float epilogue acc * m + b: passes/rnn.py
 * IntegerGates), so they equal the fake-quant Scan form's MatMul -> Mul -> Add exactly; codes come from the exact
 * float32 boundaries of its QuantizeLinear nodes (qcompile.input_quant), a code's value is (c * (1/n)) * 2 - 1 as
 * there. Sigmoid and tanh are this file's (qc_rnn_exp), which may differ from onnxruntime's by an ulp: a value that
 * sits on a grid boundary can then take the neighbouring code. The gate loops run over a row of H values, written
 * branch-free so the compiler vectorizes them; the AVX2 / AVX-512 copies differ only in vector width (no FMA
 * contraction: -ffp-contract=off), so every path gives the same bits. ---- */
/* no-trapping-math: lets the gate loops if-convert (the clamps, the code search); it changes no result */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#ifndef QC_RNN_HELPERS
#define QC_RNN_HELPERS
#define QC_INLINE static inline __attribute__((always_inline))
/* exp in float32 (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, 2^n through the exponent bits),
   ~1 ulp on [-87, 88], clamped outside; branch-free so loops over it vectorize */
QC_INLINE float qc_rnn_exp(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* nearest integer */
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union { int32_t i; float f; } scale = {((int32_t)n + 127) << 23};
    return p * scale.f;
}
QC_INLINE float qc_rnn_sigmoid(float x) { return 1.0f / (1.0f + qc_rnn_exp(-x)); }
QC_INLINE float qc_rnn_tanh(float x) { return 1.0f - 2.0f / (qc_rnn_exp(2.0f * x) + 1.0f); }
#endif

static const float ${CNAME}_xthr[${NL}] = {${XTHR}};
static const float ${CNAME}_hthr[${NL}] = {${HTHR}};
${PROTOS}static const qc_layer_fn ${CNAME}_W[${D}] = {${WFNS}};
static const qc_layer_fn ${CNAME}_R[${D}] = {${RFNS}};
static const qc_layer_fn ${CNAME}_Rh[${D}] = {${RHFNS}};

QC_INLINE int ${CNAME}_code(float v, const float* thr) {
    int q = 0;
    for (int k = 0; k < ${NL}; ++k) q += v >= thr[k];   /* NaN: code 0 */
    return q;
}
QC_INLINE float ${CNAME}_grid(int code) { return ((float)code * ${INV_N}) * 2.0f - 1.0f; }

/* one row of the gate arithmetic: the new state from this step's products (xr: W x_t + bw, hr: R h + br) */
QC_INLINE void ${CNAME}_row_body(const float* restrict xr, const float* restrict hr, const float* restrict rec,
                                 float* restrict h, float* restrict c) {
    enum { H = ${H}, LSTM = ${LSTM}, LBR = ${LBR} };
    for (int j = 0; j < H; ++j) {
        float hn;
        if (LSTM) {
            const float gi = xr[j] + hr[j], go = xr[H + j] + hr[H + j];
            const float gf = xr[2 * H + j] + hr[2 * H + j], gc = xr[3 * H + j] + hr[3 * H + j];
            const float cn = qc_rnn_sigmoid(gf) * c[j] + qc_rnn_sigmoid(gi) * qc_rnn_tanh(gc);
            hn = qc_rnn_sigmoid(go) * qc_rnn_tanh(cn);
            c[j] = cn;
        } else {
            const float z = qc_rnn_sigmoid(xr[j] + hr[j]);
            const float rp = LBR ? qc_rnn_sigmoid(xr[H + j] + hr[H + j]) * hr[2 * H + j] : rec[j];
            const float cand = ${CNAME}_grid(${CNAME}_code(qc_rnn_tanh(xr[2 * H + j] + rp), ${CNAME}_hthr));
            hn = (1.0f - z) * cand + z * h[j];
        }
        h[j] = ${CNAME}_grid(${CNAME}_code(hn, ${CNAME}_hthr));
    }
}
/* a GRU whose candidate block reads r * h: that product's codes */
QC_INLINE void ${CNAME}_rh_body(const float* restrict xr, const float* restrict hr, const float* restrict h,
                                uint8_t* restrict rhc) {
    enum { H = ${H} };
    for (int j = 0; j < H; ++j)
        rhc[j] = (uint8_t)${CNAME}_code(qc_rnn_sigmoid(xr[H + j] + hr[H + j]) * h[j], ${CNAME}_hthr);
}
QC_INLINE void ${CNAME}_codes_body(const float* restrict v, uint8_t* restrict out, int64_t n, const float* thr) {
    for (int64_t i = 0; i < n; ++i) out[i] = (uint8_t)${CNAME}_code(v[i], thr);
}
typedef void (*${CNAME}_row_fn)(const float*, const float*, const float*, float*, float*);
typedef void (*${CNAME}_rh_fn)(const float*, const float*, const float*, uint8_t*);
typedef void (*${CNAME}_codes_fn)(const float*, uint8_t*, int64_t, const float*);
static void ${CNAME}_row(const float* xr, const float* hr, const float* rec, float* h, float* c) {
    ${CNAME}_row_body(xr, hr, rec, h, c);
}
static void ${CNAME}_rh(const float* xr, const float* hr, const float* h, uint8_t* rhc) {
    ${CNAME}_rh_body(xr, hr, h, rhc);
}
static void ${CNAME}_codes(const float* v, uint8_t* out, int64_t n, const float* thr) {
    ${CNAME}_codes_body(v, out, n, thr);
}
#if defined(QC_X86)
#define ${CNAME}_WIDE(tgt, sfx)                                                                                    \
    __attribute__((target(tgt))) static void ${CNAME}_row_##sfx(const float* xr, const float* hr, const float* rec, \
                                                                 float* h, float* c) {                           \
        ${CNAME}_row_body(xr, hr, rec, h, c);                                                                    \
    }                                                                                                            \
    __attribute__((target(tgt))) static void ${CNAME}_rh_##sfx(const float* xr, const float* hr, const float* h,   \
                                                                uint8_t* rhc) {                                  \
        ${CNAME}_rh_body(xr, hr, h, rhc);                                                                        \
    }                                                                                                            \
    __attribute__((target(tgt))) static void ${CNAME}_codes_##sfx(const float* v, uint8_t* out, int64_t n,         \
                                                                   const float* thr) {                           \
        ${CNAME}_codes_body(v, out, n, thr);                                                                     \
    }
${CNAME}_WIDE("avx2", avx2)
${CNAME}_WIDE("avx512f,avx512vl,avx512bw,avx512dq", avx512)
#endif

QC_EXPORT int qc_rnn_${CNAME}(const float* x, const int32_t* lens, const float* h0, const float* c0, float* Y,
                              float* Yh, float* Yc, int64_t seq, int64_t batch) {
    enum { D = ${D}, H = ${H}, I = ${I}, G = ${G}, LSTM = ${LSTM}, LBR = ${LBR}, REVERSE = ${REVERSE} };
    /* GR: the columns of the first R call (a GRU whose candidate block reads r*h multiplies that block later) */
    enum { GR = (!LSTM && !LBR) ? 2 * H : G * H };
    if (!x || seq < 0 || batch < 0) return QC_ERR_ARG;
    if (lens)
        for (int64_t b = 0; b < batch; ++b)
            if (lens[b] < 0 || lens[b] > seq) return QC_ERR_LENS;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
    ${CNAME}_row_fn row = ${CNAME}_row;
    ${CNAME}_rh_fn rh = ${CNAME}_rh;
    ${CNAME}_codes_fn codes_of = ${CNAME}_codes;
#if defined(QC_X86)
    if (path == QC_PATH_AVX512) { row = ${CNAME}_row_avx512; rh = ${CNAME}_rh_avx512; codes_of = ${CNAME}_codes_avx512; }
    if (path == QC_PATH_AVX2) { row = ${CNAME}_row_avx2; rh = ${CNAME}_rh_avx2; codes_of = ${CNAME}_codes_avx2; }
#endif
    const int pinned_path = qc_pinned_path, pinned_threads = qc_pinned_threads;
    qc_pinned_threads = qc_num_threads();
    qc_pinned_path = path;   /* the gate products below skip the environment lookups (restored at the end) */
    const int64_t SB = seq * batch;
    if (Y) memset(Y, 0, (size_t)(SB * D * H) * sizeof(float));
    uint8_t* xc = (uint8_t*)qc_alloc((size_t)(SB * I) + 1);
    float* xw = (float*)qc_alloc((size_t)(SB * G * H + 1) * sizeof(float));
    float* st = (float*)qc_alloc((size_t)(batch * (3 * H + GR) + 1) * sizeof(float));
    uint8_t* codes = (uint8_t*)qc_alloc((size_t)(2 * batch * H) + 1);
    int rc = QC_OK;
    if (!xc || !xw || !st || !codes) { rc = QC_ERR_NOMEM; goto done; }
    float *h = st, *c = st + batch * H, *rec = st + 2 * batch * H, *hr = st + 3 * batch * H;
    uint8_t *hc = codes, *rhc = codes + batch * H;
    codes_of(x, xc, SB * I, ${CNAME}_xthr);
    for (int d = 0; d < D && rc == QC_OK; ++d) {
        const int reverse = REVERSE || d == 1;
        if (SB && (rc = ${CNAME}_W[d](xc, xw, SB)) != QC_OK) break;
        for (int64_t i = 0; i < batch * H; ++i) {
            h[i] = h0 ? h0[d * batch * H + i] : 0.0f;
            c[i] = (LSTM && c0) ? c0[d * batch * H + i] : 0.0f;
        }
        for (int64_t t = 0; t < seq && rc == QC_OK; ++t) {
            codes_of(h, hc, batch * H, ${CNAME}_hthr);
            if ((rc = ${CNAME}_R[d](hc, hr, batch)) != QC_OK) break;
            if (!LSTM && !LBR) {  /* the candidate block multiplies the codes of r * h */
                for (int64_t b = 0; b < batch; ++b) {
                    const int64_t len = lens ? lens[b] : seq;
                    const int64_t tt = t < len ? (reverse ? len - 1 - t : t) : 0;
                    rh(xw + (tt * batch + b) * G * H, hr + b * GR, h + b * H, rhc + b * H);
                }
                if ((rc = ${CNAME}_Rh[d](rhc, rec, batch)) != QC_OK) break;
            }
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t len = lens ? lens[b] : seq;
                if (t >= len) continue;                  /* past its end: the state stays, Y stays zero */
                const int64_t tt = reverse ? len - 1 - t : t;
                row(xw + (tt * batch + b) * G * H, hr + b * GR, rec + b * H, h + b * H, c + b * H);
                if (Y) memcpy(Y + ((tt * D + d) * batch + b) * H, h + b * H, H * sizeof(float));
            }
        }
        if (Yh) memcpy(Yh + d * batch * H, h, (size_t)(batch * H) * sizeof(float));
        if (LSTM && Yc) memcpy(Yc + d * batch * H, c, (size_t)(batch * H) * sizeof(float));
    }
done:
    qc_pinned_path = pinned_path;
    qc_pinned_threads = pinned_threads;
    free(xc); free(xw); free(st); free(codes);
    return rc;
}
#pragma GCC pop_options
