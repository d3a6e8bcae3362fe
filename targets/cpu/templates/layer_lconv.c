/* ---- layer ${LAYER} (${CNAME}): BitConv by lookup tables (x86 AVX2 path; codegen.lut_conv says when).
 * The weights are 1..${KB}-bit codes q, the activations codes p; S = sum q*p over the receptive field, and
 * acc = 2*S - wzero2[n]*rowsum as in every other kernel. Instead of popcounts, S is summed four channels at a time:
 *   stage 1: every input pixel gets one 16-byte table per group g of 4 channels, T[e] = sum_{i<4} bit_i(e) * p[4g+i]
 *            (all 16 subsets of the group's codes), laid out [image][HP][WP][G4][16] with a zero border (padding);
 *   stage 2: weight plane j of (channel n, tap, group g) is a 4-bit index e, and vpshufb looks up 32 channels'
 *            T[e] at once: 128 multiply-adds per instruction whatever the activation bits (a popcount covers 64
 *            per activation plane). Lookups add into bytes for ${LCH} steps (the largest count that cannot
 *            overflow a byte), then widen into 16-bit sums (S < 65536, checked by codegen).
 * Index bytes [NB][KH][KW*G4][KB][32]: byte p of a block holds channel (p&1)*16 + (p>>4)*8 + ((p&15)>>1), so the
 * even/odd byte split of the widening yields channels 0..15 and 16..31 in order. Register tile: ${LR} output
 * pixels (consecutive ox) x ${LV} block(s) of 32 channels (an odd last block alone); dw = 1, so a kernel row's KW*G4 tables are contiguous. Tasks: one image
 * (its tables, then its rows) when the batch gives every thread several, else blocks of rows per stage. ---- */
#if defined(QC_X86)
enum { ${CNAME}_G4 = ${G4}, ${CNAME}_NB = ${NB}, ${CNAME}_LR = ${LR}, ${CNAME}_LCH = ${LCH},
       ${CNAME}_RL = ${KW} * ${G4},
       /* the output's rows and columns (pooled with POOL = ${POOL}) and the conv columns computed */
       ${CNAME}_OHO = ${PHO}, ${CNAME}_OWO = ${PWO}, ${CNAME}_WC = ${POOL} ? ${PWO} * ${PKW} : ${CNAME}_WO,
       /* pooling with the 16-bit epilogue: the max of the 16-bit accs, then one threshold pass per pooled pixel */
       ${CNAME}_POOLACC = ${POOL} && ${ACC16} };

${LQTHR_DECL}
/* 8 input values (NCHW row) -> their codes in the low 8 bytes; floats: #{k : x >= T[k]} (NaN: 0) */
__attribute__((target("avx2"), always_inline)) static inline __m128i ${CNAME}_load8(const ${IN_T}* p) {
#if ${IN_FLOAT}
    const __m256 v = _mm256_loadu_ps((const float*)p);
    __m256i q = _mm256_setzero_si256();
    for (int k = 0; k < ${QL}; ++k)
        q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_set1_ps(${CNAME}_lqthr[k]), _CMP_GE_OQ)));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    return _mm_packus_epi16(w, w);
#else
    return _mm_loadl_epi64((const __m128i*)p);
#endif
}

static inline uint8_t ${CNAME}_code1(${IN_T} v) {
#if ${IN_FLOAT}
    int q = 0;
    for (int k = 0; k < ${QL}; ++k) q += v >= ${CNAME}_lqthr[k];
    return (uint8_t)q;
#else
    return v;
#endif
}

typedef struct {
    const ${IN_T}* x;      /* this chunk's first image (NCHW codes, or floats it quantizes: IN_FLOAT = ${IN_FLOAT}) */
    uint8_t* tab;          /* [b][HP][WP][G4][16] */
    int32_t* psum;         /* [b][HP][WP] code sums (0 on the border) */
    void* y;               /* this chunk's first output image */
    int64_t pix_rows, out_rows;
    _Atomic int err;
} ${CNAME}_lctx;

