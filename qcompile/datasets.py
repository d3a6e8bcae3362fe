"""Offline data: Fashion-MNIST from the Debian package, and the samples and models bundled in models/.

numpy only (no torch): the deployed runtime imports this module.

The one preprocessing used everywhere (training, calibration, evaluation) is `to_float`: x / 255 as float32,
so inputs are in [0, 1] and nonnegative. There is no mean/std normalization.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from qcompile.errors import CalibrationError, QcompileError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

#: Bundled model name -> file name in the models directory.
BUNDLED_MODELS = {"cnn": "fmnist_cnn.onnx", "mlp": "fmnist_mlp.onnx"}

SAMPLE_FILE = "fmnist_sample.npz"
CALIB_FILE = "fmnist_calib.npz"

#: Fashion-MNIST class names, index = label.
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def models_dir() -> Path:
    """The directory of bundled models: $QCOMPILE_MODELS_DIR if set, else models/ at the repo root."""
    env = os.environ.get("QCOMPILE_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "models"


def to_float(x: np.ndarray) -> np.ndarray:
    """THE preprocessing: uint8 pixels -> float32 in [0, 1] (x / 255). No mean/std normalization."""
    return np.asarray(x).astype(np.float32) / np.float32(255.0)


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise QcompileError(f"{path}: cannot read gzip IDX file ({e}); reinstall dataset-fashion-mnist") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise QcompileError(f"{path}: not an unsigned-byte IDX file; reinstall dataset-fashion-mnist")
    ndim = data[3]
    if ndim != expected_ndim:
        raise QcompileError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(shape))
    if len(data) != header + n:
        raise QcompileError(f"{path}: truncated IDX file ({len(data) - header} of {n} bytes); "
                            "reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split from the gzip IDX files.

    Returns (x uint8 [N, 1, 28, 28], y uint8 [N]); N is 60000 for "train" and 10000 for "test".
    `root` defaults to FASHION_MNIST_DIR (read at call time, so it can be monkeypatched).
    """
    if split not in _SPLIT_PREFIX:
        raise QcompileError(f"unknown Fashion-MNIST split {split!r}; use one of: train, test")
    d = Path(root if root is not None else FASHION_MNIST_DIR)
    prefix = _SPLIT_PREFIX[split]
    img_path = d / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = d / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file() or not lbl_path.is_file():
        raise QcompileError(f"Fashion-MNIST not found at {d}; install it with: apt-get install dataset-fashion-mnist")
    x = _read_idx(img_path, 3)
    y = _read_idx(lbl_path, 1)
    if x.shape[0] != y.shape[0]:
        raise QcompileError(f"{d}: {split} split has {x.shape[0]} images but {y.shape[0]} labels")
    return x[:, None, :, :], y


def _load_npz(path, default_name: str) -> dict:
    p = Path(path) if path is not None else models_dir() / default_name
    if not p.is_file():
        raise CalibrationError(f"{p}: bundled data file not found; set QCOMPILE_MODELS_DIR or "
                               "regenerate it with: python models/train_fmnist.py")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{p}: cannot read .npz ({e})") from e


def _check_x(x: np.ndarray, p) -> None:
    if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
        raise CalibrationError(f"{p}: 'x' has shape {x.shape}, expected [N, 1, 28, 28]")
    if x.dtype != np.uint8:
        raise CalibrationError(f"{p}: 'x' has dtype {x.dtype}, expected uint8 pixels (to_float scales them)")


