/* the kernel core: path dispatch, packing, and the bit GEMM of every path (microkernels + drivers follow) */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>
#define QC_MAX_THREADS 256

QC_CORE int qc_path_supported(int path) {
    if (path == QC_PATH_GENERIC) return 1;
#if defined(QC_HAVE_SIMD)
    __builtin_cpu_init();
    if (path == QC_PATH_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    if (path == QC_PATH_AVX512) {
#if defined(QC_EMULATE_AVX512)
        return 1;
#else
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
#endif
    }
#endif
    return 0;
}

/* A caller that calls layers back to back (a recurrent layer's time loop: its gate products once per step) pins the
   path and thread count it chose for its own duration, so those calls skip the getenv below (a visible share of a
   one-row call). */
__thread int qc_pinned_path = -1, qc_pinned_threads = 0;

/* Read at every call so a test (or a user) can switch paths without reloading the library. */
QC_CORE int qc_select_path(void) {
    if (qc_pinned_path >= 0) return qc_pinned_path;
    const char* env = getenv("QCOMPILE_CPU_PATH");
    if (env && *env && strcmp(env, "auto") != 0) {
        int p = !strcmp(env, "avx512") ? QC_PATH_AVX512 : !strcmp(env, "avx2") ? QC_PATH_AVX2
              : !strcmp(env, "generic") ? QC_PATH_GENERIC : -1;
        return (p >= 0 && qc_path_supported(p)) ? p : -1;
    }
    if (qc_path_supported(QC_PATH_AVX512)) return QC_PATH_AVX512;
    if (qc_path_supported(QC_PATH_AVX2)) return QC_PATH_AVX2;
    return QC_PATH_GENERIC;
}

/* The CPUs this process may use, asked once per process: a system call per layer call was a visible share of a
   one-row BitGemm (a few us each, called back to back from onnxruntime). */
static int qc_affinity_cpus(void) {
    static _Atomic int cached;
    static _Atomic pid_t cached_pid;
    int n = atomic_load_explicit(&cached, memory_order_relaxed);
    if (n > 0 && atomic_load_explicit(&cached_pid, memory_order_relaxed) == getpid()) return n;
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    atomic_store(&cached_pid, getpid());
    atomic_store(&cached, n);
    return n;
}

QC_CORE int qc_num_threads(void) {
    if (qc_pinned_threads > 0) return qc_pinned_threads;
    const char* env = getenv("QCOMPILE_NUM_THREADS");
    int n = env ? atoi(env) : 0;
    if (n <= 0) n = qc_affinity_cpus();
    return n > 0 ? (n < QC_MAX_THREADS ? n : QC_MAX_THREADS) : 1;
}

/* ---- the thread pool ----
 * Workers sleep on a condition variable between jobs. A job is (fn, ctx, ntasks); every thread, the caller
 * included, claims task indices from one atomic counter that carries the job's generation in its top bits, and
 * the caller waits only until every *claimed* task has finished. So a worker that the OS has not scheduled yet
 * (a busy machine, another library's thread pool) delays nothing: it wakes, finds no task of its generation, and
 * sleeps again. Unlike a fork-join barrier, no job waits for a thread that has not started. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int nworkers;
    pid_t pid;                     /* the process that started the workers: a forked child starts its own */
    _Atomic uint64_t gen;          /* job generation (written under mu) */
    qc_task_fn fn;                 /* the current job, written under mu */
    const void* ctx;
    int64_t ntasks;
    int limit;                     /* workers 0..limit-1 take part in this job */
    _Atomic uint64_t claim;        /* (gen & QC_GEN_MASK) << 40 | next task index */
    _Atomic int64_t done;          /* tasks finished in the current job */
} qc_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t qc_job_mu = PTHREAD_MUTEX_INITIALIZER;  /* one job at a time per process */

#define QC_GEN_MASK 0xFFFFFFULL
#define QC_IDX_MASK ((1ULL << 40) - 1)

static inline void qc_relax(void) {
#if defined(QC_X86)
    __builtin_ia32_pause();
#endif
}