/* stage 1, input rows [y0, y1) of image b: NCHW codes -> tables + code sums of their pixels. Rows are consecutive in
 * an NCHW plane, so the channel interleave runs over chunks of whole rows at once (8 pixels per vector step: a
 * 7-pixel row alone would have none) */
__attribute__((target("avx2"))) static void ${CNAME}_ltab_rows(${CNAME}_lctx* cx, int64_t b, int64_t y0, int64_t y1) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, G4 = ${CNAME}_G4, HP = ${CNAME}_HP, WP = ${CNAME}_WP,
           PT = ${CNAME}_PT, PL = ${CNAME}_PL, CHUNK = 8192 / (G4 * W) > 0 ? 8192 / (G4 * W) : 1,
           LINE = G4 * W * CHUNK };
    /* line[g][i]: the 4 codes of group g at pixel i of the chunk as one 32-bit word (channels past C read as 0);
     * sum[i]: the pixel's code sum (< 65536: codegen bounds C * pmax) */
    uint32_t stack_line[LINE <= 8192 ? LINE : 1] __attribute__((aligned(32)));
    uint32_t* line = LINE <= 8192 ? stack_line : (uint32_t*)malloc((size_t)LINE * 4);
    if (!line) { atomic_store(&cx->err, QC_ERR_NOMEM); return; }
    uint16_t sum[W * CHUNK + 8] __attribute__((aligned(32)));
    const int64_t HW = (int64_t)H * W;
    const __m128i ones = _mm_set1_epi8(1);
    for (int64_t yc = y0; yc < y1; yc += CHUNK) {
        const int64_t n = (y1 - yc < CHUNK ? y1 - yc : CHUNK) * W;  /* pixels in this chunk */
        const ${IN_T}* src = cx->x + b * C * HW + yc * W;
        memset(sum, 0, sizeof sum);
        for (int g = 0; g < G4; ++g) {
            const ${IN_T}* rows[4];
            for (int i = 0; i < 4; ++i) rows[i] = 4 * g + i < C ? src + (4 * g + i) * HW : NULL;
            uint32_t* lg = line + g * n;
            int64_t i0 = 0;
            for (; i0 + 8 <= n; i0 += 8) {  /* 4 channel rows x 8 pixels -> 8 words: a byte/word interleave */
                __m128i r[4];
                for (int i = 0; i < 4; ++i)
                    r[i] = rows[i] ? ${CNAME}_load8(rows[i] + i0) : _mm_setzero_si128();
                const __m128i p01 = _mm_unpacklo_epi8(r[0], r[1]), p23 = _mm_unpacklo_epi8(r[2], r[3]);
                _mm_storeu_si128((__m128i*)(lg + i0), _mm_unpacklo_epi16(p01, p23));
                _mm_storeu_si128((__m128i*)(lg + i0 + 4), _mm_unpackhi_epi16(p01, p23));
                const __m128i s = _mm_add_epi16(_mm_maddubs_epi16(p01, ones), _mm_maddubs_epi16(p23, ones));
                _mm_storeu_si128((__m128i*)(sum + i0), _mm_add_epi16(_mm_loadu_si128((const __m128i*)(sum + i0)), s));
            }
            for (; i0 < n; ++i0) {
                uint32_t word = 0;
                for (int i = 0; i < 4; ++i)
                    if (rows[i]) {
                        const uint8_t v = ${CNAME}_code1(rows[i][i0]);
                        word |= (uint32_t)v << (8 * i);
                        sum[i0] += v;
                    }
                lg[i0] = word;
            }
        }
        for (int64_t i0 = 0; i0 < n; ++i0) {
            const int64_t yy = yc + i0 / W, xx = i0 % W, px = (b * HP + yy + PT) * WP + PL + xx;
            uint8_t* t = cx->tab + px * G4 * 16;
            cx->psum[px] = sum[i0];
            for (int g = 0; g < G4; g += 2) {
                const uint64_t codes = line[g * n + i0] | (g + 1 < G4 ? (uint64_t)line[(g + 1) * n + i0] << 32 : 0);
                const __m256i tt = qc_lut_tables2(codes);
                if (g + 1 < G4) _mm256_storeu_si256((__m256i*)(t + 16 * g), tt);
                else _mm_storeu_si128((__m128i*)(t + 16 * g), _mm256_castsi256_si128(tt));
            }
        }
    }
    if (LINE > 8192) free(line);
}

