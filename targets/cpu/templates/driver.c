/* qc_gemm_${PATH}_${MODE}: a job's rows x channels in blocks (rows_per_block x cols_per_block) spread over
 * OpenMP threads; inside a block, ${MR}x${NR} register tiles (1x${NR} for leftover rows). The ${NR} weight rows of
 * a tile stay in L1 while the block's packed activation rows stream past them. Edge tiles point their missing
 * rows/channels at valid ones and discard those results. */
QC_TGT_${TGT} static void qc_gemm_${PATH}_${MODE}(const qc_job* j) {
    const int64_t M = j->M, N = j->N, kwp = j->kwp;
    const int64_t kwn = ${KWN};  /* words the microkernels walk (<= kwp; the rest is zero padding) */
    const int64_t wstride = (int64_t)j->kb * kwp;
    const int64_t mb = qc_rows_per_block(j, ${MR});
    const int64_t n_mb = (M + mb - 1) / mb;
    const int64_t nb = qc_cols_per_block(j, n_mb, ${NR});
    const int64_t n_nb = (N + nb - 1) / nb;
    /* words ANDed+counted; below ~2^17 (~0.1 ms on one core) waking threads costs more than it saves */
    const int64_t work = M * N * kwn * (j->ka * j->kb);
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(j->nthreads) if (work > (1 << 17) && n_mb * n_nb > 1)
    for (int64_t bm = 0; bm < n_mb; ++bm) {
        for (int64_t bn = 0; bn < n_nb; ++bn) {
            const int64_t m_lo = bm * mb, m_hi = m_lo + mb < M ? m_lo + mb : M;
            const int64_t n_lo = bn * nb, n_hi = n_lo + nb < N ? n_lo + nb : N;
            int64_t rbase[256];  /* rows per block <= 256 */
            qc_row_bases(j, m_lo, m_hi, rbase);
            for (int64_t n = n_lo; n < n_hi; n += ${NR}) {
                const uint64_t* wr[${NR}];
                const int nc = n_hi - n < ${NR} ? (int)(n_hi - n) : ${NR};
                for (int c = 0; c < ${NR}; ++c) wr[c] = j->W + (n + c < N ? n + c : N - 1) * wstride;
                int64_t m = m_lo;
                for (; m + ${MR} <= m_hi; m += ${MR}) {
                    const uint64_t* ar[${MR}];
                    int64_t out[${MR}][${NR}];
                    for (int r = 0; r < ${MR}; ++r) ar[r] = j->A + (m + r) * j->a_stride;
                    ${MK_BIG}(ar, wr, j->ka, j->kb, kwn, kwp, out);
                    for (int r = 0; r < ${MR}; ++r)
                        for (int c = 0; c < nc; ++c) qc_store(j, m + r, n + c, rbase[m + r - m_lo], out[r][c]);
                }
                for (; m < m_hi; ++m) {
                    const uint64_t* ar[1] = {j->A + m * j->a_stride};
                    int64_t out[1][${NR}];
                    ${MK_ONE}(ar, wr, j->ka, j->kb, kwn, kwp, out);
                    for (int c = 0; c < nc; ++c) qc_store(j, m, n + c, rbase[m - m_lo], out[0][c]);
                }
            }
        }
    }
}