static int64_t qc_claim(uint64_t tag, int64_t ntasks) {
    uint64_t s = atomic_load_explicit(&qc_pool.claim, memory_order_acquire);
    for (;;) {
        if ((s >> 40) != tag || (int64_t)(s & QC_IDX_MASK) >= ntasks) return -1;
        if (atomic_compare_exchange_weak_explicit(&qc_pool.claim, &s, s + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int64_t)(s & QC_IDX_MASK);
    }
}

static void qc_work(uint64_t gen, qc_task_fn fn, const void* ctx, int64_t ntasks) {
    int64_t t;
    while ((t = qc_claim(gen & QC_GEN_MASK, ntasks)) >= 0) {
        fn(ctx, t);
        atomic_fetch_add_explicit(&qc_pool.done, 1, memory_order_acq_rel);
    }
}

static void* qc_worker(void* arg) {
    const int idx = (int)(intptr_t)arg;
    uint64_t seen = atomic_load(&qc_pool.gen);
    for (;;) {
        /* a short spin first: back-to-back layers reuse a warm worker without a futex round trip */
        for (int spin = 0; spin < 4000 && atomic_load_explicit(&qc_pool.gen, memory_order_acquire) == seen; ++spin)
            qc_relax();
        pthread_mutex_lock(&qc_pool.mu);
        while (atomic_load(&qc_pool.gen) == seen) pthread_cond_wait(&qc_pool.cv, &qc_pool.mu);
        seen = atomic_load(&qc_pool.gen);
        qc_task_fn fn = qc_pool.fn;
        const void* ctx = qc_pool.ctx;
        int64_t ntasks = qc_pool.ntasks;
        int take_part = idx < qc_pool.limit;
        pthread_mutex_unlock(&qc_pool.mu);
        if (take_part) qc_work(seen, fn, ctx, ntasks);
    }
    return NULL;
}

static void qc_pool_ensure(int workers) {
    if (qc_pool.pid != getpid()) {  /* first use, or a forked child: the parent's workers do not exist here */
        pthread_mutex_init(&qc_pool.mu, NULL);
        pthread_cond_init(&qc_pool.cv, NULL);
        qc_pool.nworkers = 0;
        qc_pool.pid = getpid();
    }
    while (qc_pool.nworkers < workers) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, qc_worker, (void*)(intptr_t)qc_pool.nworkers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;  /* fewer threads is still correct */
        qc_pool.nworkers++;
    }
}

__thread qc_pool_hook qc_thread_pool_hook;

QC_CORE void qc_parallel(int nthreads, int64_t ntasks, qc_task_fn fn, const void* ctx) {
    if (nthreads <= 1 || ntasks <= 1) {
        for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
        return;
    }
    if (qc_thread_pool_hook.run) {
        qc_thread_pool_hook.run(qc_thread_pool_hook.pool, ntasks, fn, ctx);
        return;
    }
    pthread_mutex_lock(&qc_job_mu);
    qc_pool_ensure(nthreads - 1);
    pthread_mutex_lock(&qc_pool.mu);
    uint64_t gen = atomic_load(&qc_pool.gen) + 1;
    qc_pool.fn = fn;
    qc_pool.ctx = ctx;
    qc_pool.ntasks = ntasks;
    qc_pool.limit = nthreads - 1;
    atomic_store(&qc_pool.done, 0);
    atomic_store(&qc_pool.claim, (gen & QC_GEN_MASK) << 40);
    atomic_store(&qc_pool.gen, gen);
    pthread_cond_broadcast(&qc_pool.cv);
    pthread_mutex_unlock(&qc_pool.mu);
    qc_work(gen, fn, ctx, ntasks);
    for (long spin = 0; atomic_load_explicit(&qc_pool.done, memory_order_acquire) < ntasks; ++spin) {
        if (spin < 100000) qc_relax();
        else sched_yield();  /* a claimed task's thread was preempted: let it run */
    }
    pthread_mutex_unlock(&qc_job_mu);
}

QC_CORE void* qc_alloc(size_t bytes) {  /* 64-byte aligned, zeroed */
    void* p = NULL;
    size_t n = (bytes + 63) / 64 * 64;
    if (posix_memalign(&p, 64, n ? n : 64)) return NULL;
    memset(p, 0, n ? n : 64);
    return p;
}

/* Rows per block so that a block of packed A rows stays in L1/L2 while weight rows stream past it. */
static int64_t qc_rows_per_block(const qc_job* j, int mr) {
    int64_t bytes = j->a_stride * 8;
    int64_t mb = 24576 / (bytes ? bytes : 1);
    if (mb < mr) mb = mr;
    if (mb > 256) mb = 256;
    return (mb + mr - 1) / mr * mr;
}

