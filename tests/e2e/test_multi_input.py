"""Models with several inputs (features + an integer mask): calibration, compile, run, eval, bench."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from graphs import gemm_stack
from qcompile import api
from qcompile.cli import main
from qcompile.errors import CalibrationError
from qcompile.evaluate import predict
from qcompile.runtime import InferenceSession


def two_input_model(path):
    """x [N,16] float and mask [N,16] int64 -> x * mask -> four Gemm layers (the middle two are quantized)."""
    inits, nodes, prev = gemm_stack("h0", [16, 32, 32, 32, 4], 2.0, [("Relu", {})] * 3, np.random.default_rng(0))
    nodes = [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["x", "maskf"], ["h0"], name="masked"), *nodes]
    graph = helper.make_graph(nodes, "two_inputs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
                               helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 16])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 16), dtype=np.float32), "mask": rng.integers(0, 2, (n, 16)).astype(np.int64)}


def test_two_inputs_calibrate_compile_run_eval_bench(tmp_path):
    model = two_input_model(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **feeds(64))
    result = api.compile(model, config="w2a2", calib=str(tmp_path / "calib.npz"), target="cpu")
    assert set(result.ctx.layers) == {"fc1", "fc2"}
    result.save(tmp_path / "art")
    f = feeds(7, seed=1)
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, f)[0], predict(result.model, f))
    # the same through the CLI: eval with one array per input name, run with NAME=FILE, bench
    y = predict(result.float_model, f).argmax(1)
    np.savez(tmp_path / "data.npz", y=y, **f)
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(model), str(tmp_path / "art"), "--data", str(tmp_path / "data.npz")])
    assert res.exit_code == 0 and "float top-1 100.00%" in res.output, res.output
    for k, v in f.items():
        np.save(tmp_path / f"{k}.npy", v)
    res = runner.invoke(main, ["run", str(tmp_path / "art"), "--input", f"x={tmp_path / 'x.npy'}",
                               "--input", f"mask={tmp_path / 'mask.npy'}"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["bench", str(tmp_path / "art"), "--batch", "4", "--runs", "2", "--json"])
    assert res.exit_code == 0, res.output


def test_calibration_names_must_match_the_inputs(tmp_path):
    model = two_input_model(tmp_path / "m.onnx")
    f = feeds(16)
    np.savez(tmp_path / "wrong.npz", x=f["x"], attention=f["mask"])
    with pytest.raises(CalibrationError, match=r"missing \['mask'\]; not model inputs \['attention'\]"):
        api.compile(model, config="w2a2", calib=str(tmp_path / "wrong.npz"))
    np.savez(tmp_path / "float_mask.npz", x=f["x"], mask=f["mask"].astype(np.float32))
    with pytest.raises(CalibrationError, match="'mask' is float32; the model expects int64"):
        api.compile(model, config="w2a2", calib=str(tmp_path / "float_mask.npz"))
    with pytest.raises(CalibrationError, match="give one array per input name"):
        api.compile(model, config="w2a2", calib=f["x"])
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(tmp_path / "wrong.npz"),
                                    "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and not (tmp_path / "o").exists()
