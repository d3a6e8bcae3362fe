"""Calibration data readers, shaped like onnxruntime.quantization.CalibrationDataReader (get_next -> dict | None)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.errors import CalibrationError


class ArrayReader:
    """Yields {input_name: batch} from in-memory arrays, `batch_size` rows at a time.

    `arrays` is one array (a one-input model; its name comes from `input_name` or from `bind`) or a dict with one
    array per model input name (`x` also stands for the only input of a one-input model); a 0-d array in the dict
    (a sample rate, a flag) is a scalar input, fed as it is with every batch."""

    def __init__(self, arrays, input_name: str | None = None, batch_size: int = 64, source: str = "array"):
        self.arrays = dict(arrays) if isinstance(arrays, dict) else None
        self.array = None if self.arrays is not None else arrays
        self.input_name, self.batch_size, self.source = input_name, batch_size, source
        self._pos = 0
        if self.arrays is not None:
            sizes = {k: len(v) for k, v in self.arrays.items() if np.ndim(v) > 0}
            if len(set(sizes.values())) > 1:
                raise CalibrationError(f"{source}: arrays have different numbers of samples {sizes}; "
                                       "give every input the same number")

    def __len__(self) -> int:
        if self.arrays is None:
            return len(self.array)
        return next((len(v) for v in self.arrays.values() if np.ndim(v) > 0), 1)

    def bind(self, input_names) -> None:
        """The pipeline tells the reader the model's input names; a one-array reader takes the only one, a dict
        must name every input exactly (missing and extra names are one error naming both)."""
        names = [input_names] if isinstance(input_names, str) else list(input_names)
        if self.arrays is None:
            if self.input_name is None:
                if len(names) != 1:
                    raise CalibrationError(f"{self.source}: the model has inputs {names}; give one array per input "
                                           "name (an .npz with those names, or a dict)")
                self.input_name = names[0]
            return
        if len(names) == 1 and set(self.arrays) == {"x"}:
            self.arrays = {names[0]: self.arrays["x"]}
        missing, extra = sorted(set(names) - set(self.arrays)), sorted(set(self.arrays) - set(names))
        if missing or extra:
            parts = ([f"missing {missing}"] if missing else []) + ([f"not model inputs {extra}"] if extra else [])
            raise CalibrationError(f"{self.source}: {'; '.join(parts)}; the model's inputs are {names}")

    def get_next(self) -> dict | None:
        if self._pos >= len(self):
            return None
        sl = slice(self._pos, self._pos + self.batch_size)
        self._pos += self.batch_size
        if self.arrays is None:
            return {self.input_name: self.array[sl]}
        return {k: v[sl] if np.ndim(v) > 0 else v for k, v in self.arrays.items()}

    def rewind(self) -> None:
        self._pos = 0


def _scaled(array: np.ndarray) -> np.ndarray:
    """uint8 images are scaled to [0, 1]; other dtypes (float inputs, integer ids and masks) are kept."""
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array


def npz_reader(path: str | Path, batch_size: int = 64) -> ArrayReader:
    """Calibration data from an .npz: the array `x` (or the only array) for a one-input model, else one array per
    model input name. uint8 images are scaled by 1/255."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: calibration file not found")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.keys()}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None
    if not arrays:
        raise CalibrationError(f"{path}: holds no arrays")
    if len(arrays) == 1:
        return ArrayReader(_scaled(next(iter(arrays.values()))), None, batch_size, source=str(path))
    if "x" in arrays and "y" in arrays and len(arrays) == 2:  # an evaluation file (x, y): calibrate on x
        return ArrayReader(_scaled(arrays["x"]), None, batch_size, source=str(path))
    return ArrayReader({k: _scaled(v) for k, v in arrays.items()}, None, batch_size, source=str(path))


def as_reader(calib, batch_size: int = 64):
    """Accept None, a path, a numpy array, or any object with get_next()."""
    if calib is None or hasattr(calib, "get_next"):
        return calib
    if isinstance(calib, (str, Path)):
        return npz_reader(calib, batch_size)
    if isinstance(calib, np.ndarray):
        return ArrayReader(calib, None, batch_size)
    if isinstance(calib, dict):
        return ArrayReader(calib, None, batch_size, source="calibration dict")
    raise CalibrationError(f"calibration data of type {type(calib).__name__}: pass a .npz path, an array, a dict of arrays or a reader")


class WithoutInputs:
    """A reader whose batches leave out inputs the compile fixed to constants (--fix-input)."""

    def __init__(self, reader, names):
        self.reader, self.names = reader, set(names)
        self.source = getattr(reader, "source", "calibration reader")

    def bind(self, input_names) -> None:
        if hasattr(self.reader, "bind"):
            arrays = getattr(self.reader, "arrays", None)
            if arrays is not None:
                for name in self.names:
                    arrays.pop(name, None)
            self.reader.bind(input_names)

    def get_next(self) -> dict | None:
        batch = self.reader.get_next()
        return None if batch is None else {k: v for k, v in batch.items() if k not in self.names}

    def rewind(self) -> None:
        if hasattr(self.reader, "rewind"):
            self.reader.rewind()
