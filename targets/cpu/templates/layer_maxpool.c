/* ---- layer ${LAYER} (${CNAME}): MaxPoolCodes, uint8 codes NCHW [batch, ${C}, ${H}, ${W}] -> uint8
 *      [batch, ${C}, ${HO}, ${WO}]; window ${KH}x${KW}, strides (${SH}, ${SW}), dilations (${DH}, ${DW}), no pads.
 *      One task per block of channel planes; the 2x2 stride-2 window (the common one) has its own loop. ---- */
enum { ${CNAME}_PLANES_PER_TASK = ${PPT} };

typedef struct {
    const uint8_t* x;
    uint8_t* y;
    int64_t planes;
    const uint8_t* x_end;  /* one past the input: the vector loop never reads beyond it */
} ${CNAME}_ctx;

#if defined(__SSE2__)
/* 2x2 stride-2 window over 16 input bytes of rows r0, r1: 8 outputs (max of a byte pair = max of its 16-bit
 * lane's low and high byte; SSE2, so every x86-64 has it) */
static inline __m128i ${CNAME}_pool8(const uint8_t* r0, const uint8_t* r1) {
    const __m128i v = _mm_max_epu8(_mm_loadu_si128((const __m128i*)r0), _mm_loadu_si128((const __m128i*)r1));
    const __m128i m = _mm_max_epi16(_mm_and_si128(v, _mm_set1_epi16(0xFF)), _mm_srli_epi16(v, 8));
    return _mm_packus_epi16(m, m);
}
#endif

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
                int ox = 0;
#if defined(__SSE2__)
                uint8_t* d = dst + oy * WO;
                for (; ox + 8 <= WO; ox += 8) _mm_storel_epi64((__m128i*)(d + ox), ${CNAME}_pool8(r0 + 2 * ox, r1 + 2 * ox));
                if (ox < WO && r1 + 2 * ox + 16 <= cx->x_end) {  /* the row's tail: reads may run into the next row */
                    uint8_t tmp[16];
                    _mm_storel_epi64((__m128i*)tmp, ${CNAME}_pool8(r0 + 2 * ox, r1 + 2 * ox));
                    memcpy(d + ox, tmp, (size_t)(WO - ox));
                    ox = WO;
                }
#endif
                for (; ox < WO; ++ox) {
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

${EXPORT}(const uint8_t* x, void* y, int64_t batch) {
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    if (qc_select_path() < 0) return QC_ERR_PATH;
    ${CNAME}_ctx cx = {x, (uint8_t*)y, batch * ${C}, x + batch * (int64_t)${C} * ${H} * ${W}};
    const int64_t ntasks = (cx.planes + ${CNAME}_PLANES_PER_TASK - 1) / ${CNAME}_PLANES_PER_TASK;
    qc_parallel(batch * ${C} * ${H} * ${W} > (1 << 18) ? qc_num_threads() : 1, ntasks, ${CNAME}_task, &cx);
    return QC_OK;
}

