/* ---- library entry points (runtime/kernels.py) ---- */
static const char qc_manifest_json[] = "${MANIFEST}";

/* JSON: abi, qcompile version, and per layer its symbol, op, shapes and output dtype */
QC_EXPORT const char* qc_manifest(void) { return qc_manifest_json; }
QC_EXPORT int qc_abi_version(void) { return ${ABI}; }
/* the path a call would take now (QCOMPILE_CPU_PATH honoured): 0 generic, 1 avx2, 2 avx512, -1 unavailable */
QC_EXPORT int qc_selected_path(void) { return qc_select_path(); }
QC_EXPORT int qc_path_available(int path) { return qc_path_supported(path); }
QC_EXPORT int qc_threads(void) { return qc_num_threads(); }

#include <time.h>
/* best of `reps` calls of the layer named `name`, in ns, timed in here: what a call costs inside a deployed
 * onnxruntime session, without the Python call around Library.run (bench/bench_kernels.py reports both).
 * -1: no such layer; -2: the layer failed. */
QC_EXPORT int64_t qc_time_layer(const char* name, const uint8_t* x, void* y, int64_t batch, int reps) {
    for (int i = 0; i < qc_layer_count; ++i) {
        if (strcmp(qc_layer_table[i].name, name) != 0) continue;
        int64_t best = INT64_MAX;
        if (qc_layer_table[i].fn(x, y, batch) != 0) return -2;
        for (int r = 0; r < reps; ++r) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            qc_layer_table[i].fn(x, y, batch);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            const int64_t ns = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
            if (ns < best) best = ns;
        }
        return best;
    }
    return -1;
}
