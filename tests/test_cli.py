import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphs import tiny_cnn, tiny_inputs
from qcompile.cli import main


@pytest.fixture
def files(tmp_path, tiny_model_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=tiny_inputs(32, 3))
    data = tmp_path / "data.npz"
    np.savez(data, x=tiny_inputs(40, 4), y=np.arange(40) % 10)
    return tiny_model_path, calib, data


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_compile_inspect_eval(tmp_path, files):
    model, calib, data = files
    out = tmp_path / "out"
    res = run("compile", model, "--config", "w2a2", "--quantizer", "uniform", "--calib", calib, "-o", out)
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").is_file() and (out / "report.md").is_file()
    assert "conv2" in res.output
    res = run("inspect", model, "--json")
    rows = json.loads(res.output)
    assert {r["node"] for r in rows} >= {"conv1", "conv2", "fc2"}
    res = run("eval", out / "float.onnx", out / "model.onnx", "--data", data, "--json")
    acc = json.loads(res.output)
    assert acc["n"] == 40 and 0 <= acc["agreement"] <= 1


def test_compile_target_run_bench(tmp_path, files):
    model, calib, _ = files
    art = tmp_path / "art"
    assert run("compile", model, "--config", "w1a2", "--calib", calib, "--target", "cpu", "-o", art).exit_code == 0
    x = tmp_path / "x.npy"
    np.save(x, tiny_inputs(3))
    res = run("run", art, "--input", x, "-o", tmp_path / "y.npz")
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "y.npz")["logits"].shape == (3, 10)
    res = run("eval", art / "float.onnx", art, "--data", files[2], "--json")
    deployed = json.loads(res.output)
    res = run("eval", art / "float.onnx", art / "model.onnx", "--data", files[2], "--json")
    assert json.loads(res.output) == deployed  # the deployed kernels score exactly what the fake-quant model does
    res = run("bench", art, "--batch", "4", "--runs", "3", "--json")
    engines = {r["engine"] for r in json.loads(res.output[res.output.index("["):])}
    assert {"qcompile (artifact)", "onnxruntime fp32", "onnxruntime int8 (quantize_static)"} <= engines
    res = run("bench", art, "--input", x, "--runs", "3", "--json")   # timed on the user's inputs
    rows = json.loads(res.output[res.output.index("["):])
    assert rows[0]["images_per_s"] > 0 and len(rows) == 4
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 1, 12, 13), np.float32))
    res = CliRunner().invoke(main, ["bench", str(art), "--input", str(bad), "--runs", "2"])
    lines = [line for line in res.output.strip().splitlines() if line]
    assert res.exit_code == 1 and len(lines) == 1 and "input 'input': shape [2, 1, 12, 13]" in lines[0], res.output


def test_corrupt_model_exits_1_with_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(onnx.ModelProto().SerializeToString()[:0] + b"\x08\x07garbage")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["compile", str(bad), "-o", str(out)])
    assert res.exit_code == 1
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.onnx" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_bad_calibration_writes_nothing(tmp_path, files):
    model, _, _ = files
    calib = tmp_path / "wrong.npz"
    np.savez(calib, x=np.zeros((4, 3, 12, 12), np.float32))
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "has shape [4, 3, 12, 12]" in res.output
    assert not (tmp_path / "o").exists()


def test_output_folder_may_not_swallow_the_input(tmp_path, files):
    model, calib, _ = files
    before = model.read_bytes()
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "-o", str(model.parent)])
    assert res.exit_code == 1 and "would overwrite the input" in res.output
    assert model.read_bytes() == before


def test_recompile_replaces_output_atomically(tmp_path, files):
    model, calib, _ = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run("compile", model, "--calib", calib, "-o", out).exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()


def test_help_everywhere():
    for cmd in ([], ["compile"], ["inspect"], ["eval"], ["run"], ["bench"], ["demo"]):
        assert run(*cmd, "--help").exit_code == 0


def test_unknown_op_stays_float_and_is_reported(tmp_path):
    """An op qcompile cannot quantize never fails the compile."""
    model = tiny_cnn()
    for node in model.graph.node:
        if node.name == "relu3":
            node.op_type = "Softplus"
    path = tmp_path / "soft.onnx"
    onnx.save(model, path)
    res = run("inspect", path, "--json")
    rows = {r["node"]: r for r in json.loads(res.output)}
    assert rows["relu3"]["status"] == "float" and rows["relu3"]["why"]
    res = run("compile", path, "-o", tmp_path / "o")
    assert res.exit_code == 0


def test_missing_c_compiler_is_one_clear_line(tmp_path, files, monkeypatch):
    model, calib, _ = files
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))  # no cached kernel core to fall back on
    res = CliRunner().invoke(main, ["compile", str(model), "--calib", str(calib), "--target", "cpu",
                                    "-o", str(tmp_path / "art")])
    assert res.exit_code == 1
    assert "C compiler" in res.output and "not found" in res.output and "install" in res.output
    assert not (tmp_path / "art").exists()


def test_an_unexpected_exception_is_one_line_and_debug_shows_the_traceback(tmp_path, files, monkeypatch):
    """A bug is still one line (exit 2) naming the command and file; --debug re-raises it."""
    from qcompile import api

    model, calib, _ = files

    def broken(*args, **kwargs):
        raise IndexError("list index out of range\nsecond line")

    monkeypatch.setattr(api, "compile", broken)
    args = ["compile", str(model), "--calib", str(calib), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "internal error in `qcompile compile`" in res.output
    assert str(model) in res.output and "IndexError" in res.output and "--debug" in res.output
    res = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(res.exception, IndexError)


def test_an_op_of_an_unknown_domain_is_named_in_one_line(tmp_path, files):
    """onnxruntime cannot run a custom op without its library: calibration and the artifact's partitions say which."""
    from onnx import helper

    _, calib, _ = files
    model = tiny_cnn()
    for i, node in enumerate(model.graph.node):
        if node.name == "relu1":
            out, node.output[0] = node.output[0], "relu1_raw"
            model.graph.node.insert(i + 1, helper.make_node("MyOp", ["relu1_raw"], [out], domain="com.example",
                                                            name="custom"))
            break
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    for extra in (["--calib", str(calib)], ["--target", "cpu"]):
        res = CliRunner().invoke(main, ["compile", str(path), *extra, "-o", str(tmp_path / "o")])
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert "node 'custom' (com.example:MyOp)" in res.output
        assert not (tmp_path / "o").exists()
