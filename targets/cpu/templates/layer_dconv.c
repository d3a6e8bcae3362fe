/* ---- layer ${LAYER} (${CNAME}): direct BitConv over packed pixels (QC_PER_LAYER: the AVX2 and AVX-512 paths on
 *      x86, the portable path elsewhere; the other paths keep the im2col above). No im2col: every input pixel's channels are packed once into 32-bit units of bits
 *      (channels padded to CP = ${CP}), laid out [image][plane][Hp][Wp][CU] with a zero border of the pads, so the
 *      KW taps of one kernel row are ${RW} consecutive (unaligned) 64-bit words: "segment" (ky, plane) of output
 *      pixel (oy, ox) starts at pixel (oy*SH + ky*DH, ox*SW). Weights: [N][KH][KB][RW] words, bit kx*CP + c of a
 *      segment = channel c of tap (ky, kx); the tail past KW*CP bits (and the padded channels) is zero, and the
 *      XOR modes mask it. Register tile: ${DMR} output pixels (consecutive ox) x ${DNR} channels, scalar popcount
 *      (hardware POPCNT on x86). One task per (image, output row). ---- */
enum { ${CNAME}_CP = ${CP}, ${CNAME}_CU = ${CU}, ${CNAME}_HP = ${HP}, ${CNAME}_WP = ${WP}, ${CNAME}_RW = ${RW},
       ${CNAME}_DPL = ${DPL} };

typedef struct {
    const uint8_t* x;      /* this chunk's first image (NCHW codes) */
    uint32_t* pix;         /* [b][DPL][HP][WP][CU] */
    int32_t* psum;         /* [b][HP][WP] code sums (0 on the border) */
    uint8_t* y;            /* this chunk's first output image */
    int path;
    int64_t pix_rows, out_rows;  /* rows per task of stage 1 / stage 2 (whole images when the batch allows) */
    _Atomic int err;
} ${CNAME}_dctx;

/* stage 1, input row t = (image, row): NCHW codes -> packed pixels of the padded image */
static void ${CNAME}_dpix_row(const void* vctx, int64_t t) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, KA = ${CNAME}_KA, CP = ${CNAME}_CP, CU = ${CNAME}_CU,
           HP = ${CNAME}_HP, WP = ${CNAME}_WP, DPL = ${CNAME}_DPL, PT = ${CNAME}_PT, PL = ${CNAME}_PL,
           MODE = ${CNAME}_MODE };
    const ${CNAME}_dctx* cx = (const ${CNAME}_dctx*)vctx;
    const int64_t HW = (int64_t)H * W, b = t / H, yy = t - b * H, plane = (int64_t)HP * WP * CU;
    uint8_t stack_line[W * CP <= 16384 ? W * CP : 1] __attribute__((aligned(32)));
    uint8_t* line = W * CP <= 16384 ? stack_line : (uint8_t*)malloc((size_t)W * CP);
    if (!line) { atomic_store(&((${CNAME}_dctx*)vctx)->err, QC_ERR_NOMEM); return; }
    const uint8_t* src = cx->x + b * C * HW + yy * W;
    if (CP != C) memset(line, 0, (size_t)W * CP);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t xx = 0; xx < W; ++xx) line[xx * CP + c] = src[c * HW + xx];
    uint32_t* row = cx->pix + b * DPL * plane + ((int64_t)(yy + PT) * WP + PL) * CU;
    int32_t* srow = cx->psum + b * (int64_t)HP * WP + (int64_t)(yy + PT) * WP + PL;
    for (int64_t xx = 0; xx < W; ++xx) {
        srow[xx] = (int32_t)qc_pack_u32(cx->path, line + xx * CP, CP, KA, row + xx * CU, plane);
        if (MODE == QC_XORM)
            for (int u = 0; u < CU; ++u)
                row[plane + xx * CU + u] = C - 32 * u >= 32 ? 0xFFFFFFFFu : (uint32_t)((1ULL << (C - 32 * u)) - 1);
    }
    if (W * CP > 16384) free(line);
}

/* the register tile: mr output pixels (stride SW*CU units apart from a) x nr channels (KH*KB*RW words apart from
 * w); mr, nr are constants after inlining. Plane pairs (i, j) by descending s = i + j, the counters doubled between
 * (Horner), so only the tile's counters are live: no second set per pair to spill. */
