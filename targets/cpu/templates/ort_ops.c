
/* ================================================================================================================
 * onnxruntime custom ops: RegisterCustomOps(options, api_base) makes every layer of this library a node onnxruntime
 * runs, domain "ai.qcompile", op "Kernel_<in>_<out>" (u8/f32 in; f32/u8/i32 out) with a string attribute "layer"
 * naming the layer (qc_layer_table). A whole fused graph then runs as one onnxruntime session:
 *     so.register_custom_ops_library("kernels/qcompile_kernels.so"); InferenceSession("deploy.onnx", so)
 *
 * No header of onnxruntime's C API is installable here, so the few parts used are declared below from its public
 * header's documented layout (onnxruntime_c_api.h). The OrtApi is a table of function pointers that only grows:
 * an entry keeps its slot in every later release. Asking GetApi for QC_ORT_API_VERSION returns NULL on an older
 * onnxruntime, which RegisterCustomOps reports. Running the ops in the tests checks every entry used here.
 * ============================================================================================================= */

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#define QC_ORT_API_VERSION 16   /* CreateKernelV2 / KernelComputeV2 (errors as statuses): onnxruntime >= 1.16 */

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;                   /* used only as a table of function pointers, by slot */
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef struct OrtApiBase {
    const OrtApi* (*GetApi)(uint32_t version);
    const char* (*GetVersionString)(void);
} OrtApiBase;

enum { QC_ORT_FAIL = 1, QC_ORT_INVALID_ARGUMENT = 2 };                          /* OrtErrorCode */
enum { QC_ONNX_FLOAT = 1, QC_ONNX_UINT8 = 2, QC_ONNX_INT32 = 6 };              /* ONNXTensorElementDataType */

/* OrtApi slots (0-based) of the entries used here; their signatures as the header declares them */
enum {
    QC_SLOT_CreateStatus = 0,                   /* OrtStatus* (int code, const char* msg) */
    QC_SLOT_CreateCustomOpDomain = 26,          /* (const char* domain, OrtCustomOpDomain** out) */
    QC_SLOT_CustomOpDomain_Add = 27,            /* (OrtCustomOpDomain*, const OrtCustomOp*) */
    QC_SLOT_AddCustomOpDomain = 28,             /* (OrtSessionOptions*, OrtCustomOpDomain*) */
    QC_SLOT_GetTensorMutableData = 51,          /* (OrtValue*, void** out) */
    QC_SLOT_GetDimensionsCount = 61,            /* (const OrtTensorTypeAndShapeInfo*, size_t* out) */
    QC_SLOT_GetDimensions = 62,                 /* (const OrtTensorTypeAndShapeInfo*, int64_t* dims, size_t n) */
    QC_SLOT_GetTensorTypeAndShape = 65,         /* (const OrtValue*, OrtTensorTypeAndShapeInfo** out) */
    QC_SLOT_KernelInfoGetAttribute_string = 87, /* (const OrtKernelInfo*, const char* name, char* out, size_t* size) */
    QC_SLOT_KernelContext_GetInputCount = 88,   /* (const OrtKernelContext*, size_t* out) */
    QC_SLOT_KernelContext_GetInput = 90,        /* (const OrtKernelContext*, size_t i, const OrtValue** out) */
    QC_SLOT_KernelContext_GetOutput = 91,       /* (OrtKernelContext*, size_t i, const int64_t* dims, size_t n,
                                                    OrtValue** out) */
    QC_SLOT_ReleaseStatus = 93,                 /* void (OrtStatus*) */
    QC_SLOT_ReleaseTensorTypeAndShapeInfo = 99, /* void (OrtTensorTypeAndShapeInfo*) */
    QC_SLOT_KernelContext_ParallelFor = 274,    /* (const OrtKernelContext*, void (*fn)(void*, size_t), size_t total,
                                                    size_t num_batch, void* usr_data); API 17 */
};

#define QC_ORT(api, slot, type) ((type)(((void* const*)(const void*)(api))[QC_SLOT_##slot]))

typedef OrtStatus* (*qc_ort_create_status_fn)(int, const char*);