static void ${CNAME}_ltab_task(const void* vctx, int64_t t) {
    ${CNAME}_lctx* cx = (${CNAME}_lctx*)vctx;
    int64_t b, r0, r1;
    qc_row_block(t, ${CNAME}_H, cx->pix_rows, &b, &r0, &r1);
    ${CNAME}_ltab_rows(cx, b, r0, r1);
}

/* S of R output pixels (tables pix[r]) x v = 1 or 2 blocks of 32 channels from block nb, as 16-bit sums
 * (s16[r][block][0]: channels 0..15, [1]: 16..31); v is a constant after inlining. Two blocks share each table
 * load (codegen._lut_geometry says when that pays). */
__attribute__((target("avx2"), always_inline)) static inline void ${CNAME}_lmk(
        const uint8_t* const* pix, int64_t nb, const int v, __m256i s16[${LR}][2][2]) {
    enum { G4 = ${CNAME}_G4, WP = ${CNAME}_WP, KH = ${CNAME}_KH, DH = ${CNAME}_DH, KB = ${CNAME}_KB,
           R = ${CNAME}_LR, CH = ${CNAME}_LCH, RL = ${CNAME}_RL };
    const uint8_t* widx = qc_blob_${CNAME} + ${OFF_WL};
    for (int r = 0; r < R; ++r)
        for (int u = 0; u < v; ++u) s16[r][u][0] = s16[r][u][1] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int ky = 0; ky < KH; ++ky) {
        const uint8_t* ib[2];
        for (int u = 0; u < v; ++u) ib[u] = widx + ((nb + u) * KH + ky) * (int64_t)RL * KB * 32;
        const int64_t toff = (int64_t)ky * DH * WP * G4 * 16;
#pragma GCC unroll 1
        for (int j0 = 0; j0 < RL; j0 += CH) {
            __m256i s8[R][2];
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < v; ++u) s8[r][u] = _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int j = j0; j < j0 + CH; ++j) {
                __m256i iv[2][KB];
                for (int u = 0; u < v; ++u)
                    for (int q = 0; q < KB; ++q) iv[u][q] = _mm256_loadu_si256((const __m256i*)(ib[u] + (j * KB + q) * 32));
                for (int r = 0; r < R; ++r) {
                    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(pix[r] + toff + j * 16)));
                    for (int u = 0; u < v; ++u) s8[r][u] = _mm256_add_epi8(s8[r][u], qc_lut_lookup(t, iv[u], KB));
                }
            }
            for (int r = 0; r < R; ++r)
                for (int u = 0; u < v; ++u) qc_lut_widen(s8[r][u], s16[r][u]);
        }
    }
}

/* the threshold epilogue of a full tile in 16-bit lanes (codegen.lut_acc16: every acc fits strictly inside int16,
 * so the wrap-around arithmetic is exact and the int16-clamped thresholds compare the same): 16 channels per
 * vector, no widening to 32 bits; the tile's R codes of a channel go out as one word. On the bundled CNN's first
 * BitConv (K = 288) the 32-bit epilogue took a quarter of the layer's time. */
