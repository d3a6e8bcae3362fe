/* ---- layer ${LAYER} (${CNAME}): the BitConv with its MaxPoolCodes folded in (LayerSpec.pool). The x86 SIMD
 * paths run the LUT kernel when it pools its rows itself (codegen.lut_pool_fused); every other path writes the
 * conv's codes [batch, ${N}, ${HO}, ${WO}] into scratch, in chunks of images, and max-pools them from there. ---- */
${EXPORT}(const uint8_t* x, void* y, int64_t batch) {
    if (!x || !y || batch < 0) return QC_ERR_ARG;
    if (batch == 0) return QC_OK;
    const int path = qc_select_path();
    if (path < 0) return QC_ERR_PATH;
${LUT_CALL}    const int64_t in_img = (int64_t)${CNAME}_C * ${CNAME}_H * ${CNAME}_W, conv_img = (int64_t)${N} * ${HO} * ${WO};
    const int64_t out_img = (int64_t)${N} * ${PHO} * ${PWO};
    int64_t chunk = ((int64_t)8 << 20) / conv_img;  /* <= 8 MiB of scratch */
    if (chunk < 1) chunk = 1;
    if (chunk > batch) chunk = batch;
    uint8_t* tmp = (uint8_t*)qc_alloc((size_t)(chunk * conv_img));
    if (!tmp) return QC_ERR_NOMEM;
    int rc = QC_OK;
    for (int64_t b0 = 0; b0 < batch && rc == QC_OK; b0 += chunk) {
        const int64_t bc = batch - b0 < chunk ? batch - b0 : chunk;
        rc = ${CNAME}_conv(x + b0 * in_img, tmp, bc);
        if (rc == QC_OK) rc = ${CNAME}_p_run(tmp, (uint8_t*)y + b0 * out_img, bc);
    }
    free(tmp);
    return rc;
}
