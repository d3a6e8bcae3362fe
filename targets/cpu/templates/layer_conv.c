/* ---- layer ${LAYER} (${CNAME}): BitConv, x uint8 NCHW [batch, ${C}, ${H}, ${W}] -> y ${OUT_CTYPE}
 *      [batch, ${N}, ${HO}, ${WO}]; kernel ${KH}x${KW}, strides (${SH}, ${SW}), pads (${PT}, ${PL}, ${PB}, ${PR}),
 *      dilations (${DH}, ${DW}), group ${G}; bits_a=${KA} bits_w=${KB} mode=${MODE} epilogue=${EPI}.
 * 1. every input pixel's channels (per group) are packed into planes of ${CGW} word(s) (NHWC, bits along C);
 * 2. per group, an im2col of packed bits: output pixel (oy, ox) gets its receptive field in tap-major order, tap t
 *    at bit t*Cg (zero for padded taps; mode QC_XORM also writes a plane of valid-tap bits);
 * 3. the rows run through the same bit GEMM as BitGemm, written straight into NCHW. ---- */
__asm__(".section .rodata\n.balign 64\nqc_blob_${CNAME}:\n.incbin \"${BLOB}\"\n.previous\n");
extern const uint8_t qc_blob_${CNAME}[] __attribute__((visibility("hidden")));

enum { ${CNAME}_C = ${C}, ${CNAME}_H = ${H}, ${CNAME}_W = ${W}, ${CNAME}_N = ${N}, ${CNAME}_G = ${G},
       ${CNAME}_CG = ${CG}, ${CNAME}_NG = ${NG}, ${CNAME}_KH = ${KH}, ${CNAME}_KW = ${KW}, ${CNAME}_SH = ${SH},
       ${CNAME}_SW = ${SW}, ${CNAME}_PT = ${PT}, ${CNAME}_PL = ${PL}, ${CNAME}_DH = ${DH}, ${CNAME}_DW = ${DW},
       ${CNAME}_HO = ${HO}, ${CNAME}_WO = ${WO}, ${CNAME}_KA = ${KA}, ${CNAME}_KB = ${KB}, ${CNAME}_KWP = ${KWP},
       ${CNAME}_CGW = ${CGW}, ${CNAME}_APL = ${A_PLANES}, ${CNAME}_L = ${L}, ${CNAME}_MODE = ${MODE} };

typedef struct {
    const uint8_t* x;   /* this chunk's first image */
    qc_pack_fn pack;
    uint64_t* pix;      /* [b][y][x][g][KA][CGW] */
    int32_t* pixsum;    /* [b][y][x][g] */
    uint64_t* cols;     /* [b*P + p][APL][KWP] */
    int32_t* rowsum;
    int64_t g, rows;
    _Atomic int err;
} ${CNAME}_ctx;

/* stage 1, one task per (image, input row): NCHW codes -> per-pixel channel planes + per-pixel code sums */
static void ${CNAME}_pix_task(const void* vctx, int64_t t) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, G = ${CNAME}_G, CG = ${CNAME}_CG, KA = ${CNAME}_KA,
           CGW = ${CNAME}_CGW };
    ${CNAME}_ctx* cx = (${CNAME}_ctx*)vctx;
    const int64_t HW = (int64_t)H * W, b = t / H, yy = t - b * H;
    uint8_t* line = (uint8_t*)malloc((size_t)W * C + 64);
    if (!line) { atomic_store(&cx->err, QC_ERR_NOMEM); return; }
    const uint8_t* src = cx->x + b * C * HW + yy * W;
    for (int64_t c = 0; c < C; ++c)
        for (int64_t xx = 0; xx < W; ++xx) line[xx * C + c] = src[c * HW + xx];
    for (int64_t xx = 0; xx < W; ++xx)
        for (int64_t g = 0; g < G; ++g) {
            const int64_t px = ((b * H + yy) * W + xx) * G + g;
            cx->pixsum[px] = (int32_t)cx->pack(line + xx * C + g * CG, CG, KA, cx->pix + px * KA * CGW, CGW);
        }
    free(line);
}