__attribute__((target("avx2"), always_inline)) static inline void ${CNAME}_lthr16(
        ${OUT_CTYPE_C}* yb, int64_t ox0, int64_t n0, const int32_t* rowsum, __m256i s16[${LR}][2][2], int u,
        uint8_t* rowc) {
    enum { N = ${CNAME}_N, NB = ${CNAME}_NB, L = ${CNAME}_L, R = ${CNAME}_LR, POOLACC = ${CNAME}_POOLACC };
    const int64_t P = (int64_t)${CNAME}_HO * ${CNAME}_WO;
    const int16_t* wz = (const int16_t*)(qc_blob_${CNAME} + ${OFF_WZ2P16}) + n0;
    const int16_t* th = (const int16_t*)(qc_blob_${CNAME} + ${OFF_THRT16}) + n0;
    const int nc = N - n0 < 32 ? (int)(N - n0) : 32;
    __m256i qh[2][4];
    for (int half = 0; half < 2; ++half) {  /* s16[r][u][half]: channels 16*half .. 16*half+15 in order */
        const __m256i z = _mm256_loadu_si256((const __m256i*)(wz + 16 * half));
        __m256i* q = qh[half];
        for (int r = 0; r < 4; ++r) q[r] = _mm256_setzero_si256();
        for (int r = 0; r < R; ++r) {
            const __m256i s = s16[r][u][half];
            const __m256i a = _mm256_sub_epi16(_mm256_add_epi16(s, s),
                                               _mm256_mullo_epi16(z, _mm256_set1_epi16((short)rowsum[r])));
            if (POOLACC) {  /* the pool takes the max of the accs first (the codes are monotone in acc) */
                _mm256_storeu_si256((__m256i*)((int16_t*)rowc + (ox0 + r) * (int64_t)NB * 32 + n0 + 16 * half), a);
                continue;
            }
            q[r] = qc_lut_thr16(a, th + 16 * half, (int64_t)NB * 32, L);
        }
    }
    if (POOLACC) return;
    if (${ROWBUF}) {  /* pixel r's 32 codes in channel order: the even/odd 128-bit quarters of the byte pack */
        for (int r = 0; r < R; ++r)
            _mm256_storeu_si256((__m256i*)(rowc + (ox0 + r) * (int64_t)NB * 32 + n0),
                                _mm256_permute4x64_epi64(_mm256_packus_epi16(qh[0][r], qh[1][r]), 0xD8));
        return;
    }
    uint32_t packed[32] __attribute__((aligned(32)));
    for (int half = 0; half < 2; ++half) {
        const __m256i* q = qh[half];
        /* channel c's codes of pixels 0..3 as one little-endian word (unpack works within 128-bit lanes) */
        const __m256i lo = _mm256_or_si256(q[0], _mm256_slli_epi16(q[1], 8));
        const __m256i hi = _mm256_or_si256(q[2], _mm256_slli_epi16(q[3], 8));
        const __m256i wa = _mm256_unpacklo_epi16(lo, hi), wb = _mm256_unpackhi_epi16(lo, hi);
        _mm256_store_si256((__m256i*)(packed + 16 * half), _mm256_permute2x128_si256(wa, wb, 0x20));
        _mm256_store_si256((__m256i*)(packed + 16 * half + 8), _mm256_permute2x128_si256(wa, wb, 0x31));
    }
    for (int c = 0; c < nc; ++c) memcpy((uint8_t*)(yb + (n0 + c) * P + ox0), packed + c, R);
}

/* the epilogue of mr pixels (from ox0 of output row yb) x the 32 channels from n0: acc = 2*S - wzero2*rowsum,
 * 8 channels per vector; a full tile's threshold codes of a channel go out in one R-byte store */