QC_INLINE void ${CNAME}_mk(const uint32_t* a, const uint64_t* w, const int mr, const int nr, uint64_t tail,
                           uint64_t acc[${DMR}][${DNR}]) {
    enum { KA = ${CNAME}_KA, KB = ${CNAME}_KB, CU = ${CNAME}_CU, HP = ${CNAME}_HP, WP = ${CNAME}_WP,
           RW = ${CNAME}_RW, KH = ${CNAME}_KH, SW = ${CNAME}_SW, DH = ${CNAME}_DH, MODE = ${CNAME}_MODE,
           APL_ = MODE == QC_AND ? KA : 1, BPL = MODE == QC_AND ? KB : 1 };
    const int64_t plane = (int64_t)HP * WP * CU, wn = (int64_t)KH * KB * RW;
    for (int r = 0; r < mr; ++r)
        for (int c = 0; c < nr; ++c) acc[r][c] = 0;
#pragma GCC unroll 1
    for (int s = APL_ + BPL - 2; s >= 0; --s) {
        for (int r = 0; r < mr; ++r)
            for (int c = 0; c < nr; ++c) acc[r][c] <<= 1;  /* a no-op on zeros for the first s */
#pragma GCC unroll 1
        for (int i = qc_pair_lo(s, BPL); i <= qc_pair_hi(s, APL_); ++i) {
            const int j = s - i;
            const uint32_t* ap = a + (int64_t)i * plane;
            const uint64_t* wp = w + (int64_t)j * RW;
#pragma GCC unroll 1
            for (int ky = 0; ky < KH; ++ky, ap += (int64_t)DH * WP * CU, wp += (int64_t)KB * RW) {
#pragma GCC unroll 8
                for (int k = 0; k < RW; ++k) {
                    uint64_t wv[${DNR}];
                    for (int c = 0; c < nr; ++c) wv[c] = wp[c * wn + k];
                    for (int r = 0; r < mr; ++r) {
                        uint64_t av, mv = ~0ULL;
                        memcpy(&av, ap + r * SW * CU + 2 * k, 8);
                        if (MODE == QC_XORM) memcpy(&mv, ap + plane + r * SW * CU + 2 * k, 8);
                        if (MODE != QC_AND && k == RW - 1) mv &= tail;
                        for (int c = 0; c < nr; ++c)
                            acc[r][c] += (uint64_t)__builtin_popcountll(MODE == QC_AND ? av & wv[c]
                                                                                       : (av ^ wv[c]) & mv);
                    }
                }
            }
        }
    }
}

#if defined(QC_X86)
#include <immintrin.h>
/* threshold epilogue of a full 4-pixel tile, the 4 pixels in the lanes of one SSE vector (AVX2 path):
 * code = #{j : acc >= T[n, j]} = L + sum_j (T[n, j] > acc ? -1 : 0), 32-bit wrap-around like the scalar int32 cast */
__attribute__((target("avx2,popcnt"))) static inline void ${CNAME}_thr4(const uint64_t acc[4][${DNR}], int nc,
                                                                      const int32_t rowsum[4], int64_t n0,
                                                                      uint8_t* yo, int64_t P, const int32_t* wz2,
                                                                      const int32_t* thr) {
    enum { L = ${CNAME}_L, MODE = ${CNAME}_MODE };
    const __m128i rs = _mm_loadu_si128((const __m128i*)rowsum);
    for (int c = 0; c < nc; ++c) {
        const int64_t n = n0 + c;
        const __m128i s = _mm_setr_epi32((int)acc[0][c], (int)acc[1][c], (int)acc[2][c], (int)acc[3][c]);
        const __m128i a = MODE == QC_AND ? _mm_sub_epi32(_mm_add_epi32(s, s), _mm_mullo_epi32(rs, _mm_set1_epi32(wz2[n])))
                                         : _mm_sub_epi32(rs, _mm_add_epi32(s, s));
        const int32_t* tq = thr + n * L;
        __m128i q = _mm_set1_epi32(L);
        for (int j = 0; j < L; ++j) q = _mm_add_epi32(q, _mm_cmpgt_epi32(_mm_set1_epi32(tq[j]), a));
        q = _mm_packus_epi16(_mm_packus_epi32(q, q), q);
        const int32_t out = _mm_cvtsi128_si32(q);
        memcpy(yo + n * P, &out, 4);
    }
}
#endif

