/* qc_gemm_${PATH}_${MODE}: a job's rows x channels in blocks (rows_per_block x cols_per_block) spread over
 * OpenMP threads; inside a block, ${MR}x${NR} register tiles (1x${NR} for leftover rows). The ${NR} weight rows of
 * a tile stay in L1 while the block's packed activation rows stream past them. Edge tiles point their missing
 * rows/channels at valid ones and discard those results. */
typedef struct {
    const qc_job* j;
    int64_t kwn, wstride, mb, nb, n_nb;
} qc_gemm_${PATH}_${MODE}_ctx;

/* one block: rows [bm*mb, +mb) x channels [bn*nb, +nb) */
QC_TGT_${TGT} static void qc_gemm_${PATH}_${MODE}_task(const void* vctx, int64_t t) {
    const qc_gemm_${PATH}_${MODE}_ctx* cx = (const qc_gemm_${PATH}_${MODE}_ctx*)vctx;
    const qc_job* j = cx->j;
    const int64_t M = j->M, N = j->N, kwp = j->kwp, kwn = cx->kwn, wstride = cx->wstride;
    const int64_t bm = t / cx->n_nb, bn = t - bm * cx->n_nb;
    const int64_t m_lo = bm * cx->mb, m_hi = m_lo + cx->mb < M ? m_lo + cx->mb : M;
    const int64_t n_lo = bn * cx->nb, n_hi = n_lo + cx->nb < N ? n_lo + cx->nb : N;
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
            for (int r = 0; r < ${MR}; ++r) qc_store_row(j, m + r, n, nc, rbase[m + r - m_lo], out[r]);
        }
        for (; m < m_hi; ++m) {
            const uint64_t* ar[1] = {j->A + m * j->a_stride};
            int64_t out[1][${NR}];
            ${MK_ONE}(ar, wr, j->ka, j->kb, kwn, kwp, out);
            qc_store_row(j, m, n, nc, rbase[m - m_lo], out[0]);
        }
    }
}

static void qc_gemm_${PATH}_${MODE}(const qc_job* j) {
    qc_gemm_${PATH}_${MODE}_ctx cx;
    cx.j = j;
    cx.kwn = ${KWN};  /* words the microkernels walk (<= kwp; the rest is zero padding) */
    cx.wstride = (int64_t)j->kb * j->kwp;
    cx.mb = qc_rows_per_block(j, ${MR});
    const int64_t n_mb = (j->M + cx.mb - 1) / cx.mb;
    cx.nb = qc_cols_per_block(j, n_mb, ${NR});
    cx.n_nb = (j->N + cx.nb - 1) / cx.nb;
    /* words ANDed+counted; below ~2^13 (~10 us on one core; measured: at 2^14-2^17 two
     * warm pool threads already beat one, e.g. W1A1 M=1 K=N=1024 18 -> 12 us) waking threads costs more than it saves */
    const int64_t work = j->M * j->N * cx.kwn * (j->ka * j->kb);
    qc_parallel(work > (1 << 13) ? j->nthreads : 1, n_mb * cx.n_nb, qc_gemm_${PATH}_${MODE}_task, &cx);
}

