"""Calibration data readers, shaped like onnxruntime.quantization.CalibrationDataReader (get_next -> dict | None)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.errors import CalibrationError


class ArrayReader:
    """Yields {input_name: batch} from an in-memory array, `batch_size` rows at a time."""

    def __init__(self, array: np.ndarray, input_name: str | None = None, batch_size: int = 64, source: str = "array"):
        self.array, self.input_name, self.batch_size, self.source = array, input_name, batch_size, source
        self._pos = 0

    def bind(self, input_name: str) -> None:
        """The pipeline tells a reader with no input name which model input it feeds."""
        if self.input_name is None:
            self.input_name = input_name

    def get_next(self) -> dict | None:
        if self._pos >= len(self.array):
            return None
        batch = self.array[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def npz_reader(path: str | Path, batch_size: int = 64) -> ArrayReader:
    """Calibration data from an .npz: the array named `x` (or the only array). uint8 images are scaled by 1/255."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise CalibrationError(f"{path}: holds {keys}; name the input array 'x'")
            array = data[key]
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    return ArrayReader(array, None, batch_size, source=str(path))


def as_reader(calib, batch_size: int = 64):
    """Accept None, a path, a numpy array, or any object with get_next()."""
    if calib is None or hasattr(calib, "get_next"):
        return calib
    if isinstance(calib, (str, Path)):
        return npz_reader(calib, batch_size)
    if isinstance(calib, np.ndarray):
        return ArrayReader(calib, None, batch_size)
    raise CalibrationError(f"calibration data of type {type(calib).__name__}: pass a .npz path, an array or a reader")