/* struct OrtCustomOp, field by field as the header lays it out (208 bytes on x86-64) */
typedef struct OrtCustomOp {
    uint32_t version;
    void* (*CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
    const char* (*GetName)(const struct OrtCustomOp* op);
    const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);
    int (*GetInputType)(const struct OrtCustomOp* op, size_t index);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
    int (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
    void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
    void (*KernelDestroy)(void* op_kernel);
    int (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
    int (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
    OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                 void** kernel);
    OrtStatus* (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
    OrtStatus* (*InferOutputShapeFn)(const struct OrtCustomOp* op, OrtShapeInferContext* ctx);
    int (*GetStartVersion)(const struct OrtCustomOp* op);
    int (*GetEndVersion)(const struct OrtCustomOp* op);
    size_t (*GetMayInplace)(int** input_index, int** output_index);
    void (*ReleaseMayInplace)(int* input_index, int* output_index);
    size_t (*GetAliasMap)(int** input_index, int** output_index);
    void (*ReleaseAliasMap)(int* input_index, int* output_index);
} OrtCustomOp;
_Static_assert(sizeof(OrtCustomOp) == 26 * sizeof(void*), "OrtCustomOp layout: 1 word of version + 25 pointers");

/* one op per (input type, output type) pair the layers use; the op object carries its types */
typedef struct {
    OrtCustomOp op;
    int in_type, out_type;
    char name[24];
} qc_ort_op;

typedef struct {
    const OrtApi* api;
    const qc_layer_entry* layer;
} qc_ort_kernel;

static const char* qc_type_tag(int t) {
    return t == QC_ONNX_FLOAT ? "f32" : t == QC_ONNX_UINT8 ? "u8" : "i32";
}

static OrtStatus* qc_ort_error(const OrtApi* api, const char* msg) {
    return QC_ORT(api, CreateStatus, qc_ort_create_status_fn)(QC_ORT_INVALID_ARGUMENT, msg);
}

static const char* qc_op_name(const OrtCustomOp* op) { return ((const qc_ort_op*)op)->name; }
static const char* qc_op_ep(const OrtCustomOp* op) { (void)op; return NULL; }  /* NULL: the CPU provider */
static int qc_op_in_type(const OrtCustomOp* op, size_t i) { (void)i; return ((const qc_ort_op*)op)->in_type; }
static int qc_op_out_type(const OrtCustomOp* op, size_t i) { (void)i; return ((const qc_ort_op*)op)->out_type; }
static size_t qc_op_one(const OrtCustomOp* op) { (void)op; return 1; }
static int qc_op_required(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int qc_op_mem_default(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return 0; }
static int qc_op_arity(const OrtCustomOp* op) { (void)op; return 1; }
static int qc_op_homogeneous(const OrtCustomOp* op) { (void)op; return 1; }

static OrtStatus* qc_op_create_v2(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                  void** kernel) {
    typedef OrtStatus* (*get_str_fn)(const OrtKernelInfo*, const char*, char*, size_t*);
    char name[512];
    size_t size = sizeof name;
    OrtStatus* st = QC_ORT(api, KernelInfoGetAttribute_string, get_str_fn)(info, "layer", name, &size);
    if (st) return st;
    const qc_ort_op* me = (const qc_ort_op*)op;
    char msg[640];
    for (int i = 0; i < qc_layer_count; ++i) {
        const qc_layer_entry* e = &qc_layer_table[i];
        if (strcmp(e->name, name) != 0) continue;
        if (e->in_type != me->in_type || e->out_type != me->out_type) {
            snprintf(msg, sizeof msg, "qcompile layer '%s' takes %s -> %s, the node's op is %s", name,
                     qc_type_tag(e->in_type), qc_type_tag(e->out_type), me->name);
            return qc_ort_error(api, msg);
        }
        qc_ort_kernel* k = (qc_ort_kernel*)malloc(sizeof *k);
        if (!k) return QC_ORT(api, CreateStatus, qc_ort_create_status_fn)(QC_ORT_FAIL, "qcompile: out of memory");
        k->api = api;
        k->layer = e;
        *kernel = k;
        return NULL;
    }
    snprintf(msg, sizeof msg, "no qcompile layer '%s' in this kernel library (%d layers): the graph and the library "
             "come from different compiles", name, qc_layer_count);
    return qc_ort_error(api, msg);
}

static void* qc_op_create(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
    void* k = NULL;
    OrtStatus* st = qc_op_create_v2(op, api, info, &k);
    if (st) QC_ORT(api, ReleaseStatus, void (*)(OrtStatus*))(st);
    return k;
}

static void qc_op_destroy(void* kernel) { free(kernel); }

/* The kernels' parallel loops run on onnxruntime's intra-op pool (API 17; QCOMPILE_THREADS=own keeps their own
   pool). Measured on the bundled CNN w1a2, 2 Zen 4 cores, best of runs: onnxruntime's pool with its spinning
   workers 0.101 ms at batch 1 and 3.1-3.4 ms at 64; the own pool with onnxruntime's workers asleep 0.110 / 3.2-4.1;
   the own pool next to spinning onnxruntime workers (plain onnxruntime's default) 0.107-0.18 / 4.3-5.2, the two
   pools fighting over the cores. One pool, onnxruntime's, avoids that for every caller. */
typedef OrtStatus* (*qc_parallel_for_fn)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
static qc_parallel_for_fn qc_ort_parallel_for;
typedef struct { qc_task_fn fn; const void* ctx; } qc_ort_job;
typedef struct { const OrtApi* api; OrtKernelContext* kctx; } qc_ort_pool;

static void qc_ort_task(void* job, size_t t) {
    const qc_ort_job* j = (const qc_ort_job*)job;
    j->fn(j->ctx, (int64_t)t);
}

static void qc_ort_run(void* pool, int64_t ntasks, qc_task_fn fn, const void* ctx) {
    const qc_ort_pool* p = (const qc_ort_pool*)pool;
    qc_ort_job job = {fn, ctx};
    OrtStatus* st = qc_ort_parallel_for(p->kctx, qc_ort_task, (size_t)ntasks, 0, &job);
    if (st) {  /* onnxruntime could not run it: run the tasks here (same results) */
        QC_ORT(p->api, ReleaseStatus, void (*)(OrtStatus*))(st);
        for (int64_t t = 0; t < ntasks; ++t) fn(ctx, t);
    }
}

/* The layer on one input: [batch, *in_shape] for convs and pools, [..., K] for a BitGemm (leading axes are rows). */
static OrtStatus* qc_op_compute_v2(void* kernel, OrtKernelContext* ctx) {
    typedef OrtStatus* (*get_input_fn)(const OrtKernelContext*, size_t, const OrtValue**);
    typedef OrtStatus* (*get_output_fn)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    typedef OrtStatus* (*type_shape_fn)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
    typedef OrtStatus* (*dims_count_fn)(const OrtTensorTypeAndShapeInfo*, size_t*);
    typedef OrtStatus* (*dims_fn)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
    typedef OrtStatus* (*data_fn)(OrtValue*, void**);
    const qc_ort_kernel* k = (const qc_ort_kernel*)kernel;
    const OrtApi* api = k->api;
    const qc_layer_entry* e = k->layer;
    const OrtValue* in = NULL;
    OrtStatus* st = QC_ORT(api, KernelContext_GetInput, get_input_fn)(ctx, 0, &in);
    if (st) return st;
    OrtTensorTypeAndShapeInfo* info = NULL;
    if ((st = QC_ORT(api, GetTensorTypeAndShape, type_shape_fn)(in, &info))) return st;
    size_t nd = 0;
    int64_t dims[8];
    st = QC_ORT(api, GetDimensionsCount, dims_count_fn)(info, &nd);
    if (!st && nd <= 8) st = QC_ORT(api, GetDimensions, dims_fn)(info, dims, nd);
    QC_ORT(api, ReleaseTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*))(info);
    if (st) return st;
    int64_t odims[8], batch = 1;
    size_t ond = 0;
    char msg[640];
    if (nd > 8) {
        snprintf(msg, sizeof msg, "qcompile layer '%s': input of rank %zu (at most 8)", e->name, nd);
        return qc_ort_error(api, msg);
    }
    if (e->rows_any) {  /* BitGemm: [..., K] -> [..., N] */
        if (nd < 1 || dims[nd - 1] != e->in_shape[0]) {
            snprintf(msg, sizeof msg, "qcompile layer '%s': input's last axis is %lld, the layer takes K = %lld",
                     e->name, nd ? (long long)dims[nd - 1] : 0LL, (long long)e->in_shape[0]);
            return qc_ort_error(api, msg);
        }
        for (size_t i = 0; i + 1 < nd; ++i) { batch *= dims[i]; odims[ond++] = dims[i]; }
        odims[ond++] = e->out_shape[0];
    } else {            /* BitConv / MaxPoolCodes: [batch, C, H, W] -> [batch, N, Ho, Wo] */
        int ok = nd == (size_t)e->in_ndim + 1;
        for (int i = 0; ok && i < e->in_ndim; ++i) ok = dims[i + 1] == e->in_shape[i];
        if (!ok) {
            snprintf(msg, sizeof msg, "qcompile layer '%s': input of rank %zu or of other sizes than the layer was "
                     "built for (rank %d, per sample [%lld, %lld, %lld])", e->name, nd, e->in_ndim + 1,
                     (long long)e->in_shape[0], (long long)e->in_shape[1], (long long)e->in_shape[2]);
            return qc_ort_error(api, msg);
        }
        batch = dims[0];
        odims[ond++] = batch;
        for (int i = 0; i < e->out_ndim; ++i) odims[ond++] = e->out_shape[i];
    }
    OrtValue* out = NULL;
    if ((st = QC_ORT(api, KernelContext_GetOutput, get_output_fn)(ctx, 0, odims, ond, &out))) return st;
    void *x = NULL, *y = NULL;
    if ((st = QC_ORT(api, GetTensorMutableData, data_fn)((OrtValue*)in, &x))) return st;
    if ((st = QC_ORT(api, GetTensorMutableData, data_fn)(out, &y))) return st;
    if (batch == 0) return NULL;
    qc_ort_pool pool = {api, ctx};
    const char* threads = getenv("QCOMPILE_THREADS");
    const int on_ort = qc_ort_parallel_for && !(threads && strcmp(threads, "own") == 0);
    if (on_ort) qc_thread_pool_hook = (qc_pool_hook){qc_ort_run, &pool};
    const int rc = e->fn((const uint8_t*)x, y, batch);
    if (on_ort) qc_thread_pool_hook = (qc_pool_hook){NULL, NULL};
    if (rc == QC_OK) return NULL;
    snprintf(msg, sizeof msg, rc == QC_ERR_PATH ? "qcompile layer '%s': QCOMPILE_CPU_PATH names a code path this "
             "CPU lacks (unset it or choose avx2/generic)" : "qcompile layer '%s' failed (code %d)", e->name, rc);
    return qc_ort_error(api, msg);
}

static void qc_op_compute(void* kernel, OrtKernelContext* ctx) {
    /* only reached on a runtime that ignores KernelComputeV2 (it then has no way to report errors) */
    OrtStatus* st = qc_op_compute_v2(kernel, ctx);
    if (st) QC_ORT(((const qc_ort_kernel*)kernel)->api, ReleaseStatus, void (*)(OrtStatus*))(st);
}

/* ---- op "Recurrent": a quantized LSTM/GRU layer (templates/layer_rnn.c), ONNX LSTM/GRU's inputs and outputs:
 * X float [seq, batch, input], sequence_lens int32 [batch] (optional), initial_h / initial_c float [dirs, batch,
 * hidden] (optional) -> Y [seq, dirs, batch, hidden], Y_h, Y_c [dirs, batch, hidden] (an LSTM's Y_c; a GRU has two
 * outputs). An absent optional input is an empty name: onnxruntime hands a NULL value for it. */
static const int qc_rnn_in_types[4] = {QC_ONNX_FLOAT, QC_ONNX_INT32, QC_ONNX_FLOAT, QC_ONNX_FLOAT};

typedef struct {
    const OrtApi* api;
    const qc_rnn_entry* layer;
} qc_rnn_kernel;

static const char* qc_rnn_name(const OrtCustomOp* op) { (void)op; return "Recurrent"; }
static int qc_rnn_in_type(const OrtCustomOp* op, size_t i) { (void)op; return qc_rnn_in_types[i < 4 ? i : 0]; }
static size_t qc_rnn_in_count(const OrtCustomOp* op) { (void)op; return 4; }
static int qc_rnn_out_type(const OrtCustomOp* op, size_t i) { (void)op; (void)i; return QC_ONNX_FLOAT; }
static size_t qc_rnn_out_count(const OrtCustomOp* op) { (void)op; return 3; }
static int qc_rnn_in_char(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? 0 : 1; }  /* 1: optional */
static int qc_rnn_out_char(const OrtCustomOp* op, size_t i) { (void)op; return i == 0 ? 0 : 1; }

static OrtStatus* qc_rnn_create_v2(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                   void** kernel) {
    (void)op;
    typedef OrtStatus* (*get_str_fn)(const OrtKernelInfo*, const char*, char*, size_t*);
    char name[512], msg[640];
    size_t size = sizeof name;
    OrtStatus* st = QC_ORT(api, KernelInfoGetAttribute_string, get_str_fn)(info, "layer", name, &size);
    if (st) return st;
    for (int i = 0; i < qc_rnn_count; ++i) {
        if (strcmp(qc_rnn_table[i].name, name) != 0) continue;
        qc_rnn_kernel* k = (qc_rnn_kernel*)malloc(sizeof *k);
        if (!k) return QC_ORT(api, CreateStatus, qc_ort_create_status_fn)(QC_ORT_FAIL, "qcompile: out of memory");
        k->api = api;
        k->layer = &qc_rnn_table[i];
        *kernel = k;
        return NULL;
    }
    snprintf(msg, sizeof msg, "no qcompile recurrent layer '%s' in this kernel library (%d): the graph and the "
             "library come from different compiles", name, qc_rnn_count);
    return qc_ort_error(api, msg);
}

static void* qc_rnn_create(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
    void* k = NULL;
    OrtStatus* st = qc_rnn_create_v2(op, api, info, &k);
    if (st) QC_ORT(api, ReleaseStatus, void (*)(OrtStatus*))(st);
    return k;
}

/* the dims of input i, or nd = 0 and *data = NULL when it is absent */
static OrtStatus* qc_rnn_input(const OrtApi* api, OrtKernelContext* ctx, size_t count, size_t i, int64_t* dims,
                               size_t* nd, void** data) {
    typedef OrtStatus* (*get_input_fn)(const OrtKernelContext*, size_t, const OrtValue**);
    typedef OrtStatus* (*type_shape_fn)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
    typedef OrtStatus* (*dims_count_fn)(const OrtTensorTypeAndShapeInfo*, size_t*);
    typedef OrtStatus* (*dims_fn)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
    typedef OrtStatus* (*data_fn)(OrtValue*, void**);
    *nd = 0;
    *data = NULL;
    if (i >= count) return NULL;
    const OrtValue* v = NULL;
    OrtStatus* st = QC_ORT(api, KernelContext_GetInput, get_input_fn)(ctx, i, &v);
    if (st || !v) return st;
    OrtTensorTypeAndShapeInfo* info = NULL;
    if ((st = QC_ORT(api, GetTensorTypeAndShape, type_shape_fn)(v, &info))) return st;
    st = QC_ORT(api, GetDimensionsCount, dims_count_fn)(info, nd);
    if (!st && *nd > 4) *nd = 5;  /* more than any input takes: the caller refuses it */
    else if (!st) st = QC_ORT(api, GetDimensions, dims_fn)(info, dims, *nd);
    QC_ORT(api, ReleaseTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*))(info);
    if (st) return st;
    return QC_ORT(api, GetTensorMutableData, data_fn)((OrtValue*)v, data);
}

static OrtStatus* qc_rnn_compute_v2(void* kernel, OrtKernelContext* ctx) {
    typedef OrtStatus* (*count_fn)(const OrtKernelContext*, size_t*);
    typedef OrtStatus* (*get_output_fn)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
    typedef OrtStatus* (*data_fn)(OrtValue*, void**);
    const qc_rnn_kernel* k = (const qc_rnn_kernel*)kernel;
    const OrtApi* api = k->api;
    const qc_rnn_entry* e = k->layer;
    char msg[640];
    size_t count = 0, nd[4];
    int64_t dims[4][5];
    void* in[4];
    OrtStatus* st = QC_ORT(api, KernelContext_GetInputCount, count_fn)(ctx, &count);
    for (size_t i = 0; i < 4 && !st; ++i) st = qc_rnn_input(api, ctx, count, i, dims[i], &nd[i], &in[i]);
    if (st) return st;
    const int64_t seq = nd[0] == 3 ? dims[0][0] : -1, batch = nd[0] == 3 ? dims[0][1] : -1;
    if (nd[0] != 3 || dims[0][2] != e->input) {
        snprintf(msg, sizeof msg, "qcompile recurrent layer '%s': X must be [seq, batch, %d] (layout 0)", e->name,
                 (int)e->input);
        return qc_ort_error(api, msg);
    }
    if (in[1] && (nd[1] != 1 || dims[1][0] != batch)) {
        snprintf(msg, sizeof msg, "qcompile recurrent layer '%s': sequence_lens must be [%lld]", e->name,
                 (long long)batch);
        return qc_ort_error(api, msg);
    }
    for (int i = 2; i < 4; ++i)
        if (in[i] && (nd[i] != 3 || dims[i][0] != e->dirs || dims[i][1] != batch || dims[i][2] != e->hidden)) {
            snprintf(msg, sizeof msg, "qcompile recurrent layer '%s': initial_%c must be [%d, %lld, %d]", e->name,
                     i == 2 ? 'h' : 'c', (int)e->dirs, (long long)batch, (int)e->hidden);
            return qc_ort_error(api, msg);
        }
    const int64_t ydims[4] = {seq, e->dirs, batch, e->hidden}, sdims[3] = {e->dirs, batch, e->hidden};
    float* out[3] = {NULL, NULL, NULL};
    const int nout = e->lstm ? 3 : 2;
    for (int i = 0; i < nout; ++i) {
        OrtValue* v = NULL;
        st = QC_ORT(api, KernelContext_GetOutput, get_output_fn)(ctx, (size_t)i, i == 0 ? ydims : sdims,
                                                                 i == 0 ? 4 : 3, &v);
        if (st) return st;
        if (v && (st = QC_ORT(api, GetTensorMutableData, data_fn)(v, (void**)&out[i]))) return st;
    }
    qc_ort_pool pool = {api, ctx};
    const char* threads = getenv("QCOMPILE_THREADS");
    const int on_ort = qc_ort_parallel_for && !(threads && strcmp(threads, "own") == 0);
    if (on_ort) qc_thread_pool_hook = (qc_pool_hook){qc_ort_run, &pool};
    const int rc = e->fn((const float*)in[0], (const int32_t*)in[1], (const float*)in[2], (const float*)in[3],
                         out[0], out[1], out[2], seq, batch);
    if (on_ort) qc_thread_pool_hook = (qc_pool_hook){NULL, NULL};
    if (rc == QC_OK) return NULL;
    if (rc == QC_ERR_LENS)
        snprintf(msg, sizeof msg, "qcompile recurrent layer '%s': a sequence_lens entry is negative or longer than "
                 "the padded length %lld", e->name, (long long)seq);
    else if (rc == QC_ERR_PATH)
        snprintf(msg, sizeof msg, "qcompile recurrent layer '%s': QCOMPILE_CPU_PATH names a code path this CPU "
                 "lacks (unset it or choose avx2/generic)", e->name);
    else
        snprintf(msg, sizeof msg, "qcompile recurrent layer '%s' failed (code %d)", e->name, rc);
    return qc_ort_error(api, msg);
}

static void qc_rnn_compute(void* kernel, OrtKernelContext* ctx) {
    OrtStatus* st = qc_rnn_compute_v2(kernel, ctx);
    if (st) QC_ORT(((const qc_rnn_kernel*)kernel)->api, ReleaseStatus, void (*)(OrtStatus*))(st);
}

/* onnxruntime keeps pointers to the ops for the life of every session registered with them: made once, shared */
static qc_ort_op qc_ort_ops[6];
static int qc_ort_nops;
static OrtCustomOp qc_rnn_op;
static pthread_once_t qc_ort_once = PTHREAD_ONCE_INIT;

static void qc_ort_make_ops(void) {
    for (int i = 0; i < qc_layer_count; ++i) {
        const qc_layer_entry* e = &qc_layer_table[i];
        int j = 0;
        while (j < qc_ort_nops && !(qc_ort_ops[j].in_type == e->in_type && qc_ort_ops[j].out_type == e->out_type))
            ++j;
        if (j < qc_ort_nops || qc_ort_nops == 6) continue;
        qc_ort_op* o = &qc_ort_ops[qc_ort_nops++];
        o->in_type = e->in_type;
        o->out_type = e->out_type;
        snprintf(o->name, sizeof o->name, "Kernel_%s_%s", qc_type_tag(e->in_type), qc_type_tag(e->out_type));
        OrtCustomOp* c = &o->op;
        c->version = QC_ORT_API_VERSION;
        c->CreateKernel = qc_op_create;
        c->GetName = qc_op_name;
        c->GetExecutionProviderType = qc_op_ep;
        c->GetInputType = qc_op_in_type;
        c->GetInputTypeCount = qc_op_one;
        c->GetOutputType = qc_op_out_type;
        c->GetOutputTypeCount = qc_op_one;
        c->KernelCompute = qc_op_compute;
        c->KernelDestroy = qc_op_destroy;
        c->GetInputCharacteristic = qc_op_required;
        c->GetOutputCharacteristic = qc_op_required;
        c->GetInputMemoryType = qc_op_mem_default;
        c->GetVariadicInputMinArity = qc_op_arity;
        c->GetVariadicInputHomogeneity = qc_op_homogeneous;
        c->GetVariadicOutputMinArity = qc_op_arity;
        c->GetVariadicOutputHomogeneity = qc_op_homogeneous;
        c->CreateKernelV2 = qc_op_create_v2;
        c->KernelComputeV2 = qc_op_compute_v2;
    }
    OrtCustomOp* r = &qc_rnn_op;
    r->version = QC_ORT_API_VERSION;
    r->CreateKernel = qc_rnn_create;
    r->GetName = qc_rnn_name;
    r->GetExecutionProviderType = qc_op_ep;
    r->GetInputType = qc_rnn_in_type;
    r->GetInputTypeCount = qc_rnn_in_count;
    r->GetOutputType = qc_rnn_out_type;
    r->GetOutputTypeCount = qc_rnn_out_count;
    r->KernelCompute = qc_rnn_compute;
    r->KernelDestroy = qc_op_destroy;
    r->GetInputCharacteristic = qc_rnn_in_char;
    r->GetOutputCharacteristic = qc_rnn_out_char;
    r->GetInputMemoryType = qc_op_mem_default;
    r->GetVariadicInputMinArity = qc_op_arity;
    r->GetVariadicInputHomogeneity = qc_op_homogeneous;
    r->GetVariadicOutputMinArity = qc_op_arity;
    r->GetVariadicOutputHomogeneity = qc_op_homogeneous;
    r->CreateKernelV2 = qc_rnn_create_v2;
    r->KernelComputeV2 = qc_rnn_compute_v2;
}

/* onnxruntime dlcloses a custom-op library when the session options that registered it go away, but the kernels'
   worker threads live in this library for the life of the process: unloading it under them crashes them (seen: a
   SIGSEGV in qc_worker, and a reload reinitialising the pool's mutex under waiting workers). Loading it again with
   RTLD_NODELETE keeps it mapped whatever onnxruntime closes. */
static void qc_pin_library(void) {
    Dl_info info;
    if (dladdr((void*)&qc_pin_library, &info) && info.dli_fname) dlopen(info.dli_fname, RTLD_NOW | RTLD_NODELETE);
}

QC_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
    static pthread_once_t pinned = PTHREAD_ONCE_INIT;
    pthread_once(&pinned, qc_pin_library);
    const OrtApi* api17 = base->GetApi(17);
    if (api17) qc_ort_parallel_for = QC_ORT(api17, KernelContext_ParallelFor, qc_parallel_for_fn);
    const OrtApi* api = base->GetApi(QC_ORT_API_VERSION);
    if (!api) {
        const OrtApi* old = base->GetApi(1);
        char msg[200];
        snprintf(msg, sizeof msg, "qcompile kernels need onnxruntime's C API %d (onnxruntime >= 1.%d); this "
                 "onnxruntime is %s: upgrade it", QC_ORT_API_VERSION, QC_ORT_API_VERSION, base->GetVersionString());
        return old ? QC_ORT(old, CreateStatus, qc_ort_create_status_fn)(QC_ORT_FAIL, msg) : NULL;
    }
    typedef OrtStatus* (*create_domain_fn)(const char*, OrtCustomOpDomain**);
    typedef OrtStatus* (*domain_add_fn)(OrtCustomOpDomain*, const OrtCustomOp*);
    typedef OrtStatus* (*add_domain_fn)(OrtSessionOptions*, OrtCustomOpDomain*);
    OrtCustomOpDomain* domain = NULL;
    OrtStatus* st = QC_ORT(api, CreateCustomOpDomain, create_domain_fn)("ai.qcompile", &domain);
    if (st) return st;
    pthread_once(&qc_ort_once, qc_ort_make_ops);
    for (int j = 0; j < qc_ort_nops && !st; ++j)
        st = QC_ORT(api, CustomOpDomain_Add, domain_add_fn)(domain, &qc_ort_ops[j].op);
    if (!st && qc_rnn_count) st = QC_ORT(api, CustomOpDomain_Add, domain_add_fn)(domain, &qc_rnn_op);
    if (!st) st = QC_ORT(api, AddCustomOpDomain, add_domain_fn)(options, domain);
    return st;   /* the domain lives as long as the process: sessions made with these options refer to it */
}