__attribute__((target("avx2"), always_inline)) static inline void ${CNAME}_lepi(
        ${OUT_CTYPE_C}* yb, int64_t ox0, int mr, int64_t n0, const int32_t* rowsum, __m256i s16[${LR}][2][2],
        int u, uint8_t* rowc) {
    enum { N = ${CNAME}_N, NB = ${CNAME}_NB, L = ${CNAME}_L, R = ${CNAME}_LR, EPI = ${EPI} };
    const int64_t P = (int64_t)${CNAME}_HO * ${CNAME}_WO;
    const int32_t* wz2p = (const int32_t*)(qc_blob_${CNAME} + ${OFF_WZ2P});
    const int32_t* thrt = (const int32_t*)(qc_blob_${CNAME} + ${OFF_THRT});
    const float* mult = (const float*)(qc_blob_${CNAME} + ${OFF_MULT});
    const float* bias = (const float*)(qc_blob_${CNAME} + ${OFF_BIAS});
    (void)thrt; (void)mult; (void)bias;
    if (${ACC16} && EPI == QC_EPI_THRESHOLD && (mr == R || ${ROWBUF})) {  /* a short tile's extra codes land in
                                                                            * rowc's spare rows */
        ${CNAME}_lthr16(yb, ox0, n0, rowsum, s16, u, rowc);
        return;
    }
    const int nc = N - n0 < 32 ? (int)(N - n0) : 32;
    int32_t acc[R][32] __attribute__((aligned(32)));
    for (int r = 0; r < mr; ++r)
        for (int h = 0; h < 4; ++h) {
            __m256i a = qc_lut_acc8(s16[r][u], h, wz2p + n0, rowsum[r]);
            if (EPI == QC_EPI_THRESHOLD) a = qc_lut_thr8(a, thrt + n0 + 8 * h, (int64_t)NB * 32, L);
            _mm256_store_si256((__m256i*)(acc[r] + 8 * h), a);
        }
    if (${ROWBUF}) {
        for (int r = 0; r < mr; ++r)
            for (int c = 0; c < 32; ++c) rowc[(ox0 + r) * (int64_t)NB * 32 + n0 + c] = (uint8_t)acc[r][c];
        return;
    }
    if (EPI == QC_EPI_THRESHOLD && mr == R) {  /* codes <= L <= 255: R of them fit one 32-bit word */
        uint32_t packed[32] __attribute__((aligned(32)));
        for (int h = 0; h < 4; ++h) {
            __m256i d = _mm256_load_si256((const __m256i*)(acc[0] + 8 * h));
            for (int r = 1; r < R; ++r)
                d = _mm256_or_si256(d, _mm256_slli_epi32(_mm256_load_si256((const __m256i*)(acc[r] + 8 * h)), 8 * r));
            _mm256_store_si256((__m256i*)(packed + 8 * h), d);
        }
        for (int c = 0; c < nc; ++c) memcpy((uint8_t*)(yb + (n0 + c) * P + ox0), packed + c, R);
        return;
    }
    for (int c = 0; c < nc; ++c) {
        const int64_t n = n0 + c;
        ${OUT_CTYPE_C}* yo = yb + n * P + ox0;
        for (int r = 0; r < mr; ++r) {
            const int32_t a = acc[r][c];
            ${LSTORE}
        }
    }
}

/* stage 2, conv row (b, oy) of every channel: blocks of 32 channels in pairs, an odd last one alone. With ROWBUF
 * the threshold codes of its first WC pixels go to `rowc` pixel-major (one vector store per pixel and 32 channels;
 * rows past WC take a short tile's extra pixels), else straight into the NCHW output. */