def load_sample(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The bundled evaluation sample (first 1000 test images).

    Returns (x float32 [N, 1, 28, 28] in [0, 1], y int64 [N]).
    """
    z = _load_npz(path, SAMPLE_FILE)
    p = path or models_dir() / SAMPLE_FILE
    if "x" not in z or "y" not in z:
        raise CalibrationError(f"{p}: expected arrays 'x' and 'y', found {sorted(z)}")
    x, y = z["x"], z["y"]
    _check_x(x, p)
    if y.shape != (x.shape[0],):
        raise CalibrationError(f"{p}: 'y' has shape {y.shape}, expected [{x.shape[0]}]")
    return to_float(x), y.astype(np.int64)


def load_calib(path: str | os.PathLike | None = None) -> np.ndarray:
    """The bundled calibration set (512 train images): x float32 [N, 1, 28, 28] in [0, 1]."""
    z = _load_npz(path, CALIB_FILE)
    p = path or models_dir() / CALIB_FILE
    if "x" not in z:
        raise CalibrationError(f"{p}: expected array 'x', found {sorted(z)}")
    x = z["x"]
    _check_x(x, p)
    return to_float(x)


def bundled_model(name: str) -> Path:
    """Path of a bundled ONNX model: "cnn" (fmnist_cnn.onnx) or "mlp" (fmnist_mlp.onnx)."""
    names = ", ".join(BUNDLED_MODELS)
    if name not in BUNDLED_MODELS:
        raise QcompileError(f"unknown bundled model {name!r}; available: {names}")
    p = models_dir() / BUNDLED_MODELS[name]
    if not p.is_file():
        raise QcompileError(f"bundled model {name!r} not found at {p}; available: {names} "
                            "(regenerate with: python models/train_fmnist.py)")
    return p


# --- bundled word-level language models (models/train_lm.py, models/README_lm.md) ---

#: Bundled language model cell -> file name in the models directory.
BUNDLED_LMS = {"lstm": "kjv_lstm_lm.onnx", "gru": "kjv_gru_lm.onnx"}

LM_SAMPLE_FILE = "kjv_lm_sample.npz"
LM_VOCAB_FILE = "kjv_vocab.txt"
LM_META_FILE = "kjv_lm.json"
_LM_REGEN = "regenerate with: python models/train_lm.py (needs apt-get install bible-kjv bible-kjv-text)"


def bundled_lm(cell: str) -> Path:
    """Path of a bundled KJV word-level language model: "lstm" (kjv_lstm_lm.onnx) or "gru" (kjv_gru_lm.onnx).

    Inputs tokens int64 [seq, batch], h0 float32 [1, batch, hidden] (+ c0 for the LSTM); outputs logits
    float32 [seq, batch, vocab], hn (+ cn). Evaluate with qcompile.lm.perplexity.
    """
    names = ", ".join(BUNDLED_LMS)
    if cell not in BUNDLED_LMS:
        raise QcompileError(f"unknown bundled language model {cell!r}; available: {names}")
    p = models_dir() / BUNDLED_LMS[cell]
    if not p.is_file():
        raise QcompileError(f"bundled language model {cell!r} not found at {p}; {_LM_REGEN}")
    return p


def load_lm_sample(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The bundled language-model data: (tokens, calib), both int64 1-D token-id streams.

    tokens: a held-out sample of the test split (about 30k ids); calib: 16384 ids from the train split, for
    calibration. Ids index the lines of kjv_vocab.txt (`load_lm_vocab`).
    """
    p = Path(path) if path is not None else models_dir() / LM_SAMPLE_FILE
    if not p.is_file():
        raise CalibrationError(f"{p}: bundled language-model sample not found; set QCOMPILE_MODELS_DIR or "
                               f"{_LM_REGEN}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{p}: cannot read .npz ({e})") from e
    if "tokens" not in arrays or "calib" not in arrays:
        raise CalibrationError(f"{p}: expected arrays 'tokens' and 'calib', found {sorted(arrays)}")
    out = []
    for k in ("tokens", "calib"):
        a = arrays[k]
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise CalibrationError(f"{p}: {k!r} has shape {a.shape} dtype {a.dtype}, expected 1-D integer ids")
        out.append(a.astype(np.int64))
    return out[0], out[1]


def load_lm_vocab(path: str | os.PathLike | None = None) -> list[str]:
    """The bundled language models' vocabulary: line i of kjv_vocab.txt is token id i (0 <unk>, 1 <eos>)."""
    p = Path(path) if path is not None else models_dir() / LM_VOCAB_FILE
    if not p.is_file():
        raise QcompileError(f"{p}: vocabulary file not found; {_LM_REGEN}")
    return p.read_text(encoding="utf-8").splitlines()
