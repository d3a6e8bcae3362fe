/* ---- library entry points (runtime/kernels.py) ---- */
static const char qc_manifest_json[] = "${MANIFEST}";

/* JSON: abi, qcompile version, and per layer its symbol, op, shapes and output dtype */
QC_EXPORT const char* qc_manifest(void) { return qc_manifest_json; }
QC_EXPORT int qc_abi_version(void) { return ${ABI}; }
/* the path a call would take now (QCOMPILE_CPU_PATH honoured): 0 generic, 1 avx2, 2 avx512, -1 unavailable */
QC_EXPORT int qc_selected_path(void) { return qc_select_path(); }
QC_EXPORT int qc_path_available(int path) { return qc_path_supported(path); }
QC_EXPORT int qc_threads(void) { return qc_num_threads(); }