__attribute__((target("avx2"))) static void ${CNAME}_lrow(const ${CNAME}_lctx* cx, int64_t b, int64_t oy,
                                                          uint8_t* rowc) {
    enum { N = ${CNAME}_N, G4 = ${CNAME}_G4, NB = ${CNAME}_NB, HP = ${CNAME}_HP, WP = ${CNAME}_WP,
           KH = ${CNAME}_KH, KW = ${CNAME}_KW, SH = ${CNAME}_SH, SW = ${CNAME}_SW, DH = ${CNAME}_DH,
           HO = ${CNAME}_HO, WO = ${CNAME}_WO, R = ${CNAME}_LR, V = ${LV}, WC = ${CNAME}_WC };
    const int64_t P = (int64_t)HO * WO;
    const uint8_t* img = cx->tab + b * (int64_t)HP * WP * G4 * 16;
    const int32_t* ps = cx->psum + b * (int64_t)HP * WP;
    ${OUT_CTYPE_C}* yb = (${OUT_CTYPE_C}*)cx->y + b * (int64_t)N * P + oy * WO;  /* unused with ROWBUF */
    for (int64_t ox0 = 0; ox0 < WC; ox0 += R) {
        const int mr = WC - ox0 < R ? (int)(WC - ox0) : R;
        int32_t rowsum[R];
        const uint8_t* pix[R];  /* pixel r's first table row; a short tile repeats pixel 0 (results unused) */
        for (int r = 0; r < R; ++r) {
            const int64_t ox = ox0 + (r < mr ? r : 0);
            int32_t s = 0;
            for (int ky = 0; ky < KH; ++ky)
                for (int kx = 0; kx < KW; ++kx) s += ps[(oy * SH + ky * DH) * WP + ox * SW + kx];
            rowsum[r] = s;
            pix[r] = img + ((oy * SH) * WP + ox * SW) * (int64_t)G4 * 16;
        }
        __m256i s16[R][2][2];
        int64_t nb = 0;
        if (V == 2)
            for (; nb + 2 <= NB; nb += 2) {
                ${CNAME}_lmk(pix, nb, 2, s16);
                ${CNAME}_lepi(yb, ox0, mr, nb * 32, rowsum, s16, 0, rowc);
                ${CNAME}_lepi(yb, ox0, mr, nb * 32 + 32, rowsum, s16, 1, rowc);
            }
        for (; nb < NB; ++nb) {
            ${CNAME}_lmk(pix, nb, 1, s16);
            ${CNAME}_lepi(yb, ox0, mr, nb * 32, rowsum, s16, 0, rowc);
        }
    }
}

/* output row r of image b: one conv row, or with the folded pool (window = strides = PKH x PKW) the max of PKH
 * conv rows and of PKW neighbouring pixels, taken on the pixel-major codes (32 channels per vpmaxub) before the one
 * transpose to NCHW; conv rows and columns past the last whole window are never computed */
