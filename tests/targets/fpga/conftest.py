"""Shared fixtures of the FPGA HLS / folding tests: the bundled models' fused layer chains as the fpga target sees
them (folded pools and input quantizers), compiled once per session."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def bundled_specs(model: str, config: str):
    import onnx_ir as ir

    from qcompile import api, datasets
    from qcompile.artifact import _first_calibration_batch, layer_specs, specialize_shapes
    from qcompile.input_quant import fold_input_quantizers
    from qcompile.passes.fuse import DOMAIN, FuseBitKernels

    result = api.compile(datasets.bundled_model(model), config=config, calib=datasets.load_calib()[:64])
    fixed, _, symbolic = specialize_shapes(result.model, _first_calibration_batch(result.ctx.calib), result.ctx.layers)
    fused = ir.from_proto(fixed)
    FuseBitKernels(set(result.ctx.layers) - set(symbolic))(fused, result.ctx)
    proto = ir.to_proto(fused)
    return tuple(fold_input_quantizers(proto, layer_specs(proto, fixed, fold_pools=True), DOMAIN)[1])


@pytest.fixture
def specs_of():
    return bundled_specs