static int64_t qc_cols_per_block(const qc_job* j, int64_t n_mblocks, int nr) {
    /* enough blocks for every thread (x4 for balance), at most 64 channels, a multiple of nr */
    int64_t want = (int64_t)j->nthreads * 4;
    int64_t nb = (j->N * n_mblocks >= want) ? 64 : (j->N + want / n_mblocks - 1) / (want / n_mblocks > 0 ? want / n_mblocks : 1);
    if (nb > 64) nb = 64;
    if (nb < nr) nb = nr;
    return (nb + nr - 1) / nr * nr;
}

/* ---- scalar helpers shared by the packing of every path ---- */

/* codes[0..n) -> planes: dst[i*plane_stride + w] for i < bits, w < ceil(n/64); returns the sum of the codes */
static int64_t qc_pack_generic(const uint8_t* src, int64_t n, int bits, uint64_t* dst, int64_t plane_stride) {
    int64_t sum = 0;
    for (int64_t w0 = 0; w0 < n; w0 += 64) {
        uint8_t buf[64];
        int64_t cnt = n - w0 < 64 ? n - w0 : 64;
        memcpy(buf, src + w0, (size_t)cnt);
        memset(buf + cnt, 0, (size_t)(64 - cnt));
        for (int t = 0; t < 64; ++t) sum += buf[t];
        for (int i = 0; i < bits; ++i) {
            uint64_t word = 0;
            for (int b = 0; b < 8; ++b) {
                uint64_t v;
                memcpy(&v, buf + 8 * b, 8);
                word |= qc_gather8(v, i) << (8 * b);
            }
            dst[i * plane_stride + w0 / 64] = word;
        }
    }
    return sum;
}

#if defined(QC_HAVE_SIMD)
QC_TGT_AVX2 static int64_t qc_pack_avx2(const uint8_t* src, int64_t n, int bits, uint64_t* dst, int64_t plane_stride) {
    int64_t sum = 0;
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t w0 = 0; w0 < n; w0 += 64) {
        __m256i lo, hi;
        if (n - w0 >= 64) {
            lo = _mm256_loadu_si256((const __m256i*)(src + w0));
            hi = _mm256_loadu_si256((const __m256i*)(src + w0 + 32));
        } else {
            uint8_t buf[64] __attribute__((aligned(32)));
            memset(buf, 0, 64);
            memcpy(buf, src + w0, (size_t)(n - w0));
            lo = _mm256_load_si256((const __m256i*)buf);
            hi = _mm256_load_si256((const __m256i*)(buf + 32));
        }
        __m256i s = _mm256_add_epi64(_mm256_sad_epu8(lo, zero), _mm256_sad_epu8(hi, zero));
        sum += _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
               _mm256_extract_epi64(s, 3);
        for (int i = 0; i < bits; ++i) {
            /* a 16-bit shift moves bit i of every byte to that byte's top bit; movemask collects the top bits */
            __m128i sh = _mm_cvtsi32_si128(7 - i);
            uint32_t l = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(lo, sh));
            uint32_t h = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(hi, sh));
            dst[i * plane_stride + w0 / 64] = (uint64_t)l | ((uint64_t)h << 32);
        }
    }
    return sum;
}

QC_TGT_AVX512 static int64_t qc_pack_avx512(const uint8_t* src, int64_t n, int bits, uint64_t* dst,
                                             int64_t plane_stride) {
    int64_t sum = 0;
    const qc_v512 zero = QC512(setzero_si512)();
    for (int64_t w0 = 0; w0 < n; w0 += 64) {
        qc_v512 v;
        if (n - w0 >= 64) {
            v = QC512(loadu_si512)((const void*)(src + w0));
        } else {
            uint8_t buf[64] __attribute__((aligned(64)));
            memset(buf, 0, 64);
            memcpy(buf, src + w0, (size_t)(n - w0));
            v = QC512(loadu_si512)((const void*)buf);
        }
        int64_t s8[8];
        QC512(storeu_si512)((void*)s8, QC512(sad_epu8)(v, zero));
        for (int q = 0; q < 8; ++q) sum += s8[q];
        for (int i = 0; i < bits; ++i)
            dst[i * plane_stride + w0 / 64] = (uint64_t)QC512(test_epi8_mask)(v, QC512(set1_epi8)((char)(1 << i)));
    }
    return sum;
}
#endif

QC_CORE qc_pack_fn qc_packer(int path) {
#if defined(QC_HAVE_SIMD)
    if (path == QC_PATH_AVX512) return qc_pack_avx512;
    if (path == QC_PATH_AVX2) return qc_pack_avx2;
#endif
    (void)path;
    return qc_pack_generic;
}

