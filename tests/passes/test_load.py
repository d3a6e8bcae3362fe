import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import tiny_cnn
from qcompile.errors import ModelLoadError, QuantizationError
from qcompile.passes.load import WORK_OPSET, check_weights_finite, default_opset, load_model, to_ir


def test_loads_and_converts_to_work_opset(tiny_model_path):
    model = load_model(tiny_model_path)
    assert default_opset(model) == WORK_OPSET
    assert any(v.name == "relu1.y" for v in model.graph.value_info)  # shape inference ran


@pytest.mark.parametrize("content,needle", [
    (b"", "empty file"),
    (b"this is not a protobuf at all \xff\xfe", "not a valid ONNX file"),
])
def test_bad_bytes_name_the_file(tmp_path, content, needle):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=needle) as err:
        load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_model(tmp_path, tiny_model_path):
    data = tiny_model_path.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="file not found"):
        load_model(tmp_path / "nope.onnx")


def test_unsupported_opset(tmp_path):
    model = tiny_cnn()
    model.opset_import[0].version = 7
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="opset 7 unsupported"):
        load_model(path)


def test_nan_weight_names_the_initializer_and_node(tmp_path):
    model = tiny_cnn()
    for i, init in enumerate(model.graph.initializer):
        if init.name == "conv2.w":
            arr = numpy_helper.to_array(init).copy()
            arr.flat[3] = np.nan
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, "conv2.w"))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    with pytest.raises(QuantizationError, match=r"'conv2.w' \(used by conv2\) contains NaN"):
        check_weights_finite(to_ir(load_model(path)))


def test_input_file_is_never_modified(tiny_model_path):
    before = tiny_model_path.read_bytes()
    load_model(tiny_model_path)
    assert tiny_model_path.read_bytes() == before


def test_infinite_constants_are_legal_outside_quantized_weights(tmp_path):
    """-inf as a mask or clip bound is what exporters write (magika's Maximum with -inf): only NaN is refused."""
    model = tiny_cnn()
    model.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, np.float32), "floor"))
    last = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Max", [last, "floor"], ["clamped"], name="clamp"))
    model.graph.output[0].name = "clamped"
    path = tmp_path / "inf.onnx"
    onnx.save(model, path)
    check_weights_finite(to_ir(load_model(path)))


def test_a_stale_declared_output_shape_is_inferred_again(tmp_path):
    """An exporter's output shape that contradicts the ops (ddddocr declares rank 2 for a rank-3 output, which
    onnxruntime only warns about) must not stop the load: shapes are inferred from the ops."""
    model = tiny_cnn()
    dims = model.graph.output[0].type.tensor_type.shape
    del dims.dim[:]
    for size in (1, 2, 3):
        dims.dim.add().dim_value = size
    path = tmp_path / "stale.onnx"
    onnx.save(model, path, )
    loaded = load_model(path)
    assert [d.dim_value for d in loaded.graph.output[0].type.tensor_type.shape.dim][1:] == [10]
