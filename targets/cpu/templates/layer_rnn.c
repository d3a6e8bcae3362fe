/* ---- recurrent layer ${LAYER} (${CNAME}): ${DESC}.
 * One call runs the whole sequence, every direction (ONNX LSTM/GRU semantics, layout 0):
 *   x_t's codes for all steps, then W x_t for all steps as ONE BitGemm call (M = seq * batch: the input products do
 *   not depend on the recurrence); per step the codes of h, R h as one BitGemm call (M = batch), the gate arithmetic.
 * The products are the BitGemm layers ${CNAME}_W/_R/_Rh of this library (float epilogue acc * m + b: passes/rnn.py
 * IntegerGates), so they equal the fake-quant Scan form's MatMul -> Mul -> Add exactly; codes come from the exact
 * float32 boundaries of its QuantizeLinear nodes (qcompile.input_quant). Sigmoid and tanh are libm's, which may
 * differ from onnxruntime's by an ulp: a value that sits on a grid boundary can then take the neighbouring code. ---- */
#ifndef QC_RNN_HELPERS
#define QC_RNN_HELPERS
#include <math.h>
static inline float qc_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
#endif

static const float ${CNAME}_xthr[${NL}] = {${XTHR}};
static const float ${CNAME}_hthr[${NL}] = {${HTHR}};
static const float ${CNAME}_hval[${NL} + 1] = {${HVAL}};
${PROTOS}static const qc_layer_fn ${CNAME}_W[${D}] = {${WFNS}};
static const qc_layer_fn ${CNAME}_R[${D}] = {${RFNS}};
static const qc_layer_fn ${CNAME}_Rh[${D}] = {${RHFNS}};

static inline uint8_t ${CNAME}_code(float v, const float* thr) {
    int q = 0;
    for (int k = 0; k < ${NL}; ++k) q += v >= thr[k];   /* NaN: code 0 */
    return (uint8_t)q;
}

QC_EXPORT int qc_rnn_${CNAME}(const float* x, const int32_t* lens, const float* h0, const float* c0, float* Y,
                              float* Yh, float* Yc, int64_t seq, int64_t batch) {
    enum { D = ${D}, H = ${H}, I = ${I}, G = ${G}, LSTM = ${LSTM}, LBR = ${LBR}, REVERSE = ${REVERSE} };
    /* GR: the columns of the first R call (a GRU whose candidate block reads r*h multiplies that block later) */
    enum { GR = (!LSTM && !LBR) ? 2 * H : G * H };
    if (!x || seq < 0 || batch < 0) return QC_ERR_ARG;
    if (lens)
        for (int64_t b = 0; b < batch; ++b)
            if (lens[b] < 0 || lens[b] > seq) return QC_ERR_LENS;
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
    for (int64_t i = 0; i < SB * I; ++i) xc[i] = ${CNAME}_code(x[i], ${CNAME}_xthr);
    for (int d = 0; d < D && rc == QC_OK; ++d) {
        const int reverse = REVERSE || d == 1;
        if (SB && (rc = ${CNAME}_W[d](xc, xw, SB)) != QC_OK) break;
        for (int64_t i = 0; i < batch * H; ++i) {
            h[i] = h0 ? h0[d * batch * H + i] : 0.0f;
            c[i] = (LSTM && c0) ? c0[d * batch * H + i] : 0.0f;
        }
        for (int64_t t = 0; t < seq && rc == QC_OK; ++t) {
            for (int64_t i = 0; i < batch * H; ++i) hc[i] = ${CNAME}_code(h[i], ${CNAME}_hthr);
            if ((rc = ${CNAME}_R[d](hc, hr, batch)) != QC_OK) break;
            if (!LSTM && !LBR) {  /* the candidate block multiplies the codes of r * h */
                for (int64_t b = 0; b < batch; ++b) {
                    const int64_t len = lens ? lens[b] : seq;
                    const int64_t tt = t < len ? (reverse ? len - 1 - t : t) : 0;
                    const float* xr = xw + (tt * batch + b) * G * H + H;
                    const float* hrr = hr + b * GR + H;
                    for (int j = 0; j < H; ++j) {
                        const float r = qc_sigmoid(xr[j] + hrr[j]);
                        rhc[b * H + j] = ${CNAME}_code(r * h[b * H + j], ${CNAME}_hthr);
                    }
                }
                if ((rc = ${CNAME}_Rh[d](rhc, rec, batch)) != QC_OK) break;
            }
            for (int64_t b = 0; b < batch; ++b) {
                const int64_t len = lens ? lens[b] : seq;
                if (t >= len) continue;                  /* past its end: the state stays, Y stays zero */
                const int64_t tt = reverse ? len - 1 - t : t;
                const float* xrow = xw + (tt * batch + b) * G * H;
                const float* hrow = hr + b * GR;
                float* hb = h + b * H;
                float* yrow = Y ? Y + ((tt * D + d) * batch + b) * H : NULL;
                for (int j = 0; j < H; ++j) {
                    float hn;
                    if (LSTM) {
                        const float gi = xrow[j] + hrow[j], go = xrow[H + j] + hrow[H + j];
                        const float gf = xrow[2 * H + j] + hrow[2 * H + j], gc = xrow[3 * H + j] + hrow[3 * H + j];
                        const float cn = qc_sigmoid(gf) * c[b * H + j] + qc_sigmoid(gi) * tanhf(gc);
                        hn = qc_sigmoid(go) * tanhf(cn);
                        c[b * H + j] = cn;
                    } else {
                        const float z = qc_sigmoid(xrow[j] + hrow[j]);
                        float r_part;
                        if (LBR) r_part = qc_sigmoid(xrow[H + j] + hrow[H + j]) * hrow[2 * H + j];
                        else r_part = rec[b * H + j];
                        const float cand = ${CNAME}_hval[${CNAME}_code(tanhf(xrow[2 * H + j] + r_part), ${CNAME}_hthr)];
                        hn = (1.0f - z) * cand + z * hb[j];
                    }
                    hb[j] = ${CNAME}_hval[${CNAME}_code(hn, ${CNAME}_hthr)];
                    if (yrow) yrow[j] = hb[j];
                }
            }
        }
        if (Yh) memcpy(Yh + d * batch * H, h, (size_t)(batch * H) * sizeof(float));
        if (LSTM && Yc) memcpy(Yc + d * batch * H, c, (size_t)(batch * H) * sizeof(float));
    }
done:
    free(xc); free(xw); free(st); free(codes);
    return rc;
}
