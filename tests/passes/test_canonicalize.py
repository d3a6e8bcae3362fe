import numpy as np
import onnx_ir as ir

from graphs import tiny_inputs
from qcompile.config import resolve_config
from qcompile.evaluate import predict
from qcompile.passes.canonicalize import FoldBatchNorm, RemoveNoOps, canonicalize_passes
from qcompile.passes.load import load_model
from qcompile.passes.pipeline import CompileContext, run_pipeline


def _canonical(path):
    proto = load_model(path)
    model = ir.from_proto(proto)
    ctx = CompileContext(resolve_config("w2a2"))
    run_pipeline(model, canonicalize_passes(), ctx, verify_each=True)
    return proto, model, ctx


def test_batchnorm_dropout_identity_are_gone_and_outputs_unchanged(tiny_model_path):
    proto, model, ctx = _canonical(tiny_model_path)
    ops = [n.op_type for n in model.graph]
    assert "BatchNormalization" not in ops and "Dropout" not in ops and "Identity" not in ops
    assert ops.count("Conv") == 3 and ops.count("Gemm") == 2
    x = tiny_inputs()
    np.testing.assert_allclose(predict(ir.to_proto(model), x), predict(proto, x), rtol=1e-4, atol=1e-5)
    assert {r.name: r.modified for r in ctx.records}["fold_batchnorm"]


def test_canonicalize_is_idempotent(tiny_model_path):
    _, model, _ = _canonical(tiny_model_path)
    ctx = CompileContext(resolve_config("w2a2"))
    assert not FoldBatchNorm()(model, ctx)
    assert not RemoveNoOps()(model, ctx)


def test_output_names_survive(tiny_model_path):
    _, model, _ = _canonical(tiny_model_path)
    assert [o.name for o in model.graph.outputs] == ["logits"]