/* stage 2: output row (image b, oy) of every channel */
QC_INLINE void ${CNAME}_drow(const ${CNAME}_dctx* cx, int64_t t, const int use_simd) {
    enum { C = ${CNAME}_C, N = ${CNAME}_N, KB = ${CNAME}_KB, CU = ${CNAME}_CU, HP = ${CNAME}_HP,
           WP = ${CNAME}_WP, RW = ${CNAME}_RW, DPL = ${CNAME}_DPL, KH = ${CNAME}_KH, KW = ${CNAME}_KW,
           SH = ${CNAME}_SH, SW = ${CNAME}_SW, DH = ${CNAME}_DH, HO = ${CNAME}_HO, WO = ${CNAME}_WO, L = ${CNAME}_L,
           MODE = ${CNAME}_MODE, MR = ${DMR}, NR = ${DNR}, TAIL = KW * ${CNAME}_CP - 64 * (RW - 1) };
    const int64_t b = t / HO, oy = t - b * HO, plane = (int64_t)HP * WP * CU, P = (int64_t)HO * WO;
    const uint32_t* img = cx->pix + b * DPL * plane;
    const int32_t* ps = cx->psum + b * (int64_t)HP * WP;
    const uint64_t* wts = (const uint64_t*)(qc_blob_${CNAME} + ${OFF_WD});
    const int32_t* wz2 = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2});
    const int32_t* thr = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THR});
    const float* mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    const float* bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    const uint64_t tail = TAIL >= 64 ? ~0ULL : (1ULL << (TAIL & 63)) - 1;
    ${OUT_CTYPE_C}* yb = (${OUT_CTYPE_C}*)cx->y + b * (int64_t)N * P + oy * WO;
    for (int64_t ox0 = 0; ox0 < WO; ox0 += MR) {
        const int mr = WO - ox0 < MR ? (int)(WO - ox0) : MR;
        int32_t rowsum[MR];
        for (int r = 0; r < mr; ++r) {
            const int64_t ox = ox0 + r;
            int32_t s = 0;
            if (MODE != QC_XOR)
                for (int ky = 0; ky < KH; ++ky)
                    for (int kx = 0; kx < KW; ++kx) {
                        const int64_t q = (oy * SH + ky * DH) * WP + ox * SW + kx;
                        /* AND: the codes' sum; XORM: C per tap inside the image (its mask unit 0 is non-zero) */
                        s += MODE == QC_AND ? ps[q] : (img[plane + q * CU] ? C : 0);
                    }
            rowsum[r] = MODE == QC_XOR ? KH * KW * C : s;
        }
        const uint32_t* a = img + ((oy * SH) * WP + ox0 * SW) * CU;
        for (int64_t n0 = 0; n0 < N; n0 += NR) {
            const int nc = N - n0 < NR ? (int)(N - n0) : NR;
            const uint64_t* w = wts + n0 * (int64_t)KH * KB * RW;
            uint64_t acc[MR][NR];
            if (mr == MR && nc == NR) ${CNAME}_mk(a, w, MR, NR, tail, acc);
            else if (nc == NR) for (int r = 0; r < mr; ++r) ${CNAME}_mk(a + r * SW * CU, w, 1, NR, tail, (uint64_t (*)[NR])acc[r]);
            else for (int r = 0; r < mr; ++r)
                for (int c = 0; c < nc; ++c) {
                    uint64_t one[MR][NR];
                    ${CNAME}_mk(a + r * SW * CU, w + c * (int64_t)KH * KB * RW, 1, 1, tail, one);
                    acc[r][c] = one[0][0];
                }
#if defined(QC_X86)
            if (${THR_SIMD} && use_simd && MR == 4 && mr == MR) {
                ${CNAME}_thr4((const uint64_t (*)[${DNR}])acc, nc, rowsum, n0, (uint8_t*)yb + ox0, P, wz2, thr);
                continue;
            }
#endif
            for (int c = 0; c < nc; ++c) {
                const int64_t n = n0 + c;
                ${OUT_CTYPE_C}* yo = yb + n * P + ox0;
                for (int r = 0; r < mr; ++r) {
                    const int64_t s = (int64_t)acc[r][c];
                    const int32_t a = (int32_t)(MODE == QC_AND ? 2 * s - (int64_t)wz2[n] * rowsum[r]
                                                               : (int64_t)rowsum[r] - 2 * s);
                    ${STORE}
                }
            }
        }
    }
}

