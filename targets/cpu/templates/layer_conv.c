/* ---- layer ${LAYER} (${CNAME}): BitConv, x uint8 NCHW [batch, ${C}, ${H}, ${W}] -> y ${OUT_CTYPE}
 *      [batch, ${N}, ${HO}, ${WO}]; kernel ${KH}x${KW}, strides (${SH}, ${SW}), pads (${PT}, ${PL}, ${PB}, ${PR}),
 *      dilations (${DH}, ${DW}), group ${G}; bits_a=${KA} bits_w=${KB} mode=${MODE} epilogue=${EPI}.
 * 1. every input pixel's channels (per group) are packed into planes of ${CGW} word(s) (NHWC, bits along C);
 * 2. per group, an im2col of packed bits: output pixel (oy, ox) gets its receptive field in tap-major order, tap t
 *    at bit t*Cg (zero for padded taps; mode QC_XORM also writes a plane of valid-tap bits);
 * 3. the rows run through the same bit GEMM as BitGemm, written straight into NCHW. ---- */
__asm__(".section .rodata\n.balign 64\nqc_blob_${CNAME}:\n.incbin \"${BLOB}\"\n.previous\n");
extern const uint8_t qc_blob_${CNAME}[] __attribute__((visibility("hidden")));

QC_EXPORT int qc_layer_${CNAME}(const uint8_t* x, void* y, int64_t batch) {
    enum { C = ${C}, H = ${H}, W = ${W}, N = ${N}, G = ${G}, CG = ${CG}, NG = ${NG}, KH = ${KH}, KW = ${KW},
           SH = ${SH}, SW = ${SW}, PT = ${PT}, PL = ${PL}, DH = ${DH}, DW = ${DW}, HO = ${HO}, WO = ${WO},
           KA = ${KA}, KB = ${KB}, KWP = ${KWP}, CGW = ${CGW}, APL = ${A_PLANES}, L = ${L}, MODE = ${MODE} };
    const int64_t HW = (int64_t)H * W, P = (int64_t)HO * WO, KTAP = (int64_t)KH * KW * CG;
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
    const qc_pack_fn pack = qc_packer(path);
    const int nt = qc_num_threads();
    const int64_t pix_words = HW * G * KA * CGW, col_words = P * APL * KWP;
    int64_t chunk = ((int64_t)48 << 20) / ((pix_words + col_words) * 8 + (HW * G + P) * 4);
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    uint64_t* pix = (uint64_t*)qc_alloc((size_t)(chunk * pix_words) * 8);
    int32_t* pixsum = (int32_t*)qc_alloc((size_t)(chunk * HW * G) * 4);
    uint64_t* cols = (uint64_t*)qc_alloc((size_t)(chunk * col_words) * 8);
    int32_t* rowsum = (int32_t*)qc_alloc((size_t)(chunk * P) * 4);
    if (!pix || !pixsum || !cols || !rowsum) { free(pix); free(pixsum); free(cols); free(rowsum); return QC_ERR_NOMEM; }
    qc_job j;
    memset(&j, 0, sizeof j);
    j.ka = KA; j.kb = KB; j.mode = MODE; j.kwp = KWP; j.kw = ${KWORDS}; j.a_stride = (int64_t)APL * KWP;
    j.A = cols; j.rowsum = rowsum; j.N = NG; j.epi = ${EPI}; j.L = L;
    j.y = y; j.P = P; j.n_total = N; j.nthreads = nt;
    const uint64_t* wts = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_W});
    const int32_t* wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2});
    const float* mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    const float* bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    const int32_t* thr = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THR});
    int err = QC_OK;
    for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        /* 1. pixels: NCHW codes -> per-pixel channel planes + per-pixel code sums */
#pragma omp parallel num_threads(nt) if (bc * HW * C > 32768)
        {
            uint8_t* line = (uint8_t*)malloc((size_t)W * C + 64);
            if (!line) {
#pragma omp atomic write
                err = QC_ERR_NOMEM;
            }
#pragma omp for collapse(2) schedule(static)
            for (int64_t b = 0; b < bc; ++b)
                for (int64_t yy = 0; yy < H; ++yy) {
                    if (!line) continue;
                    const uint8_t* src = x + (b0 + b) * C * HW + yy * W;
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t xx = 0; xx < W; ++xx) line[xx * C + c] = src[c * HW + xx];
                    for (int64_t xx = 0; xx < W; ++xx)
                        for (int64_t g = 0; g < G; ++g) {
                            const int64_t px = ((b * H + yy) * W + xx) * G + g;
                            pixsum[px] = (int32_t)pack(line + xx * C + g * CG, CG, KA, pix + px * KA * CGW, CGW);
                        }
                }
            free(line);
        }
        if (err) break;
        for (int64_t g = 0; g < G; ++g) {
            /* 2. im2col of packed bits for group g */
#pragma omp parallel for schedule(static) num_threads(nt) if (bc * P * KTAP > 65536)
            for (int64_t r = 0; r < bc * P; ++r) {
                const int64_t b = r / P, p = r - b * P, oy = p / WO, ox = p - oy * WO;
                uint64_t* dst = cols + r * j.a_stride;
                memset(dst, 0, (size_t)j.a_stride * 8);
                int64_t s = 0;
                for (int64_t ky = 0; ky < KH; ++ky) {
                    const int64_t iy = oy * SH - PT + ky * DH;
                    if (iy < 0 || iy >= H) continue;
                    for (int64_t kx = 0; kx < KW; ++kx) {
                        const int64_t ix = ox * SW - PL + kx * DW;
                        if (ix < 0 || ix >= W) continue;
                        const int64_t t = ky * KW + kx, px = ((b * H + iy) * W + ix) * G + g;
                        const uint64_t* src = pix + px * KA * CGW;
                        for (int i = 0; i < KA; ++i) qc_or_bits(dst + i * KWP, t * CG, src + i * CGW, CG);
                        if (MODE == QC_XORM) { qc_set_bits(dst + KWP, t * CG, CG); s += CG; }
                        else s += pixsum[px];
                    }
                }
                rowsum[r] = (int32_t)(MODE == QC_XOR ? KTAP : s);
            }
            /* 3. bit GEMM of the rows with group g's weight rows, into NCHW */
            j.M = bc * P; j.row0 = b0 * P; j.n0 = g * NG;
            j.W = wts + g * NG * (int64_t)KB * KWP;
            j.wz2 = wz2 + g * NG; j.mult = mult + g * NG; j.bias = bias + g * NG; j.thr = thr + g * NG * L;
            qc_run_job(path, &j);
        }
    }
    free(pix); free(pixsum); free(cols); free(rowsum);
    return err;
}

