/* ---- layer ${LAYER} (${CNAME}): MaxPoolCodes, uint8 codes NCHW [batch, ${C}, ${H}, ${W}] -> uint8
 *      [batch, ${C}, ${HO}, ${WO}]; window ${KH}x${KW}, strides (${SH}, ${SW}), dilations (${DH}, ${DW}), no pads.
 *      One task per block of channel planes; the 2x2 stride-2 window (the common one) has its own loop. ---- */
enum { ${CNAME}_PLANES_PER_TASK = ${PPT} };

typedef struct {
    const uint8_t* x;
    uint8_t* y;
    int64_t planes;
} ${CNAME}_ctx;

static void ${CNAME}_task(const void* vctx, int64_t t) {
    enum { H = ${H}, W = ${W}, HO = ${HO}, WO = ${WO}, KH = ${KH}, KW = ${KW}, SH = ${SH}, SW = ${SW}, DH = ${DH},
           DW = ${DW}, PPT = ${CNAME}_PLANES_PER_TASK };
    const ${CNAME}_ctx* cx = (const ${CNAME}_ctx*)vctx;
    const int64_t p1 = (t + 1) * PPT < cx->planes ? (t + 1) * PPT : cx->planes;
    for (int64_t pl = t * PPT; pl < p1; ++pl) {
        const uint8_t* src = cx->x + pl * (int64_t)H * W;
        uint8_t* dst = cx->y + pl * (int64_t)HO * WO;
        for (int oy = 0; oy < HO; ++oy) {
            if (KH == 2 && KW == 2 && SW == 2 && DH == 1 && DW == 1) {
                const uint8_t* r0 = src + (int64_t)oy * SH * W;
                const uint8_t* r1 = r0 + W;
                for (int ox = 0; ox < WO; ++ox) {
                    uint8_t a = r0[2 * ox] > r0[2 * ox + 1] ? r0[2 * ox] : r0[2 * ox + 1];
                    uint8_t b = r1[2 * ox] > r1[2 * ox + 1] ? r1[2 * ox] : r1[2 * ox + 1];
                    dst[oy * WO + ox] = a > b ? a : b;
                }
                continue;
            }
            for (int ox = 0; ox < WO; ++ox) {
                uint8_t m = 0;
                for (int ky = 0; ky < KH; ++ky)
                    for (int kx = 0; kx < KW; ++kx) {
                        const uint8_t v = src[((int64_t)oy * SH + ky * DH) * W + (int64_t)ox * SW + kx * DW];
                        m = v > m ? v : m;
                    }
                dst[oy * WO + ox] = m;
            }
        }
    }
}

QC_EXPORT int qc_layer_${CNAME}(const uint8_t* x, void* y, int64_t batch) {
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    if (qc_select_path() < 0) return QC_ERR_PATH;
    ${CNAME}_ctx cx = {x, (uint8_t*)y, batch * ${C}};
    const int64_t ntasks = (cx.planes + ${CNAME}_PLANES_PER_TASK - 1) / ${CNAME}_PLANES_PER_TASK;
    qc_parallel(batch * ${C} * ${H} * ${W} > (1 << 18) ? qc_num_threads() : 1, ntasks, ${CNAME}_task, &cx);
    return QC_OK;
}

