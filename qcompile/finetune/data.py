"""Training data for `qcompile finetune`: one in-memory `Dataset` from whatever the user points at.

    ds = open_data(source, input_shape=(1, 28, 28), name="train")
    check_against_model(ds, input_shape=(1, 28, 28), num_classes=10)
    for x, y in ds.batches(64, seed=0, epoch=3, start=k): ...

Sources: an .npz (`x`, optional `y`) or .npy (inputs only), a folder of images in class subfolders,
"fashion-mnist[:train|:test]" (the Debian package), an (x, y) tuple or a bare array (numpy or torch),
a mapping with "x"/"y", or any iterable of (x, y) batches (materialized by concatenation).

Inputs follow THE preprocessing of `qcompile.datasets.to_float`: uint8 pixels become x / 255 as float32;
float inputs are kept (as float32); other integer dtypes are refused.

Language models train on a `TokenStream` instead (`open_tokens`: an .npz with `tokens`, or `kjv[:split]`), walked
in windows of consecutive tokens with the recurrent state carried between them.

Batch order is a function of (seed, epoch) only, so a run resumed with `start=k` sees exactly the batches
an uninterrupted run would. numpy only at import time: torch tensors are recognised by `.detach()`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from qcompile.datasets import CLASSES as FASHION_MNIST_CLASSES
from qcompile.datasets import load_fashion_mnist, to_float
from qcompile.errors import QcompileError

__all__ = ["DataError", "Dataset", "open_data", "check_against_model", "as_float_batch", "IMAGE_EXTENSIONS",
           "TokenStream", "open_tokens"]

#: Image file suffixes read from class folders (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_ACCEPTED = ("pass an .npz file (array 'x', optional labels 'y'), a folder of images in class subfolders "
             "(root/<class>/*.png), or fashion-mnist[:train|:test]")


class DataError(QcompileError):
    """Training data missing, unreadable, or not matching the model (shape, labels, NaN/Inf)."""


# ---------------------------------------------------------------- array conversion

def _to_numpy(a):
    """numpy array from a numpy array, torch tensor (detected by .detach, no torch import) or array-like."""
    if hasattr(a, "detach") and hasattr(a, "numpy"):
        t = a.detach()
        if hasattr(t, "cpu"):
            t = t.cpu()
        try:
            return t.numpy()
        except (TypeError, RuntimeError):          # bfloat16 and other dtypes numpy lacks
            return t.float().numpy()
    return np.asarray(a)


def _shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def as_float_batch(x, where: str = "data") -> np.ndarray:
    """Inputs as float32: uint8 -> to_float (x / 255); float -> float32; anything else -> DataError.

    `x` may be a numpy array, a torch tensor or a nested list. `where` prefixes the error message.
    """
    try:
        a = _to_numpy(x)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: inputs are not an array ({type(x).__name__}: {e})") from None
    if a.dtype == np.uint8:
        return to_float(a)
    if np.issubdtype(a.dtype, np.floating):
        return np.ascontiguousarray(a, dtype=np.float32)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{where}: inputs have dtype {a.dtype}; pass uint8 pixels (scaled by 1/255) "
                        "or float values")
    raise DataError(f"{where}: inputs have dtype {a.dtype}; pass uint8 pixels or float values")


def _as_labels(y, where: str, n: int | None = None) -> np.ndarray | None:
    """Labels as int64 [N]: integer dtypes, or floats holding whole numbers. None stays None."""
    if y is None:
        return None
    try:
        a = _to_numpy(y)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: labels are not an array ({type(y).__name__}: {e})") from None
    if a.ndim != 1:
        raise DataError(f"{where}: labels have shape {_shape(a.shape)}; expected class indices of shape [N]")
    if n is not None and a.shape[0] != n:
        raise DataError(f"{where}: {a.shape[0]} labels for {n} inputs; need one label per input")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise DataError(f"{where}: labels have dtype {a.dtype}; expected integer class indices")
    if np.issubdtype(a.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{where}: label {a[i]!r} at index {i} is not an integer class index")
    return a.astype(np.int64)


# ---------------------------------------------------------------- Dataset

class Dataset:
    """In-memory inputs `x` (float32 [N, ...]) and labels `y` (int64 [N] or None).

    `source` is a short description for messages ("fmnist.npz", "fashion-mnist:train", ...), `name` what
    the data is for ("train", "val"); `classes` the class names when the source knows them.
    """

    def __init__(self, x, y=None, *, source: str = "array", name: str = "train", classes=None):
        self.name, self.source = name, source
        x = as_float_batch(x, self.describe)
        if x.ndim == 0:
            raise DataError(f"{self.describe}: inputs are a scalar; expected an array of shape [N, ...]")
        self.x = x
        self.y = _as_labels(y, self.describe, len(x))
        self.classes = tuple(classes) if classes is not None else None

    @property
    def describe(self) -> str:
        """`<name> data <source>`, the prefix of every message about this data."""
        return f"{self.name} data {self.source}"

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        labels = "no labels" if self.y is None else "labels"
        return f"Dataset({self.describe}: {len(self)} x {_shape(self.x.shape[1:])}, {labels})"

    def _derived(self, x, y, source: str, name: str | None = None) -> "Dataset":
        d = Dataset.__new__(Dataset)
        d.x, d.y, d.source, d.name, d.classes = x, y, source, name or self.name, self.classes
        return d

    def __getitem__(self, index) -> "Dataset":
        """A slice (ds[:1000]) or an index array gives a Dataset; one int gives (x, y) of that sample."""
        if isinstance(index, (int, np.integer)):
            return self.x[index], (None if self.y is None else self.y[index])
        if isinstance(index, slice):
            label = f"[{'' if index.start is None else index.start}:{'' if index.stop is None else index.stop}]"
        else:
            index = np.asarray(index)
            label = f"[{index.size} selected]"
        return self._derived(self.x[index], None if self.y is None else self.y[index], self.source + label)

    def subset(self, n: int) -> "Dataset":
        """The first n samples (all of them when n >= len)."""
        if n < 0:
            raise ValueError(f"subset size must be >= 0, got {n}")
        return self if n >= len(self) else self[:n]

    def split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(train, val): `fraction` of the samples (at least one) held out at random, deterministic in `seed`.

        Both parts keep the original order of their samples.
        """
        if not 0.0 < fraction < 1.0:
            raise DataError(f"{self.describe}: validation fraction must be between 0 and 1, got {fraction}")
        n = len(self)
        n_val = max(1, int(round(n * fraction)))
        if n_val >= n:
            raise DataError(f"{self.describe}: {n} samples are too few to hold out {fraction:g} for validation")
        perm = np.random.default_rng([int(seed), 0x5B1E]).permutation(n)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        train = self._derived(self.x[train_idx], None if self.y is None else self.y[train_idx],
                              f"{self.source} (train split)")
        val = self._derived(self.x[val_idx], None if self.y is None else self.y[val_idx],
                            f"{self.source} (validation split)", name="val")
        return train, val

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        _check_batch_size(batch_size)
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def order(self, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        """The sample order of one epoch: a function of (seed, epoch) only."""
        if not shuffle:
            return np.arange(len(self))
        for what, v in (("seed", seed), ("epoch", epoch)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{what} must be an integer >= 0, got {v!r}")
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self))

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                drop_last: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(x float32 [B, ...], y int64 [B] or None) batches of epoch `epoch`, skipping the first `start`.

        Skipping does not change the order of the remaining batches: batches(start=k) is exactly the tail of
        batches(start=0) for the same (seed, epoch). With drop_last the short final batch is left out.
        """
        total = self.num_batches(batch_size, drop_last)
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        if start > total:
            raise DataError(f"{self.describe}: cannot resume at batch {start}; an epoch has only {total} "
                            f"batches of {batch_size} (was the batch size changed?)")
        order = self.order(seed=seed, epoch=epoch, shuffle=shuffle)
        return self._iter(order, batch_size, int(start), total)

    def _iter(self, order, batch_size, start, total):
        for b in range(start, total):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield self.x[idx], (None if self.y is None else self.y[idx])


def _check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")


# ---------------------------------------------------------------- sources

def open_data(source, *, input_shape=(1, 28, 28), name: str = "train") -> Dataset:
    """One Dataset from `source` (see the module docstring for the accepted forms).

    `input_shape` is the per-sample model input shape; it decides the channels and size images are read at.
    Every problem is a one-line DataError prefixed "<name> data <source>:".
    """
    if isinstance(source, Dataset):
        return source
    if isinstance(source, str) and (source == "fashion-mnist" or source.startswith("fashion-mnist:")):
        return _fashion_mnist(source, name)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source, input_shape, name)
    if isinstance(source, (bytes, bytearray)):
        raise DataError(f"{name} data: got {type(source).__name__}; {_ACCEPTED}")
    if _is_array(source):
        return Dataset(source, None, source=_array_desc(source), name=name)
    if isinstance(source, tuple) and len(source) == 2 and _is_array(source[0]) and \
            (source[1] is None or _is_array(source[1]) or isinstance(source[1], list)):
        labels = "labels" if source[1] is not None else "no labels"
        return Dataset(source[0], source[1], source=f"({_array_desc(source[0])}, {labels})", name=name)
    if isinstance(source, dict):
        if "x" not in source:
            raise DataError(f"{name} data (dict): no key 'x' for the inputs; found keys {sorted(map(str, source))}")
        return Dataset(source["x"], source.get("y"), source="dict", name=name)
    if hasattr(source, "__iter__"):
        return _from_batches(source, name)
    raise DataError(f"{name} data: cannot use a {type(source).__name__}; {_ACCEPTED}, "
                    "or pass arrays (x, y) or an iterable of (x, y) batches")


def _is_array(a) -> bool:
    return isinstance(a, np.ndarray) or (hasattr(a, "detach") and hasattr(a, "shape"))


def _array_desc(a) -> str:
    kind = "tensor" if hasattr(a, "detach") else "array"
    return f"{kind} {_shape(tuple(a.shape))}"


def _fashion_mnist(source: str, name: str) -> Dataset:
    split = source.partition(":")[2] or "train"
    if split not in ("train", "test"):
        raise DataError(f"{name} data {source}: unknown Fashion-MNIST split {split!r}; "
                        "use fashion-mnist:train or fashion-mnist:test")
    try:
        x, y = load_fashion_mnist(split)
    except DataError:
        raise
    except QcompileError as e:
        raise DataError(f"{name} data {source}: {e}") from None
    return Dataset(x, y, source=f"fashion-mnist:{split}", name=name, classes=FASHION_MNIST_CLASSES)


def _from_path(source, input_shape, name: str) -> Dataset:
    p = Path(source)
    where = f"{name} data {source}"
    if not p.exists():
        raise DataError(f"{where}: no such file or folder; {_ACCEPTED}")
    if p.is_dir():
        return _from_image_folder(p, str(source), input_shape, name)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{where}: not a readable .npy file ({e})") from None
        return Dataset(x, None, source=str(source), name=name)
    if suffix != ".npz":
        raise DataError(f"{where}: not an .npz file or a folder; {_ACCEPTED}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
            if "x" not in keys:
                raise DataError(f"{where}: no array 'x' for the inputs; found {sorted(keys)} "
                                "(save with np.savez(path, x=inputs, y=labels))")
            x = z["x"]
            y = z["y"] if "y" in keys else None
    except DataError:
        raise
    except Exception as e:             # OSError, ValueError (pickled arrays), zipfile.BadZipFile, EOFError
        raise DataError(f"{where}: not a readable .npz file ({type(e).__name__}: {e})") from None
    return Dataset(x, y, source=str(source), name=name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def _from_image_folder(root: Path, desc: str, input_shape, name: str) -> Dataset:
    where = f"{name} data {desc}"
    shape = tuple(input_shape) if input_shape is not None else ()
    if len(shape) != 3:
        raise DataError(f"{where}: a folder of images feeds [C, H, W] inputs, but the model takes "
                        f"{_shape(shape)} per sample")
    channels = shape[0] if isinstance(shape[0], (int, np.integer)) else 1
    if channels not in (1, 3):
        raise DataError(f"{where}: images can feed 1 (grayscale) or 3 (RGB) channels, but the model takes "
                        f"{channels}")
    mode = "L" if channels == 1 else "RGB"
    size = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape[1:])   # (H, W)
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{where}: reading images needs Pillow; install it with: pip install Pillow") from None

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        loose = _image_files(root)
        hint = (f" (found {len(loose)} images directly in it; put them in one subfolder per class)"
                if loose else "")
        raise DataError(f"{where}: no class subfolders with images; expected root/<class>/*.png{hint}")
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        found = _image_files(d)
        if not found:
            raise DataError(f"{where}: class folder {d.name!r} has no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); add some or remove it")
        files += found
        labels += [label] * len(found)

    arrays = []
    first = None
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                h = size[0] if size[0] is not None else im.height
                w = size[1] if size[1] is not None else im.width
                if (im.height, im.width) != (h, w):
                    im = im.resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:       # UnidentifiedImageError, truncated files, DecompressionBombError, ...
            raise DataError(f"{where}: cannot read image {f} ({type(e).__name__}: {e})") from None
        if first is None:
            first = (f, a.shape)
        elif a.shape != first[1]:
            raise DataError(f"{where}: image {f} is {a.shape[1]}x{a.shape[0]} but {first[0]} is "
                            f"{first[1][1]}x{first[1][0]}; give the model a fixed input size to resize to")
        arrays.append(a)
    x = np.stack(arrays)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    return Dataset(x, np.asarray(labels, dtype=np.int64), source=desc, name=name,
                   classes=[d.name for d in class_dirs])


def _from_batches(source, name: str) -> Dataset:
    desc = "list of batches" if isinstance(source, list) else f"{type(source).__name__} of batches"
    where = f"{name} data ({desc})"
    xs, ys = [], []
    try:
        items = iter(source)
    except TypeError as e:
        raise DataError(f"{where}: cannot iterate over it ({e}); {_ACCEPTED}") from None
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            got = (f"a {type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list))
                   else f"a {type(item).__name__}")
            raise DataError(f"{where}: item {i} is {got}; each item must be an (x, y) batch "
                            "(y may be None)")
        bx, by = item
        if not (_is_array(bx) or isinstance(bx, list)):
            raise DataError(f"{where}: batch {i} has inputs of type {type(bx).__name__}; "
                            "expected a numpy array or torch tensor")
        x = as_float_batch(bx, f"{where} batch {i}")
        if x.ndim == 0:
            raise DataError(f"{where}: batch {i} inputs are a scalar; expected [B, ...]")
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise DataError(f"{where}: batch {i} has inputs of shape {_shape(x.shape[1:])} per sample "
                            f"but batch 0 has {_shape(xs[0].shape[1:])}")
        if i > 0 and (by is None) != (ys[0] is None):
            raise DataError(f"{where}: batch {i} " + ("has no labels but batch 0 has"
                            if by is None else "has labels but batch 0 has none"))
        xs.append(x)
        ys.append(_as_labels(by, f"{where} batch {i}", len(x)))
    if not xs:
        raise DataError(f"{where}: yielded no batches")
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = None if ys[0] is None else (np.concatenate(ys) if len(ys) > 1 else ys[0])
    return Dataset(x, y, source=f"({desc})", name=name)


# ---------------------------------------------------------------- checks

def _fixed(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0


def check_against_model(ds: Dataset, *, input_shape, num_classes: int | None, require_labels: bool = False) -> None:
    """DataError (one line) unless `ds` fits a model taking `input_shape` per sample with `num_classes` outputs.

    `input_shape` is per sample (no batch dimension); entries that are None, strings or <= 0 are symbolic and
    match any size. num_classes None skips the label range check; require_labels refuses unlabeled data.
    """
    where = ds.describe
    x, y = ds.x, ds.y
    if len(ds) == 0:
        raise DataError(f"{where}: the data set is empty")
    want = tuple(input_shape)
    got = tuple(x.shape[1:])
    if len(got) != len(want) or any(_fixed(w) and int(w) != g for w, g in zip(want, got)):
        raise DataError(f"{where}: inputs have shape {_shape(got)} per sample but the model takes "
                        f"{_shape(want)}")
    finite = np.isfinite(x)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))
        kind = "NaN" if np.isnan(x[bad[0]]).any() else "Inf"
        raise DataError(f"{where}: inputs contain NaN or Inf ({kind} in sample {int(bad[0])}, "
                        f"{bad.size} samples affected); clean the data")
    if y is None:
        if require_labels:
            raise DataError(f"{where}: has no labels; training needs class labels "
                            "(an .npz array 'y', class subfolders, or (x, y) pairs)")
        return
    y = _as_labels(y, where, len(x))   # shape, length, dtype and integer values (ds.y may have been replaced)
    lo = np.flatnonzero(y < 0)
    if lo.size:
        i = int(lo[0])
        rng = f" (the model has {num_classes} classes: 0..{num_classes - 1})" if num_classes else ""
        raise DataError(f"{where}: label {int(y[i])} at index {i} is negative{rng}")
    if num_classes is not None:
        hi = np.flatnonzero(y >= num_classes)
        if hi.size:
            i = int(hi[0])
            raise DataError(f"{where}: label {int(y[i])} at index {i} is out of range; the model has "
                            f"{num_classes} classes (labels 0..{num_classes - 1})")


# ---------------------------------------------------------------- token streams (language models)

_TOKENS_ACCEPTED = ("pass an .npz with a 1-D integer array 'tokens', kjv (the bundled KJV sample's train tokens), "
                    "kjv:test (its held-out test sample) or kjv:train / kjv:valid (the whole split, read from the "
                    "Debian bible-kjv corpus as models/train_lm.py does)")


class TokenStream:
    """A 1-D stream of token ids (int64) for language-model training, walked PTB-style: `columns(batch)` cuts it
    into `batch` contiguous columns ([rows, batch], column j = tokens[j*rows:(j+1)*rows], as qcompile.lm.batchify),
    and `batches` yields the windows of `seq_len` rows in order, each (x, y) with y the next tokens, so the
    recurrent state can be carried from one window into the next (truncated backpropagation through time).

    Every epoch cuts the stream at an offset in [0, seq_len) drawn from (seed, epoch), so the window boundaries move
    between epochs; an epoch always has the same number of full windows (`num_batches`), a function of the stream
    length, batch and seq_len only, and `batches(start=k)` is the tail of the same epoch (exact resume)."""

    def __init__(self, tokens, *, source: str = "array", name: str = "train", seq_len: int = 35):
        self.name, self.source = name, source
        a = _to_numpy(tokens)
        if a.ndim != 1 or a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{self.describe}: tokens have shape {_shape(a.shape)} and dtype {a.dtype}; expected a "
                            "1-D stream of integer ids")
        if a.size and a.min() < 0:
            raise DataError(f"{self.describe}: token id {int(a.min())} is negative")
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise DataError(f"{self.describe}: seq_len must be >= 1, got {seq_len!r}")
        self.tokens = np.ascontiguousarray(a, dtype=np.int64)
        self.seq_len = int(seq_len)

    @property
    def describe(self) -> str:
        return f"{self.name} data {self.source}"

    @property
    def y(self) -> np.ndarray:
        """The targets are the stream itself (the next token): a language model's data is always labelled."""
        return self.tokens

    def __len__(self) -> int:
        return int(self.tokens.size)

    def __repr__(self) -> str:
        return f"TokenStream({self.describe}: {len(self)} tokens, windows of {self.seq_len})"

    def with_seq_len(self, seq_len: int) -> "TokenStream":
        return TokenStream(self.tokens, source=self.source, name=self.name, seq_len=seq_len)

    def split(self, fraction: float, seed: int = 0) -> tuple["TokenStream", "TokenStream"]:
        """(train, val): the last `fraction` of the stream held out, contiguous (a stream cannot be shuffled)."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"{self.describe}: validation fraction must be between 0 and 1, got {fraction}")
        n_val = max(1, int(round(len(self) * fraction)))
        cut = len(self) - n_val
        return (TokenStream(self.tokens[:cut], source=f"{self.source} (first {cut} tokens)", name=self.name,
                            seq_len=self.seq_len),
                TokenStream(self.tokens[cut:], source=f"{self.source} (last {n_val} tokens)", name="val",
                            seq_len=self.seq_len))

    def columns(self, batch: int, offset: int = 0) -> np.ndarray:
        """int64 [rows, batch] of the stream from `offset` on (qcompile.lm.batchify's layout)."""
        _check_batch_size(batch)
        t = self.tokens[offset:]
        rows = len(t) // batch
        return np.ascontiguousarray(t[:rows * batch].reshape(batch, rows).T)

    def offset(self, *, seed: int, epoch: int, shuffle: bool = True) -> int:
        if not shuffle or self.seq_len == 1:
            return 0
        return int(np.random.default_rng([int(seed), int(epoch), 0x70C]).integers(0, self.seq_len))

    def num_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """Windows per epoch: the full windows of the stream cut at the largest offset (so every epoch has as
        many); without drop_last a short last window counts too."""
        _check_batch_size(batch_size)
        rows = (len(self) - (self.seq_len - 1)) // batch_size
        if rows < 2:
            return 0
        return (rows - 1) // self.seq_len if drop_last else -(-(rows - 1) // self.seq_len)

    def batches(self, batch_size: int, *, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                drop_last: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x int64 [seq_len, batch], y int64 [seq_len, batch]) windows of epoch `epoch` in stream order, from
        window `start` on."""
        total = self.num_batches(batch_size, drop_last)
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        if start > total:
            raise DataError(f"{self.describe}: cannot resume at window {start}; an epoch has only {total} windows "
                            f"of {self.seq_len} x {batch_size} (was the batch size changed?)")
        cols = self.columns(batch_size, self.offset(seed=seed, epoch=epoch, shuffle=shuffle))
        return self._windows(cols, int(start), total)

    def _windows(self, cols, start, total):
        s = self.seq_len
        for w in range(start, total):
            i = w * s
            n = min(s, cols.shape[0] - 1 - i)
            yield cols[i:i + n], cols[i + 1:i + 1 + n]

    def check_vocab(self, vocab: int | None) -> None:
        if vocab is not None and len(self) and self.tokens.max() >= vocab:
            i = int(np.flatnonzero(self.tokens >= vocab)[0])
            raise DataError(f"{self.describe}: token id {int(self.tokens[i])} at position {i} is out of range; the "
                            f"model's vocabulary has {vocab} ids (0..{vocab - 1})")


def _kjv_split(split: str) -> np.ndarray:
    """A whole split of the KJV corpus, tokenized as models/train_lm.py does (needs its Debian packages)."""
    import importlib.util
    import sys

    from qcompile.datasets import load_lm_vocab

    script = Path(__file__).resolve().parents[2] / "models" / "train_lm.py"
    if not script.is_file():
        raise DataError(f"kjv:{split}: models/train_lm.py (the corpus reader) is not in this installation")
    spec = importlib.util.spec_from_file_location("_qcompile_train_lm", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    import shutil
    import subprocess

    if shutil.which("bible") is None:
        raise DataError(f"kjv:{split}: the `bible` reader is not installed; {mod.APT_HINT}")
    try:
        verses = mod.read_bible()
    except SystemExit as e:  # the script reports a missing corpus by exiting
        raise DataError(f"kjv:{split}: {e}") from None
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"kjv:{split}: cannot read the corpus ({e})") from None
    vocab, streams, *_ = mod.build(verses, 5000)
    if vocab != load_lm_vocab():
        raise DataError(f"kjv:{split}: the corpus gives a different vocabulary than models/kjv_vocab.txt; the "
                        "installed bible-kjv text differs from the one the bundled models were trained on")
    return streams[split]


def open_tokens(source, *, name: str = "train", seq_len: int = 35) -> TokenStream:
    """A TokenStream from an .npz (array `tokens`, else a single 1-D integer array), "kjv" / "kjv:calib" (the
    bundled sample's 16,384 train tokens: enough to test, not to train well), "kjv:test" (the bundled held-out
    sample), "kjv:train" / "kjv:valid" (the whole split, from the Debian corpus), a 1-D integer array, or a
    TokenStream."""
    if isinstance(source, TokenStream):
        return source if source.seq_len == seq_len else source.with_seq_len(seq_len)
    if isinstance(source, str) and (source == "kjv" or source.startswith("kjv:")):
        split = source.partition(":")[2] or "calib"
        if split in ("calib", "test"):
            from qcompile.datasets import load_lm_sample

            try:
                test, calib = load_lm_sample()
            except QcompileError as e:
                raise DataError(f"{name} data {source}: {e}") from None
            return TokenStream(calib if split == "calib" else test, source=f"kjv:{split}", name=name,
                               seq_len=seq_len)
        if split in ("train", "valid"):
            return TokenStream(_kjv_split(split), source=f"kjv:{split}", name=name, seq_len=seq_len)
        raise DataError(f"{name} data {source}: unknown KJV split {split!r}; use kjv, kjv:test, kjv:train or "
                        "kjv:valid")
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        where = f"{name} data {source}"
        if not p.is_file():
            raise DataError(f"{where}: no such file; {_TOKENS_ACCEPTED}")
        try:
            z = np.load(p, allow_pickle=False)
            if isinstance(z, np.ndarray):   # .npy
                arr = z
            else:
                with z:
                    keys = list(z.files)
                    if "tokens" in keys:
                        arr = z["tokens"]
                    else:
                        ints = [k for k in keys if z[k].ndim == 1 and np.issubdtype(z[k].dtype, np.integer)]
                        if len(ints) != 1:
                            raise DataError(f"{where}: no array 'tokens' (found {sorted(keys)}); save the stream "
                                            "with np.savez(path, tokens=ids)")
                        arr = z[ints[0]]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, BadZipFile
            raise DataError(f"{where}: not a readable .npz/.npy file ({type(e).__name__}: {e})") from None
        return TokenStream(arr, source=str(source), name=name, seq_len=seq_len)
    if _is_array(source) or isinstance(source, list):
        return TokenStream(source, source=f"token array [{len(source)}]", name=name, seq_len=seq_len)
    raise DataError(f"{name} data: cannot use a {type(source).__name__} as a token stream; {_TOKENS_ACCEPTED}")