/* 32 codes at a time -> one 32-bit unit per plane (the direct conv's packed pixels) */
static int64_t qc_pack_u32_generic(const uint8_t* src, int64_t n, int bits, uint32_t* dst, int64_t plane_stride) {
    int64_t sum = 0;
    for (int64_t u = 0; u < n / 32; ++u) {
        uint64_t v[4];
        memcpy(v, src + 32 * u, 32);
        for (int t = 0; t < 32; ++t) sum += src[32 * u + t];
        for (int i = 0; i < bits; ++i)
            dst[i * plane_stride + u] = (uint32_t)(qc_gather8(v[0], i) | qc_gather8(v[1], i) << 8 |
                                                   qc_gather8(v[2], i) << 16 | qc_gather8(v[3], i) << 24);
    }
    return sum;
}

#if defined(QC_HAVE_SIMD)
QC_TGT_AVX2 static int64_t qc_pack_u32_avx2(const uint8_t* src, int64_t n, int bits, uint32_t* dst,
                                             int64_t plane_stride) {
    __m256i s = _mm256_setzero_si256();
    for (int64_t u = 0; u < n / 32; ++u) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(src + 32 * u));
        s = _mm256_add_epi64(s, _mm256_sad_epu8(v, _mm256_setzero_si256()));
        for (int i = 0; i < bits; ++i)
            dst[i * plane_stride + u] = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(v, _mm_cvtsi32_si128(7 - i)));
    }
    return _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
           _mm256_extract_epi64(s, 3);
}
#endif

QC_CORE int64_t qc_pack_u32(int path, const uint8_t* src, int64_t n, int bits, uint32_t* dst, int64_t plane_stride) {
#if defined(QC_HAVE_SIMD)
    if (path == QC_PATH_AVX2 || path == QC_PATH_AVX512) return qc_pack_u32_avx2(src, n, bits, dst, plane_stride);
#endif
    (void)path;
    return qc_pack_u32_generic(src, n, bits, dst, plane_stride);
}

/* OR `nbits` bits of src (zero beyond nbits) into dst starting at bit `off`. */
QC_CORE void qc_or_bits(uint64_t* dst, int64_t off, const uint64_t* src, int64_t nbits) {
    int64_t nw = (nbits + 63) / 64, w = off >> 6;
    int sh = (int)(off & 63);
    if (sh == 0) {
        for (int64_t q = 0; q < nw; ++q) dst[w + q] |= src[q];
        return;
    }
    int64_t last = (off + nbits - 1) >> 6;  /* the last destination word that receives bits */
    for (int64_t q = 0; q < nw; ++q) {
        dst[w + q] |= src[q] << sh;
        if (w + q + 1 <= last) dst[w + q + 1] |= src[q] >> (64 - sh);
    }
}

/* set bits [off, off+nbits) */
QC_CORE void qc_set_bits(uint64_t* dst, int64_t off, int64_t nbits) {
    for (int64_t b = off; b < off + nbits;) {
        int sh = (int)(b & 63);
        int64_t take = 64 - sh < off + nbits - b ? 64 - sh : off + nbits - b;
        uint64_t mask = take == 64 ? ~0ULL : (((1ULL << take) - 1) << sh);
        dst[b >> 6] |= mask;
        b += take;
    }
}

/* ---- activation rows of a BitGemm: packed in parallel, 32 rows per task ---- */
typedef struct {
    qc_pack_fn pack;
    const uint8_t* x;
    int64_t rows, K, kwp, stride;
    int ka, xor_mode;
    uint64_t* A;
    int32_t* rowsum;
} qc_pack_ctx;

static void qc_pack_task(const void* vctx, int64_t t) {
    const qc_pack_ctx* c = (const qc_pack_ctx*)vctx;
    int64_t m1 = (t + 1) * 32 < c->rows ? (t + 1) * 32 : c->rows;
    for (int64_t m = t * 32; m < m1; ++m) {
        int64_t s = c->pack(c->x + m * c->K, c->K, c->ka, c->A + m * c->stride, c->kwp);
        c->rowsum[m] = c->xor_mode ? (int32_t)c->K : (int32_t)s;
    }
}

QC_CORE void qc_pack_rows(int path, const uint8_t* x, int64_t rows, int64_t K, int ka, int xor_mode, int64_t kwp,
                          uint64_t* A, int32_t* rowsum, int nthreads) {
    qc_pack_ctx c = {qc_packer(path), x, rows, K, kwp, (int64_t)ka * kwp, ka, xor_mode, A, rowsum};
    qc_parallel(rows * K > 65536 ? nthreads : 1, (rows + 31) / 32, qc_pack_task, &c);
}
