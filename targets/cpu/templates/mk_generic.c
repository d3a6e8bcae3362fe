/* ${NAME}: ${MR} rows x ${NR} channels, mode ${MODE}, portable: one 64-bit word per step, __builtin_popcountll,
 * register-tiled scalar accumulators; plane pairs by descending i + j with doubling between (Horner). */
QC_TGT_${TGT} static inline void ${NAME}(const uint64_t* const a[${MR}], const uint64_t* const w[${NR}], int ka,
                                     int kb, int64_t kwn, int64_t kwp, int64_t out[${MR}][${NR}]) {
    uint64_t acc[${MR}][${NR}];
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < ${NR}; ++c) acc[r][c] = 0;
    const int smax = ${MODE} == QC_AND ? ka + kb - 2 : 0;
    for (int s = smax; s >= 0; --s) {
        if (s != smax) {
#pragma GCC unroll 16
            for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                for (int c = 0; c < ${NR}; ++c) acc[r][c] <<= 1;
        }
        for (int i = qc_pair_lo(s, kb); i <= qc_pair_hi(s, ka); ++i) {
            const int64_t ao = (int64_t)i * kwp, wo = (int64_t)(s - i) * kwp;
            for (int64_t k = 0; k < kwn; ++k) {
                uint64_t av[${MR}], wv[${NR}];
#pragma GCC unroll 16
                for (int r = 0; r < ${MR}; ++r) av[r] = a[r][ao + k];
#pragma GCC unroll 16
                for (int c = 0; c < ${NR}; ++c) wv[c] = w[c][wo + k];
#pragma GCC unroll 16
                for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
                    for (int c = 0; c < ${NR}; ++c) {
                        uint64_t t = ${MODE} == QC_AND ? av[r] & wv[c] : av[r] ^ wv[c];
                        if (${MODE} == QC_XORM) t &= a[r][kwp + k];
                        acc[r][c] += (uint64_t)__builtin_popcountll(t);
                    }
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ${MR}; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < ${NR}; ++c) out[r][c] = (int64_t)acc[r][c];
}