/* stage 2, 64 output pixels per task: the im2col of packed bits for group g (tap t at bit t*Cg) */
static void ${CNAME}_col_task(const void* vctx, int64_t t) {
    enum { H = ${CNAME}_H, W = ${CNAME}_W, G = ${CNAME}_G, CG = ${CNAME}_CG, KH = ${CNAME}_KH, KW = ${CNAME}_KW,
           SH = ${CNAME}_SH, SW = ${CNAME}_SW, PT = ${CNAME}_PT, PL = ${CNAME}_PL, DH = ${CNAME}_DH,
           DW = ${CNAME}_DW, WO = ${CNAME}_WO, KA = ${CNAME}_KA, KWP = ${CNAME}_KWP, CGW = ${CNAME}_CGW,
           APL = ${CNAME}_APL, MODE = ${CNAME}_MODE };
    ${CNAME}_ctx* cx = (${CNAME}_ctx*)vctx;
    const int64_t P = (int64_t)${CNAME}_HO * WO, KTAP = (int64_t)KH * KW * CG, g = cx->g;
    const int64_t r1 = (t + 1) * 64 < cx->rows ? (t + 1) * 64 : cx->rows;
    for (int64_t r = t * 64; r < r1; ++r) {
        const int64_t b = r / P, p = r - b * P, oy = p / WO, ox = p - oy * WO;
        uint64_t* dst = cx->cols + r * APL * KWP;
        memset(dst, 0, (size_t)APL * KWP * 8);
        int64_t s = 0;
        for (int64_t ky = 0; ky < KH; ++ky) {
            const int64_t iy = oy * SH - PT + ky * DH;
            if (iy < 0 || iy >= H) continue;
            for (int64_t kx = 0; kx < KW; ++kx) {
                const int64_t ix = ox * SW - PL + kx * DW;
                if (ix < 0 || ix >= W) continue;
                const int64_t tap = ky * KW + kx, px = ((b * H + iy) * W + ix) * G + g;
                const uint64_t* src = cx->pix + px * KA * CGW;
                for (int i = 0; i < KA; ++i) qc_or_bits(dst + i * KWP, tap * CG, src + i * CGW, CG);
                if (MODE == QC_XORM) { qc_set_bits(dst + KWP, tap * CG, CG); s += CG; }
                else s += cx->pixsum[px];
            }
        }
        cx->rowsum[r] = (int32_t)(MODE == QC_XOR ? KTAP : s);
    }
}

${DIRECT_CODE}${EXPORT}(const uint8_t* x, void* y, int64_t batch) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, N = ${CNAME}_N, G = ${CNAME}_G, NG = ${CNAME}_NG,
           KA = ${CNAME}_KA, KB = ${CNAME}_KB, KWP = ${CNAME}_KWP, CGW = ${CNAME}_CGW, APL = ${CNAME}_APL,
           L = ${CNAME}_L, MODE = ${CNAME}_MODE };
    const int64_t HW = (int64_t)H * W, P = (int64_t)${CNAME}_HO * ${CNAME}_WO;
    const int64_t KTAP = (int64_t)${CNAME}_KH * ${CNAME}_KW * ${CNAME}_CG;
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
${DIRECT_CALL}    const int nt = qc_num_threads();
    const int64_t pix_words = HW * G * KA * CGW, col_words = P * APL * KWP;
    int64_t chunk = ((int64_t)48 << 20) / ((pix_words + col_words) * 8 + (HW * G + P) * 4);
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    ${CNAME}_ctx cx;
    memset(&cx, 0, sizeof cx);
    cx.pack = qc_packer(path);
    cx.pix = (uint64_t*)qc_alloc((size_t)(chunk * pix_words) * 8);
    cx.pixsum = (int32_t*)qc_alloc((size_t)(chunk * HW * G) * 4);
    cx.cols = (uint64_t*)qc_alloc((size_t)(chunk * col_words) * 8);
    cx.rowsum = (int32_t*)qc_alloc((size_t)(chunk * P) * 4);
    if (!cx.pix || !cx.pixsum || !cx.cols || !cx.rowsum) {
        free(cx.pix); free(cx.pixsum); free(cx.cols); free(cx.rowsum);
        return QC_ERR_NOMEM;
    }
    qc_job j;
    memset(&j, 0, sizeof j);
    j.ka = KA; j.kb = KB; j.mode = MODE; j.kwp = KWP; j.kw = ${KWORDS}; j.a_stride = (int64_t)APL * KWP;
    j.A = cx.cols; j.rowsum = cx.rowsum; j.N = NG; j.epi = ${EPI}; j.L = L;
    j.y = y; j.P = P; j.n_total = N; j.nthreads = nt;
    const uint64_t* wts = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_W});
    const int32_t* wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2});
    const float* mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    const float* bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    const int32_t* thr = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THR});
    for (int64_t b0 = 0; b0 < batch && !cx.err; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        cx.x = x + b0 * C * HW;
        qc_parallel(bc * HW * C > 32768 ? nt : 1, bc * H, ${CNAME}_pix_task, &cx);
        if (cx.err) break;
        for (int64_t g = 0; g < G; ++g) {
            cx.g = g;
            cx.rows = bc * P;
            qc_parallel(bc * P * KTAP > 65536 ? nt : 1, (bc * P + 63) / 64, ${CNAME}_col_task, &cx);
            /* stage 3: the bit GEMM of the rows with group g's weight rows, written into NCHW */
            j.M = bc * P; j.row0 = b0 * P; j.n0 = g * NG;
            j.W = wts + g * NG * (int64_t)KB * KWP;
            j.wz2 = wz2 + g * NG; j.mult = mult + g * NG; j.bias = bias + g * NG; j.thr = thr + g * NG * L;
            qc_run_job(path, &j);
        }
    }
    free(cx.pix); free(cx.pixsum); free(cx.cols); free(cx.rowsum);
    return cx.err;
}

