"""QONNX export (targets/fpga/qonnx_export.py): the exported graph, run by the qonnx package's own executor, equals
qcompile's fake-quant model in onnxruntime: every activation code exactly, and (since the integer products are exact
and the float epilogues are the same ops) the logits too."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile import api, datasets
from qcompile.errors import ArtifactError
from qcompile.targets.fpga.qonnx_export import QONNX_DOMAIN, export_qonnx

qonnx = pytest.importorskip("qonnx", reason="qonnx not installed (pip install qonnx)")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

BATCH = 8


def _fakequant_values(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = ort.InferenceSession(m.SerializeToString())
    out = sess.run(names, {sess.get_inputs()[0].name: x})
    return dict(zip(names, out))


def _layer_inputs(graph, weight_ops: set) -> list[str]:
    """The activation input of each Gemm/Conv whose weights come from one of ``weight_ops``, in graph order."""
    producer = {o: n for n in graph.node for o in n.output}
    return [n.input[0] for n in graph.node if n.op_type in ("Gemm", "Conv") and len(n.input) > 1
            and n.input[1] in producer and producer[n.input[1]].op_type in weight_ops]


@pytest.mark.parametrize("model_name,config,form", [("mlp", "w1a1", "quant"), ("mlp", "w1a2", "quant"),
                                                    ("cnn", "w1a2", "quant"), ("mlp", "w1a2", "thresholds"),
                                                    ("cnn", "w1a1", "thresholds")])
def test_qonnx_execution_equals_fakequant(model_name, config, form, tmp_path):
    result = api.compile(datasets.bundled_model(model_name), config=config, calib=datasets.load_calib()[:64])
    path = tmp_path / "model.qonnx.onnx"
    counts = export_qonnx(result, path, form=form)
    exported = onnx.load(path)
    ops = {n.op_type for n in exported.graph.node if n.domain == QONNX_DOMAIN}
    assert {"Quant", "BipolarQuant"} <= ops and (form == "quant" or "MultiThreshold" in ops), counts
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in exported.graph.node}
    assert not any(n.domain == "ai.qcompile" for n in exported.graph.node)

    x = datasets.load_calib()[100:100 + BATCH].copy()
    code_names = _layer_inputs(result.model.graph, {"DequantizeLinear"})  # each quantized layer's input codes
    want = _fakequant_values(result.model, x, [result.model.graph.output[0].name] + code_names)

    clean = cleanup_model(ModelWrapper(str(path)), override_inpsize=BATCH)
    got = execute_onnx(clean, {clean.graph.input[0].name: x}, return_full_exec_context=True)
    # logits: the integer products are exact in float32 and the float epilogues are the same ops -> bit-equal
    np.testing.assert_array_equal(got[clean.graph.output[0].name], want[result.model.graph.output[0].name])
    # codes: exactly equal, layer by layer (cleanup renames tensors, so layers are matched in graph order)
    layer_inputs = _layer_inputs(clean.graph, {"Quant", "BipolarQuant"})
    assert len(layer_inputs) == len(code_names) >= 2
    for name, out in zip(code_names, layer_inputs):
        assert want[name].max() >= 1
        np.testing.assert_array_equal(got[out], want[name], err_msg=f"{form}: {name}")


def test_float_model_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="fake-quant"):
        export_qonnx(datasets.bundled_model("mlp"), tmp_path / "x.onnx")
    with pytest.raises(ArtifactError, match="no such file"):
        export_qonnx(tmp_path / "missing.onnx", tmp_path / "x.onnx")


def test_cli_export_qonnx(tmp_path):
    from click.testing import CliRunner

    from qcompile.cli import main

    result = api.compile(datasets.bundled_model("mlp"), config="w1a1", calib=datasets.load_calib()[:64])
    result.save(tmp_path / "out")
    run = CliRunner().invoke(main, ["export-qonnx", str(tmp_path / "out"), "-o", str(tmp_path / "m.onnx")])
    assert run.exit_code == 0, run.output
    assert "BipolarQuant" in run.output and (tmp_path / "m.onnx").is_file()
    bad = CliRunner().invoke(main, ["export-qonnx", str(datasets.bundled_model("mlp")), "-o", str(tmp_path / "f.onnx")])
    assert bad.exit_code == 1 and "error: no qcompile quantizer" in bad.output