__attribute__((target("avx2"))) static void ${CNAME}_orow(const ${CNAME}_lctx* cx, int64_t b, int64_t r) {
    enum { N = ${CNAME}_N, NB = ${CNAME}_NB, R = ${CNAME}_LR, WC = ${CNAME}_WC, OWO = ${CNAME}_OWO,
           PKH = ${PKH}, PKW = ${PKW}, NP = ${CNAME}_NB * 32 };
    const int64_t OP = (int64_t)${CNAME}_OHO * OWO;
    if (!${ROWBUF}) { ${CNAME}_lrow(cx, b, r, NULL); return; }
    enum { ROWS = WC + R > 16 ? WC + R : 16, PROWS = OWO > 16 ? OWO : 16 };
    uint8_t rowc[${ROWBUF} ? ROWS * NP : 1] __attribute__((aligned(32)));
    uint8_t* out = (uint8_t*)cx->y + b * (int64_t)N * OP + r * OWO;
    if (!${POOL}) {
        if (WC < 16) memset(rowc + WC * NP, 0, (size_t)(ROWS - WC) * NP);
        ${CNAME}_lrow(cx, b, r, rowc);
        qc_rowc_to_nchw(rowc, NP, out, OP, OWO, N);
        return;
    }
    uint8_t pooled[${POOL} ? PROWS * NP : 1] __attribute__((aligned(32)));
    if (OWO < 16) memset(pooled + OWO * NP, 0, (size_t)(PROWS - OWO) * NP);
    if (${CNAME}_POOLACC) {
        enum { NB = ${CNAME}_NB, L = ${CNAME}_L };
        int16_t racc[${CNAME}_POOLACC ? ROWS * NP : 1] __attribute__((aligned(32)));  /* a conv row's accs */
        int16_t pacc[${CNAME}_POOLACC ? OWO * NP : 1] __attribute__((aligned(32)));   /* their pooled max */
        for (int i = 0; i < PKH; ++i) {
            ${CNAME}_lrow(cx, b, r * PKH + i, (uint8_t*)racc);
            for (int px = 0; px < OWO; ++px)
                for (int n0 = 0; n0 < NP; n0 += 16) {
                    __m256i m = _mm256_load_si256((const __m256i*)(racc + px * PKW * NP + n0));
                    for (int j = 1; j < PKW; ++j)
                        m = _mm256_max_epi16(m, _mm256_load_si256((const __m256i*)(racc + (px * PKW + j) * NP + n0)));
                    __m256i* dst = (__m256i*)(pacc + px * NP + n0);
                    _mm256_store_si256(dst, i ? _mm256_max_epi16(_mm256_load_si256(dst), m) : m);
                }
        }
        const int16_t* th = (const int16_t*)(qc_blob_${CNAME} + ${OFF_THRT16});
        for (int px = 0; px < OWO; ++px)
            for (int n0 = 0; n0 < NP; n0 += 32) {
                __m256i q[2];
                for (int h = 0; h < 2; ++h)
                    q[h] = qc_lut_thr16(_mm256_load_si256((const __m256i*)(pacc + px * NP + n0 + 16 * h)),
                                        th + n0 + 16 * h, (int64_t)NB * 32, L);
                _mm256_store_si256((__m256i*)(pooled + px * NP + n0),
                                   _mm256_permute4x64_epi64(_mm256_packus_epi16(q[0], q[1]), 0xD8));
            }
        qc_rowc_to_nchw(pooled, NP, out, OP, OWO, N);
        return;
    }
    for (int i = 0; i < PKH; ++i) {
        ${CNAME}_lrow(cx, b, r * PKH + i, rowc);
        for (int px = 0; px < OWO; ++px)
            for (int n0 = 0; n0 < NP; n0 += 32) {
                __m256i m = _mm256_load_si256((const __m256i*)(rowc + px * PKW * NP + n0));
                for (int j = 1; j < PKW; ++j)
                    m = _mm256_max_epu8(m, _mm256_load_si256((const __m256i*)(rowc + (px * PKW + j) * NP + n0)));
                __m256i* dst = (__m256i*)(pooled + px * NP + n0);
                _mm256_store_si256(dst, i ? _mm256_max_epu8(_mm256_load_si256(dst), m) : m);
            }
    }
    qc_rowc_to_nchw(pooled, NP, out, OP, OWO, N);
}

static void ${CNAME}_lrow_task(const void* vctx, int64_t t) {
    const ${CNAME}_lctx* cx = (const ${CNAME}_lctx*)vctx;
    int64_t b, r0, r1;
    qc_row_block(t, ${CNAME}_OHO, cx->out_rows, &b, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) ${CNAME}_orow(cx, b, r);
}

/* one task per image (when the batch gives every thread several): its tables, then its rows, so stage 2 reads
 * the tables from this core's cache and no barrier separates the stages */
static void ${CNAME}_limage_task(const void* vctx, int64_t b) {
    ${CNAME}_lctx* cx = (${CNAME}_lctx*)vctx;
    ${CNAME}_ltab_rows(cx, b, 0, ${CNAME}_H);
    for (int64_t r = 0; r < ${CNAME}_OHO; ++r) ${CNAME}_orow(cx, b, r);
}

/* The tables' and sums' buffers are kept between calls: zeroing ~100 KiB of them per call was a visible share of a
 * batch-1 call. Only interior pixels are ever written, so a reused buffer's border (padding) stays zero. One cached
 * pair per layer, taken and given back atomically: a concurrent call allocates its own. */
typedef struct { uint8_t* tab; int32_t* psum; int64_t images; } ${CNAME}_lbufs;
static _Atomic(${CNAME}_lbufs*) ${CNAME}_lcache;

