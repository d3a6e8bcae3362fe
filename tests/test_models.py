"""The bundled models and data in models/, and the offline loaders in qcompile.datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from qcompile import datasets  # noqa: E402
from qcompile.errors import CalibrationError, QcompileError  # noqa: E402

MIN_SAMPLE_ACCURACY = {"cnn": 0.88, "mlp": 0.85}


@pytest.fixture(scope="module")
def sample():
    return datasets.load_sample()


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_bundled_model_is_valid_self_contained_onnx_with_bn(name):
    path = datasets.bundled_model(name)
    assert path.name == f"fmnist_{name}.onnx"
    assert path.stat().st_size < 8 * 1024 * 1024
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    for t in model.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, f"{t.name} is stored as external data"
        assert not t.external_data
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" in ops
    assert "Identity" not in ops
    opset = {o.domain: o.version for o in model.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    if name == "cnn":
        assert ops.count("Conv") == 4 and ops.count("MaxPool") == 3 and ops.count("BatchNormalization") == 5
    else:
        assert ops.count("Gemm") == 4 and ops.count("BatchNormalization") == 3


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_bundled_model_accuracy_on_sample(name, sample):
    x, y = sample
    sess = ort.InferenceSession(str(datasets.bundled_model(name)), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    assert logits.shape == (len(x), 10) and logits.dtype == np.float32
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= MIN_SAMPLE_ACCURACY[name], f"{name}: accuracy {acc:.4f} on the bundled sample"
    # dynamic batch axis
    assert sess.run(["logits"], {"input": x[:3]})[0].shape == (3, 10)


def test_load_sample_shapes_and_dtypes(sample):
    x, y = sample
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (1000,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
    assert set(np.unique(y)) <= set(range(10))


def test_sample_is_first_1000_test_images():
    if not (Path(datasets.FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    x, y = datasets.load_sample()
    xt, yt = datasets.load_fashion_mnist("test")
    assert xt.shape == (10000, 1, 28, 28) and xt.dtype == np.uint8 and yt.shape == (10000,) and yt.dtype == np.uint8
    np.testing.assert_array_equal(y, yt[:1000])
    np.testing.assert_array_equal(x, datasets.to_float(xt[:1000]))


def test_load_calib():
    x = datasets.load_calib()
    assert x.shape == (512, 1, 28, 28) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_to_float():
    out = datasets.to_float(np.array([0, 51, 255], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.2, 1.0])


def test_missing_fashion_mnist_dir_error(monkeypatch, tmp_path):
    missing = tmp_path / "nope"
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(missing))
    with pytest.raises(QcompileError) as e:
        datasets.load_fashion_mnist("train")
    msg = str(e.value)
    assert str(missing) in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_unknown_split():
    with pytest.raises(QcompileError, match="split"):
        datasets.load_fashion_mnist("val")


def test_unknown_bundled_model_lists_names():
    with pytest.raises(QcompileError, match="cnn, mlp"):
        datasets.bundled_model("resnet")


def test_models_dir_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("QCOMPILE_MODELS_DIR", str(tmp_path))
    assert datasets.models_dir() == tmp_path
    with pytest.raises(QcompileError, match="not found"):
        datasets.bundled_model("cnn")
    with pytest.raises(CalibrationError, match="not found"):
        datasets.load_sample()
    x = (np.arange(2 * 784) % 256).astype(np.uint8).reshape(2, 1, 28, 28)
    np.savez_compressed(tmp_path / "fmnist_sample.npz", x=x, y=np.array([3, 7], dtype=np.uint8))
    np.savez_compressed(tmp_path / "fmnist_calib.npz", x=x)
    xs, ys = datasets.load_sample()
    assert xs.dtype == np.float32 and ys.tolist() == [3, 7]
    assert datasets.load_calib().shape == (2, 1, 28, 28)


def test_bad_npz_rejected(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez_compressed(p, x=np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(CalibrationError, match="shape"):
        datasets.load_calib(p)
    np.savez_compressed(p, x=np.zeros((4, 1, 28, 28), dtype=np.float32))
    with pytest.raises(CalibrationError, match="uint8"):
        datasets.load_calib(p)


def test_datasets_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, qcompile.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_per_layer_bits_from_the_toml(tmp_path):
    """[layers] in a .toml: node-name globs -> a preset or {bits_w, bits_a}; the first match wins."""
    from qcompile import api, datasets
    from qcompile.config import resolve_config
    from qcompile.errors import ConfigError

    toml = tmp_path / "mixed.toml"
    toml.write_text('preset = "w2a2"\n[layers]\n"/3/Conv" = "w8a8"\n"*Gemm*" = {bits_w = 1, bits_a = 4}\n')
    cfg = resolve_config(str(toml))
    assert cfg.layer_bits == (("/3/Conv", 8, 8), ("*Gemm*", 1, 4))
    result = api.compile(datasets.bundled_model("cnn"), config=str(toml), calib=datasets.load_calib(), target="cpu")
    bits = {n: (q.bits_w, q.bits_a) for n, q in result.ctx.layers.items()}
    assert bits == {"/3/Conv": (8, 8), "/7/Conv": (2, 2), "/11/Conv": (2, 2), "/16/Gemm": (1, 4)}
    result.save(tmp_path / "art")
    from qcompile.evaluate import predict
    from qcompile.runtime import InferenceSession

    x = datasets.load_sample()[0][:20]
    np.testing.assert_array_equal(InferenceSession(tmp_path / "art").run(None, {"input": x})[0],
                                  predict(result.model, x))
    bad = tmp_path / "bad.toml"
    bad.write_text('[layers]\n"x" = "w9a9"\n')
    with pytest.raises(ConfigError, match="not a preset"):
        resolve_config(str(bad))
