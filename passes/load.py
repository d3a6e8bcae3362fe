"""Load and check an ONNX model: every way a file can be bad gets one line naming it and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompile.errors import ModelLoadError, QuantizationError

MIN_OPSET, MAX_OPSET = 11, 25   # default-domain opsets we accept (converted to WORK_OPSET)
WORK_OPSET = 21                  # INT4/UINT4 DequantizeLinear runs in onnxruntime from opset 21


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read, check and shape-infer; convert to WORK_OPSET. Never writes to `path`."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; pass the .onnx file")
    data = path.read_bytes()
    if not data:
        raise ModelLoadError(f"{path}: empty file; re-export the model")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX file (truncated or corrupt?): {str(exc)[:80]}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph); is this the right file?")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{path}: external weight data missing ({exc}); keep the .data file "
                                     "next to the model") from None
            break
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelLoadError(f"{path}: opset {opset} unsupported (need {MIN_OPSET}-{MAX_OPSET}); "
                             "re-export with a supported opset_version")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ModelLoadError(f"{path}: ONNX checker failed: {first}") from None
    if opset != WORK_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, WORK_OPSET)
        except Exception as exc:  # the converter raises bare RuntimeErrors with C++ text
            raise ModelLoadError(f"{path}: cannot convert opset {opset} to {WORK_OPSET}: "
                                 f"{str(exc).splitlines()[0][:120]}") from None
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        first_error = exc
    # Exporters sometimes leave stale shapes (value_info or a declared output shape from before a rewrite) that
    # contradict what the ops compute; onnxruntime only warns, so drop them and infer from the ops before giving up.
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.value_info[:]
    for out in stripped.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(stripped, strict_mode=True, data_prop=True)
    except Exception:
        raise ModelLoadError(f"{path}: shape inference failed: {str(first_error).splitlines()[0][:160]}") from None


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelLoadError("model imports no default-domain opset; is this an ONNX model?")


def check_weights_finite(model: ir.Model) -> None:
    """NaN in any float initializer makes every downstream number meaningless: refuse early. +-Inf is legal
    in constants (attention masks, clip bounds); in a quantized layer's weights the quantizer refuses it."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            continue
        arr = tensor.numpy()
        if np.isnan(arr).any():
            users = ", ".join(sorted({u.node.name or u.node.op_type for u in value.uses()})) or "no node"
            raise QuantizationError(f"initializer '{name}' (used by {users}) contains NaN; "
                                    "fix or retrain the model before compiling")


def parse_fixed_inputs(items) -> dict[str, list[float]]:
    """--fix-input NAME=VALUE[,VALUE...] -> {name: [values]}; one ConfigError per malformed item."""
    from qcompile.errors import ConfigError

    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        try:
            values = [float(v) for v in text.split(",")] if sep and name else None
        except ValueError:
            values = None
        if not values:
            raise ConfigError(f"--fix-input '{item}': expected NAME=VALUE or NAME=V1,V2,... (e.g. sr=16000)")
        out[name] = values
    return out


def fix_inputs(model: ir.Model, values: dict, source: str) -> dict[str, np.ndarray]:
    """Turn graph inputs into constants (a sample rate, a mode flag), so constant folding can resolve the If
    branches and shapes that depend on them; returns {name: array} as fixed. The model then has those inputs no more."""
    from qcompile.errors import ConfigError

    inputs = {v.name: v for v in model.graph.inputs}
    fixed = {}
    for name, raw in values.items():
        value = inputs.get(name)
        if value is None:
            raise ConfigError(f"{source}: --fix-input '{name}': no such model input; the inputs are {sorted(inputs)}")
        dtype = ir.DataType(value.type.dtype).numpy() if value.type is not None else np.dtype(np.float32)
        arr = np.asarray(raw, dtype=np.float64)
        shape = value.shape
        dims = [d if isinstance(d, int) else None for d in shape] if shape is not None else None
        if dims is not None and None not in dims:
            if int(np.prod(dims)) != arr.size:
                raise ConfigError(f"{source}: --fix-input '{name}': {arr.size} value(s) given, the input has shape "
                                  f"{dims} ({int(np.prod(dims))} values)")
            arr = arr.reshape(dims)
        elif dims is not None and len(dims) == 0:
            arr = arr.reshape(())
        if np.issubdtype(dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
            raise ConfigError(f"{source}: --fix-input '{name}': the input is {dtype.name}; give whole numbers")
        arr = arr.astype(dtype)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(arr, name=name)
        model.graph.register_initializer(value)
        fixed[name] = arr
    return fixed


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(model)
