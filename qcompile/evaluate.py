"""Accuracy of float vs quantized models on labelled data, in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import CalibrationError, ModelLoadError
from qcompile.passes.calibrate import session_options


def load_labelled(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An .npz with `x` (uint8 images are scaled by 1/255) and `y` (integer labels)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: data file not found")
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise CalibrationError(f"{path}: needs arrays 'x' and 'y', found {sorted(data.keys())}")
        x, y = data["x"], data["y"].astype(np.int64)
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if len(x) != len(y):
        raise CalibrationError(f"{path}: {len(x)} inputs but {len(y)} labels")
    return x, y


def session(model: str | Path | onnx.ModelProto) -> ort.InferenceSession:
    so = session_options()
    try:
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else Path(model).read_bytes()
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except FileNotFoundError:
        raise ModelLoadError(f"{model}: file not found") from None
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelLoadError(f"{model}: onnxruntime cannot load it: {str(exc).splitlines()[0][:120]}") from None


def predict(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Outputs of an ONNX model (path or proto) in onnxruntime, or of a compiled artifact folder."""
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        from qcompile.runtime import InferenceSession
        sess = InferenceSession(model)
    else:
        sess = session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def compare(float_model, quant_model, x: np.ndarray, y: np.ndarray) -> dict:
    pf, pq = predict(float_model, x).argmax(1), predict(quant_model, x).argmax(1)
    return {"n": int(len(y)), "float_top1": float((pf == y).mean()), "quant_top1": float((pq == y).mean()),
            "agreement": float((pf == pq).mean())}
