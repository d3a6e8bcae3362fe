/* ${NAME}: ${MR} rows x ${NR} channels, mode ${MODE}, AVX2: popcount of each byte by two vpshufb lookups in a
 * 16-entry nibble table, byte counters summed into 64-bit lanes by vpsadbw every 16 vectors (16*8 < 256).
 * Plane pairs by descending i + j with the 64-bit accumulators doubled between (Horner), as in the AVX-512 path. */
QC_TGT_AVX2 static inline void ${NAME}(const uint64_t* const a[${MR}], const uint64_t* const w[${NR}], int ka,
                                        int kb, int64_t kwn, int64_t kwp, int64_t out[${MR}][${NR}]) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i acc[${MR}][${NR}];
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < ${NR}; ++c) acc[r][c] = zero;
    const int smax = ${MODE} == QC_AND ? ka + kb - 2 : 0;
    for (int s = smax; s >= 0; --s) {
        if (s != smax) {
#pragma GCC unroll 16
            for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                for (int c = 0; c < ${NR}; ++c) acc[r][c] = _mm256_slli_epi64(acc[r][c], 1);
        }
        for (int i = qc_pair_lo(s, kb); i <= qc_pair_hi(s, ka); ++i) {
            const int64_t ao = (int64_t)i * kwp, wo = (int64_t)(s - i) * kwp;
            for (int64_t k0 = 0; k0 < kwn; k0 += 64) {
                const int64_t k1 = k0 + 64 < kwn ? k0 + 64 : kwn;
                __m256i cnt[${MR}][${NR}];
#pragma GCC unroll 16
                for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                    for (int c = 0; c < ${NR}; ++c) cnt[r][c] = zero;
                for (int64_t k = k0; k < k1; k += 4) {
                    __m256i av[${MR}], wv[${NR}], mv[${MR}];
#pragma GCC unroll 16
                    for (int r = 0; r < ${MR}; ++r) {
                        av[r] = _mm256_loadu_si256((const __m256i*)(a[r] + ao + k));
                        if (${MODE} == QC_XORM) mv[r] = _mm256_loadu_si256((const __m256i*)(a[r] + kwp + k));
                    }
#pragma GCC unroll 16
                    for (int c = 0; c < ${NR}; ++c) wv[c] = _mm256_loadu_si256((const __m256i*)(w[c] + wo + k));
#pragma GCC unroll 16
                    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                        for (int c = 0; c < ${NR}; ++c) {
                            __m256i t = ${MODE} == QC_AND ? _mm256_and_si256(av[r], wv[c]) : _mm256_xor_si256(av[r], wv[c]);
                            if (${MODE} == QC_XORM) t = _mm256_and_si256(t, mv[r]);
                            __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(t, low4));
                            __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(t, 4), low4));
                            cnt[r][c] = _mm256_add_epi8(cnt[r][c], _mm256_add_epi8(lo, hi));
                        }
                }
#pragma GCC unroll 16
                for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                    for (int c = 0; c < ${NR}; ++c) acc[r][c] = _mm256_add_epi64(acc[r][c], _mm256_sad_epu8(cnt[r][c], zero));
            }
        }
    }
    /* horizontal sums, four channels per vector: (a0 a1 a2 a3) -> one ymm of their four lane totals */
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r) {
#pragma GCC unroll 16
        for (int c = 0; c + 4 <= ${NR}; c += 4) {
            const __m256i t01 = _mm256_add_epi64(_mm256_unpacklo_epi64(acc[r][c], acc[r][c + 1]),
                                                 _mm256_unpackhi_epi64(acc[r][c], acc[r][c + 1]));
            const __m256i t23 = _mm256_add_epi64(_mm256_unpacklo_epi64(acc[r][c + 2], acc[r][c + 3]),
                                                 _mm256_unpackhi_epi64(acc[r][c + 2], acc[r][c + 3]));
            _mm256_storeu_si256((__m256i*)&out[r][c], _mm256_add_epi64(_mm256_permute2x128_si256(t01, t23, 0x20),
                                                                       _mm256_permute2x128_si256(t01, t23, 0x31)));
        }
#pragma GCC unroll 16
        for (int c = ${NR} / 4 * 4; c < ${NR}; ++c) {
            int64_t l[4];
            _mm256_storeu_si256((__m256i*)l, acc[r][c]);
            out[r][c] = l[0] + l[1] + l[2] + l[3];
        }
    }
}

