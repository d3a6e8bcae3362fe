/* ${NAME}: ${MR} rows x ${NR} channels, mode ${MODE}, AVX-512 VPOPCNTDQ: 8 words per step, one zmm accumulator
 * per (row, channel) holding 8 lane-wise popcount sums. Multi-bit: plane pairs (i, j) are visited by descending
 * s = i + j and the accumulators doubled between values of s (Horner), so 2^(i+j) costs one shift per s. */
QC_TGT_AVX512 static inline void ${NAME}(const uint64_t* const a[${MR}], const uint64_t* const w[${NR}], int ka,
                                          int kb, int64_t kwn, int64_t kwp, int64_t out[${MR}][${NR}]) {
    qc_v512 acc[${MR}][${NR}];
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < ${NR}; ++c) acc[r][c] = QC512(setzero_si512)();
    const int smax = ${MODE} == QC_AND ? ka + kb - 2 : 0;
    for (int s = smax; s >= 0; --s) {
        if (s != smax) {
#pragma GCC unroll 16
            for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                for (int c = 0; c < ${NR}; ++c) acc[r][c] = QC512(slli_epi64)(acc[r][c], 1);
        }
        for (int i = qc_pair_lo(s, kb); i <= qc_pair_hi(s, ka); ++i) {
            const int64_t ao = (int64_t)i * kwp, wo = (int64_t)(s - i) * kwp;
            for (int64_t k = 0; k < kwn; k += 8) {
                qc_v512 av[${MR}], wv[${NR}];
#pragma GCC unroll 16
                for (int r = 0; r < ${MR}; ++r) av[r] = QC512(loadu_si512)((const void*)(a[r] + ao + k));
#pragma GCC unroll 16
                for (int c = 0; c < ${NR}; ++c) wv[c] = QC512(loadu_si512)((const void*)(w[c] + wo + k));
                if (${MODE} == QC_XORM) {
                    qc_v512 mv[${MR}];
#pragma GCC unroll 16
                    for (int r = 0; r < ${MR}; ++r) mv[r] = QC512(loadu_si512)((const void*)(a[r] + kwp + k));
#pragma GCC unroll 16
                    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                        for (int c = 0; c < ${NR}; ++c)
                            acc[r][c] = QC512(add_epi64)(acc[r][c], QC512(popcnt_epi64)(
                                QC512(and_si512)(QC512(xor_si512)(av[r], wv[c]), mv[r])));
                } else {
#pragma GCC unroll 16
                    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                        for (int c = 0; c < ${NR}; ++c)
                            acc[r][c] = QC512(add_epi64)(acc[r][c], QC512(popcnt_epi64)(
                                ${MODE} == QC_AND ? QC512(and_si512)(av[r], wv[c]) : QC512(xor_si512)(av[r], wv[c])));
                }
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < ${NR}; ++c) {
            int64_t l[8];
            QC512(storeu_si512)((void*)l, acc[r][c]);
            out[r][c] = l[0] + l[1] + l[2] + l[3] + l[4] + l[5] + l[6] + l[7];
        }
}

