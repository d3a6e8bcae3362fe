"""Accuracy of float vs quantized models on labelled data, in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import CalibrationError, ModelLoadError
from qcompile.passes.calibrate import session_options


def load_labelled(path: str | Path):
    """An .npz with `y` (integer labels) and the inputs: `x` for a one-input model (uint8 images are scaled by 1/255),
    else one array per model input name. Returns (x or {name: array}, y)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: data file not found")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.keys()}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if "y" not in arrays or len(arrays) < 2:
        raise CalibrationError(f"{path}: needs 'y' and the inputs ('x', or one array per input name), found "
                               f"{sorted(arrays)}")
    y = arrays.pop("y").astype(np.int64)
    scale = {k: (v.astype(np.float32) / 255.0 if v.dtype == np.uint8 else v) for k, v in arrays.items()}
    x = scale["x"] if set(scale) == {"x"} else scale
    for name, v in scale.items():
        if len(v) != len(y):
            raise CalibrationError(f"{path}: {len(v)} samples of '{name}' but {len(y)} labels")
    return x, y


def feeds_for(inputs, x, where: str) -> list[dict]:
    """Name the arrays for a session's inputs: one array for a one-input model, else a dict with every name."""
    names = [i.name for i in inputs]
    if not isinstance(x, dict):
        if len(names) != 1:
            raise CalibrationError(f"{where}: the model has inputs {names}; give one array per input name")
        return {names[0]: x}
    if len(names) == 1 and set(x) == {"x"}:
        return {names[0]: x["x"]}
    missing, extra = sorted(set(names) - set(x)), sorted(set(x) - set(names))
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"not model inputs {extra}"] if extra else [])
        raise CalibrationError(f"{where}: {'; '.join(parts)}; the model's inputs are {names}")
    return {n: x[n] for n in names}


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
    feeds = feeds_for(sess.get_inputs(), x, str(model) if isinstance(model, (str, Path)) else "model")
    n = next((len(v) for v in feeds.values() if np.ndim(v) > 0), 1)   # 0-d inputs (a rate) go with every batch
    outs = [sess.run(None, {k: v[i:i + batch] if np.ndim(v) > 0 else v for k, v in feeds.items()})[0]
            for i in range(0, n, batch)]
    return np.concatenate(outs)


def compare(float_model, quant_model, x: np.ndarray, y: np.ndarray) -> dict:
    pf, pq = predict(float_model, x).argmax(1), predict(quant_model, x).argmax(1)
    return {"n": int(len(y)), "float_top1": float((pf == y).mean()), "quant_top1": float((pq == y).mean()),
            "agreement": float((pf == pq).mean())}