/* A task is a block of rows of one image. Blocks are whole images whenever the batch gives every thread several:
 * threads writing neighbouring output rows of one image share cache lines in every channel plane (a 28-byte row
 * of a 28x28 map), and that false sharing made two threads slower than one. */
static void ${CNAME}_dpix_task(const void* vctx, int64_t t) {
    const ${CNAME}_dctx* cx = (const ${CNAME}_dctx*)vctx;
    int64_t b, r0, r1;
    qc_row_block(t, ${CNAME}_H, cx->pix_rows, &b, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) ${CNAME}_dpix_row(vctx, b * ${CNAME}_H + r);
}

#if !defined(QC_X86)
static void ${CNAME}_drow_generic(const void* vctx, int64_t t) {
    const ${CNAME}_dctx* cx = (const ${CNAME}_dctx*)vctx;
    int64_t b, r0, r1;
    qc_row_block(t, ${CNAME}_HO, cx->out_rows, &b, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) ${CNAME}_drow(cx, b * ${CNAME}_HO + r, 0);
}
#else
__attribute__((target("avx2,popcnt"))) static void ${CNAME}_drow_popcnt(const void* vctx, int64_t t) {
    const ${CNAME}_dctx* cx = (const ${CNAME}_dctx*)vctx;
    int64_t b, r0, r1;
    qc_row_block(t, ${CNAME}_HO, cx->out_rows, &b, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) ${CNAME}_drow(cx, b * ${CNAME}_HO + r, 1);
}
#endif

/* rows per task: all `rows` of an image when the batch alone gives each thread 4 tasks, else fewer */
static int64_t ${CNAME}_rows_per_task(int64_t rows, int64_t batch, int nt) {
    const int64_t want = 4 * (int64_t)nt;
    if (batch >= want) return rows;
    const int64_t split = (want + batch - 1) / batch;
    return rows / split > 0 ? (rows + split - 1) / split : 1;
}

__attribute__((unused)) static int ${CNAME}_direct(const uint8_t* x, void* y, int64_t batch, int path) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, N = ${CNAME}_N, CU = ${CNAME}_CU, HP = ${CNAME}_HP,
           WP = ${CNAME}_WP, DPL = ${CNAME}_DPL, KTAP = ${CNAME}_KH * ${CNAME}_KW * ${CNAME}_C };
    const int64_t HW = (int64_t)H * W, P = (int64_t)${CNAME}_HO * ${CNAME}_WO;
    const int64_t img_words = (int64_t)DPL * HP * WP * CU;  /* uint32 units per image */
    const int nt = qc_num_threads();
    int64_t chunk = ((int64_t)16 << 20) / (img_words * 4 + (int64_t)HP * WP * 4);
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    ${CNAME}_dctx cx;
    memset(&cx, 0, sizeof cx);
    cx.path = path;
    /* zeroed once: the border (padding) and padded channels stay 0; +64 bytes: a segment's last word may read
     * one unit past the image */
    cx.pix = (uint32_t*)qc_alloc((size_t)(chunk * img_words) * 4 + 64);
    cx.psum = (int32_t*)qc_alloc((size_t)(chunk * HP * WP) * 4);
    if (!cx.pix || !cx.psum) { free(cx.pix); free(cx.psum); return QC_ERR_NOMEM; }
#if defined(QC_X86)
    const qc_task_fn row_fn = ${CNAME}_drow_popcnt;  /* the AVX2 and AVX-512 paths (QC_PER_LAYER) */
#else
    const qc_task_fn row_fn = ${CNAME}_drow_generic;
#endif
    for (int64_t b0 = 0; b0 < batch && !cx.err; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        cx.x = x + b0 * C * HW;
        cx.y = (uint8_t*)y + b0 * (int64_t)N * P * (int64_t)sizeof(${OUT_CTYPE_C});
        cx.pix_rows = ${CNAME}_rows_per_task(H, bc, nt);
        cx.out_rows = ${CNAME}_rows_per_task(${CNAME}_HO, bc, nt);
        qc_parallel(bc * HW * C > 32768 ? nt : 1, bc * ((H + cx.pix_rows - 1) / cx.pix_rows), ${CNAME}_dpix_task, &cx);
        if (cx.err) break;
        qc_parallel(bc * P * N * KTAP > (1 << 20) ? nt : 1, bc * ((${CNAME}_HO + cx.out_rows - 1) / cx.out_rows),
                    row_fn, &cx);
    }
    free(cx.pix); free(cx.psum);
    return cx.err;
}