static ${CNAME}_lbufs* ${CNAME}_lbufs_take(int64_t images, int64_t img_bytes, int64_t sum_ints) {
    ${CNAME}_lbufs* c = atomic_exchange(&${CNAME}_lcache, NULL);
    if (c && c->images >= images) return c;
    if (c) { free(c->tab); free(c->psum); free(c); }
    c = (${CNAME}_lbufs*)malloc(sizeof *c);
    if (!c) return NULL;
    c->images = images;
    c->tab = (uint8_t*)qc_alloc((size_t)(images * img_bytes) + 32);   /* zeroed; +32 bytes of slack */
    c->psum = (int32_t*)qc_alloc((size_t)(images * sum_ints) * 4);
    if (!c->tab || !c->psum) { free(c->tab); free(c->psum); free(c); return NULL; }
    return c;
}

static void ${CNAME}_lbufs_give(${CNAME}_lbufs* c) {
    ${CNAME}_lbufs* none = NULL;
    if (!atomic_compare_exchange_strong(&${CNAME}_lcache, &none, c)) { free(c->tab); free(c->psum); free(c); }
}

static int ${CNAME}_lut(const uint8_t* x, void* y, int64_t batch) {
    enum { C = ${CNAME}_C, H = ${CNAME}_H, W = ${CNAME}_W, N = ${CNAME}_N, HP = ${CNAME}_HP, WP = ${CNAME}_WP,
           G4 = ${CNAME}_G4, KTAP = ${CNAME}_KH * ${CNAME}_KW * ${CNAME}_C };
    const int64_t HW = (int64_t)H * W, P = (int64_t)${CNAME}_HO * ${CNAME}_WO;
    const int64_t OHO = ${CNAME}_OHO, OP = OHO * ${CNAME}_OWO;  /* the output's rows and plane (pooled or not) */
    const int64_t img_bytes = (int64_t)HP * WP * G4 * 16;
    const int nt = qc_num_threads();
    /* images per round: ~1 MiB of tables, so stage 2 reads them back from cache (a whole batch's tables in
     * one fresh buffer cost page faults and a trip through memory) */
    int64_t chunk = ((int64_t)1 << 20) / (img_bytes + (int64_t)HP * WP * 4);
    if (chunk < 2 * nt) chunk = 2 * nt;
    if (chunk > batch) chunk = batch;
    ${CNAME}_lctx cx;
    memset(&cx, 0, sizeof cx);
    ${CNAME}_lbufs* bufs = ${CNAME}_lbufs_take(chunk, img_bytes, (int64_t)HP * WP);
    if (!bufs) return QC_ERR_NOMEM;
    cx.tab = bufs->tab;
    cx.psum = bufs->psum;
    for (int64_t b0 = 0; b0 < batch && !cx.err; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        cx.x = (const ${IN_T}*)x + b0 * C * HW;
        cx.y = (uint8_t*)y + b0 * (int64_t)N * OP * (int64_t)sizeof(${OUT_CTYPE_C});
        cx.pix_rows = ${CNAME}_rows_per_task(H, bc, nt);
        cx.out_rows = ${CNAME}_rows_per_task(OHO, bc, nt);
        if (cx.pix_rows == H && cx.out_rows == OHO) {  /* whole images per task */
            qc_parallel(bc * P * N * KTAP > (1 << 20) ? nt : 1, bc, ${CNAME}_limage_task, &cx);
            continue;
        }
        qc_parallel(bc * HW * C > 8192 ? nt : 1, bc * ((H + cx.pix_rows - 1) / cx.pix_rows), ${CNAME}_ltab_task, &cx);
        if (cx.err) break;
        qc_parallel(bc * P * N * KTAP > (1 << 20) ? nt : 1, bc * ((OHO + cx.out_rows - 1) / cx.out_rows),
                    ${CNAME}_lrow_task, &cx);
    }
    ${CNAME}_lbufs_give(bufs);
    return cx.err;
}
#endif
