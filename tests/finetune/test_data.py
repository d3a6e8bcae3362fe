"""qcompile.finetune.data: every source kind, deterministic resumable batches, and one-line errors."""

from pathlib import Path

import numpy as np
import pytest

from qcompile import datasets
from qcompile.errors import QcompileError
from qcompile.finetune.data import DataError, Dataset, as_float_batch, check_against_model, open_data

Image = pytest.importorskip("PIL.Image")


def _pixels(n, shape=(1, 28, 28), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _one_line_error(fn, *words, exc=DataError):
    """fn() raises `exc` with a one-line message that contains every word (case-insensitive)."""
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip(), msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in: {msg}"
    return msg


def test_data_error_is_a_qcompile_error():
    assert issubclass(DataError, QcompileError)


# ---------------------------------------------------------------- .npz / .npy

def test_npz_with_labels_uses_to_float(tmp_path):
    x, y = _pixels(10), np.arange(10, dtype=np.uint8) % 3
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    ds = open_data(p)
    assert isinstance(ds, Dataset) and len(ds) == 10
    assert ds.x.dtype == np.float32 and ds.x.shape == (10, 1, 28, 28)
    np.testing.assert_array_equal(ds.x, datasets.to_float(x))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == (np.arange(10) % 3).tolist()
    assert str(p) in ds.source and ds.describe.startswith("train data ")
    check_against_model(ds, input_shape=(1, 28, 28), num_classes=3)


def test_npz_without_labels_and_float_inputs_kept(tmp_path):
    x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float64)
    p = tmp_path / "u.npz"
    np.savez(p, x=x)
    ds = open_data(str(p), input_shape=(4,), name="val")
    assert ds.y is None and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, x.astype(np.float32))   # not scaled by 1/255
    assert ds.describe.startswith("val data ")
    xb, yb = next(ds.batches(3, seed=0, epoch=0))
    assert xb.shape == (3, 4) and yb is None
    check_against_model(ds, input_shape=(4,), num_classes=10)


def test_npy_is_inputs_only(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, _pixels(3))
    ds = open_data(p)
    assert len(ds) == 3 and ds.y is None and ds.x.max() <= 1.0


def test_npz_without_x_lists_keys(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, images=_pixels(2), labels=np.zeros(2))
    _one_line_error(lambda: open_data(p), str(p), "'x'", "images", "labels")


def test_unreadable_npz(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not a zip file at all")
    _one_line_error(lambda: open_data(p), str(p), "npz")


def test_missing_path_and_unknown_string(tmp_path):
    p = tmp_path / "nope.npz"
    _one_line_error(lambda: open_data(p), str(p), "no such file")
    msg = _one_line_error(lambda: open_data("mnist-ish"), "mnist-ish")
    for form in (".npz", "folder", "fashion-mnist"):
        assert form in msg


def test_other_file_type(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,3\n")
    _one_line_error(lambda: open_data(p), str(p), ".npz")


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16, np.bool_])
def test_non_uint8_integer_inputs_refused(tmp_path, dtype):
    p = tmp_path / "i.npz"
    np.savez(p, x=np.ones((2, 3), dtype=dtype))
    _one_line_error(lambda: open_data(p), str(p), np.dtype(dtype).name, "uint8")


# ---------------------------------------------------------------- image folders

def _write_images(root: Path, spec, mode="L", size=(28, 28), ext="png"):
    """spec: {class_name: count}. Returns {path: (class_name, uint8 array as written)}."""
    rng = np.random.default_rng(5)
    written = {}
    for cls, count in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            path = root / cls / f"img{i}.{ext}"
            Image.fromarray(a, mode).save(path)
            written[path] = (cls, a)
    return written


def test_image_folder_grayscale(tmp_path):
    written = _write_images(tmp_path / "imgs", {"shoe": 2, "bag": 3, "coat": 1})
    ds = open_data(tmp_path / "imgs", input_shape=(1, 28, 28))
    assert ds.classes == ("bag", "coat", "shoe") and ds.num_classes == 3
    assert ds.x.shape == (6, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [0, 0, 0, 1, 2, 2]            # sorted class folders, then sorted files
    bag0 = written[tmp_path / "imgs" / "bag" / "img0.png"][1]
    np.testing.assert_array_equal(ds.x[0, 0], datasets.to_float(bag0))
    check_against_model(ds, input_shape=(1, 28, 28), num_classes=3)


def test_image_folder_rgb_with_resize(tmp_path):
    _write_images(tmp_path / "imgs", {"a": 2, "b": 2}, mode="RGB", size=(40, 30), ext="jpg")
    ds = open_data(tmp_path / "imgs", input_shape=(3, 32, 32))
    assert ds.x.shape == (4, 3, 32, 32) and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert ds.y.tolist() == [0, 0, 1, 1]
    # resized (bilinear) RGB, channels first
    src = sorted((tmp_path / "imgs" / "a").iterdir())[0]
    with Image.open(src) as im:
        want = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.x[0], datasets.to_float(want))


def test_image_folder_rgb_files_into_grayscale_model(tmp_path):
    _write_images(tmp_path / "imgs", {"a": 1, "b": 1}, mode="RGB", size=(28, 28))
    ds = open_data(tmp_path / "imgs", input_shape=(1, 20, 24))
    assert ds.x.shape == (2, 1, 20, 24)                 # H=20, W=24


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    _one_line_error(lambda: open_data(empty), str(empty), "'cls'", "no images")
    bare = tmp_path / "bare"
    bare.mkdir()
    _one_line_error(lambda: open_data(bare), str(bare), "class subfolders")
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(loose / "a.png")
    _one_line_error(lambda: open_data(loose), "subfolder per class")
    broken = tmp_path / "broken"
    _write_images(broken, {"a": 1, "b": 1})
    bad = broken / "b" / "zz.png"
    bad.write_bytes(b"\x89PNG not really")
    _one_line_error(lambda: open_data(broken), str(bad), "cannot read image")
    _one_line_error(lambda: open_data(broken, input_shape=(4, 28, 28)), "1 (grayscale) or 3")
    _one_line_error(lambda: open_data(broken, input_shape=(784,)), "[784]")


# ---------------------------------------------------------------- Fashion-MNIST

_FMNIST = Path(datasets.FASHION_MNIST_DIR)


@pytest.mark.parametrize("source, split, n", [("fashion-mnist", "train", 60000),
                                              ("fashion-mnist:test", "test", 10000)])
def test_fashion_mnist(source, split, n):
    if not (_FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is not installed at {_FMNIST} (apt-get install dataset-fashion-mnist)")
    ds = open_data(source)
    assert len(ds) == n and ds.x.shape[1:] == (1, 28, 28) and ds.x.dtype == np.float32
    assert ds.source == f"fashion-mnist:{split}" and ds.classes == datasets.CLASSES
    x, y = datasets.load_fashion_mnist(split)
    np.testing.assert_array_equal(ds.x[:100], datasets.to_float(x[:100]))
    np.testing.assert_array_equal(ds.y, y.astype(np.int64))
    check_against_model(ds, input_shape=(1, 28, 28), num_classes=10)


def test_fashion_mnist_missing_and_bad_split(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", str(tmp_path / "none"))
    _one_line_error(lambda: open_data("fashion-mnist:train"), "apt-get install dataset-fashion-mnist")
    _one_line_error(lambda: open_data("fashion-mnist:val"), "'val'", "fashion-mnist:test")


# ---------------------------------------------------------------- arrays, tuples, iterables

def test_tuple_and_bare_array():
    x, y = _pixels(5), np.array([0, 1, 2, 1, 0])
    ds = open_data((x, y))
    np.testing.assert_array_equal(ds.x, datasets.to_float(x))
    assert ds.y.dtype == np.int64 and ds.y.tolist() == y.tolist()
    ds = open_data(x.astype(np.float32) / 255)
    assert ds.y is None and len(ds) == 5
    ds = open_data((x, None))
    assert ds.y is None
    ds = open_data({"x": x, "y": y})
    assert ds.y.tolist() == y.tolist()
    ds = open_data((x, y.astype(np.float32)))               # whole-number float labels are fine
    assert ds.y.dtype == np.int64


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    x = torch.rand(6, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    ds = open_data((x, y))
    np.testing.assert_array_equal(ds.x, x.numpy())
    assert ds.y.dtype == np.int64 and ds.y.tolist() == list(range(6))
    assert open_data(torch.zeros(3, 4, dtype=torch.uint8)).x.dtype == np.float32
    assert open_data(x.to(torch.bfloat16)).x.dtype == np.float32
    assert as_float_batch(torch.full((2,), 255, dtype=torch.uint8)).tolist() == [1.0, 1.0]


def test_list_and_generator_of_batches():
    torch = pytest.importorskip("torch")
    x, y = _pixels(10), np.arange(10) % 4
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    ds = open_data(batches)
    np.testing.assert_array_equal(ds.x, datasets.to_float(x))
    assert ds.y.tolist() == y.tolist()

    def gen():                                              # torch tensors, DataLoader-style lists
        for i in range(0, 10, 3):
            yield [torch.from_numpy(x[i:i + 3]), torch.from_numpy(y[i:i + 3])]
    ds = open_data(gen())
    np.testing.assert_array_equal(ds.x, datasets.to_float(x))
    assert ds.y.tolist() == y.tolist()

    ds = open_data(iter([(x[:5].astype(np.float32), None), (x[5:].astype(np.float32), None)]))
    assert ds.y is None and len(ds) == 10


def test_bad_iterables():
    x = np.zeros((2, 3), np.float32)

    def yields_arrays():
        yield x
    _one_line_error(lambda: open_data(yields_arrays()), "item 0", "ndarray", "(x, y)")
    _one_line_error(lambda: open_data([(x, None, None)]), "length 3", "(x, y)")
    _one_line_error(lambda: open_data([("abc", None)]), "batch 0", "str")
    _one_line_error(lambda: open_data(iter([])), "no batches")
    _one_line_error(lambda: open_data([(x, None), (np.zeros((2, 4), np.float32), None)]),
                    "batch 1", "[4]", "[3]")
    _one_line_error(lambda: open_data([(x, np.zeros(2, int)), (x, None)]), "batch 1", "no labels")
    _one_line_error(lambda: open_data([(x, np.zeros(3, int))]), "3 labels for 2 inputs")
    _one_line_error(lambda: open_data(42), "int")
    _one_line_error(lambda: open_data((x, np.array([0.5, 1.0]))), "0.5", "index 0", "integer")
    _one_line_error(lambda: open_data((x, np.zeros((2, 10)))), "[2, 10]", "[N]")


# ---------------------------------------------------------------- batches

def _ds(n=23, labels=True):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return Dataset(x, np.arange(n) if labels else None, source="toy")


def _ids(batches):
    return [xb[:, 0].astype(int).tolist() for xb, _ in batches]


def test_batches_deterministic_and_cover_everything():
    ds = _ds()
    a = _ids(ds.batches(5, seed=3, epoch=1))
    b = _ids(ds.batches(5, seed=3, epoch=1))
    assert a == b
    assert [len(t) for t in a] == [5, 5, 5, 5, 3] == [5] * 4 + [3]
    assert sorted(sum(a, [])) == list(range(23))
    for xb, yb in ds.batches(5, seed=3, epoch=1):           # labels travel with their inputs
        assert xb.dtype == np.float32 and yb.dtype == np.int64
        assert xb[:, 0].astype(int).tolist() == yb.tolist()
    # a fresh Dataset object (a resumed process) gives the same order
    assert _ids(_ds().batches(5, seed=3, epoch=1)) == a


def test_epochs_and_seeds_give_different_orders():
    ds = _ds(100)
    e0 = sum(_ids(ds.batches(10, seed=0, epoch=0)), [])
    e1 = sum(_ids(ds.batches(10, seed=0, epoch=1)), [])
    s1 = sum(_ids(ds.batches(10, seed=1, epoch=0)), [])
    assert e0 != e1 and e0 != s1 and sorted(e0) == sorted(e1) == list(range(100))
    assert e0 != list(range(100))                            # shuffled
    assert sum(_ids(ds.batches(10, seed=0, epoch=0, shuffle=False)), []) == list(range(100))


@pytest.mark.parametrize("drop_last", [False, True])
def test_start_is_the_tail_of_the_full_epoch(drop_last):
    ds = _ds(23)
    full = list(ds.batches(4, seed=7, epoch=2, drop_last=drop_last))
    assert len(full) == ds.num_batches(4, drop_last=drop_last) == (5 if drop_last else 6)
    for k in range(len(full) + 1):
        tail = list(ds.batches(4, seed=7, epoch=2, start=k, drop_last=drop_last))
        assert len(tail) == len(full) - k
        for (xa, ya), (xb, yb) in zip(full[k:], tail):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


def test_drop_last():
    ds = _ds(23)
    kept = list(ds.batches(5, seed=0, epoch=0, drop_last=True))
    assert [len(x) for x, _ in kept] == [5, 5, 5, 5]
    full = list(ds.batches(5, seed=0, epoch=0))
    assert sum(_ids(kept), []) == sum(_ids(full), [])[:20]   # same order, short batch dropped
    assert ds.num_batches(5) == 5 and ds.num_batches(5, drop_last=True) == 4
    assert _ds(20).num_batches(5) == _ds(20).num_batches(5, drop_last=True) == 4


def test_batch_argument_errors():
    ds = _ds(10)
    _one_line_error(lambda: list(ds.batches(4, seed=0, epoch=0, start=4)), "batch 4", "only 3 batches")
    with pytest.raises(ValueError):
        list(ds.batches(0, seed=0, epoch=0))
    with pytest.raises(ValueError):
        list(ds.batches(4, seed=-1, epoch=0))
    assert list(ds.batches(4, seed=0, epoch=0, start=3)) == []   # resuming at the epoch's end


def test_unlabeled_batches():
    ds = _ds(6, labels=False)
    assert all(yb is None for _, yb in ds.batches(4, seed=0, epoch=0))


def test_subset_slice_split():
    ds = _ds(50)
    sub = ds.subset(10)
    assert len(sub) == 10 and sub.y.tolist() == list(range(10)) and ds.subset(100) is ds
    assert ds[5:8].x[:, 0].tolist() == [5, 6, 7] and ds[5:8].y.tolist() == [5, 6, 7]
    train, val = ds.split(0.2, seed=1)
    assert len(val) == 10 and len(train) == 40 and val.name == "val"
    assert sorted(train.y.tolist() + val.y.tolist()) == list(range(50))
    t2, v2 = ds.split(0.2, seed=1)
    assert v2.y.tolist() == val.y.tolist()
    assert ds.split(0.2, seed=2)[1].y.tolist() != val.y.tolist()
    assert (train.x[:, 0].astype(int) == train.y).all()
    _one_line_error(lambda: ds.split(1.5), "between 0 and 1")
    _one_line_error(lambda: _ds(1).split(0.5), "too few")


# ---------------------------------------------------------------- check_against_model

def test_check_shape_mismatch_names_both_shapes(tmp_path):
    p = tmp_path / "fmnist.npz"
    np.savez(p, x=_pixels(2, (3, 32, 32)))
    ds = open_data(p)
    msg = _one_line_error(lambda: check_against_model(ds, input_shape=(1, 28, 28), num_classes=10),
                          "fmnist.npz", "[3, 32, 32]", "[1, 28, 28]")
    assert msg.startswith("train data ")
    _one_line_error(lambda: check_against_model(ds, input_shape=(3, 32), num_classes=10), "[3, 32]")
    # symbolic dims match anything
    check_against_model(ds, input_shape=(3, None, "W"), num_classes=10)


def test_check_empty():
    ds = Dataset(np.zeros((0, 1, 28, 28), np.float32), source="empty.npz")
    _one_line_error(lambda: check_against_model(ds, input_shape=(1, 28, 28), num_classes=10),
                    "empty.npz", "empty")


def test_check_labels():
    x = np.zeros((4, 2), np.float32)
    ok = dict(input_shape=(2,), num_classes=3)
    ds = Dataset(x, [0, 1, 2, 3], source="lab.npz")
    _one_line_error(lambda: check_against_model(ds, **ok), "lab.npz", "label 3", "index 3", "0..2")
    ds = Dataset(x, [0, -1, 2, 1], source="lab.npz")
    _one_line_error(lambda: check_against_model(ds, **ok), "label -1", "index 1", "negative")
    ds = Dataset(x, [0, 1, 2, 1], source="lab.npz")
    check_against_model(ds, **ok)
    ds.y = np.array([0.0, 1.5, 2.0, 1.0])                   # set after construction: still caught
    _one_line_error(lambda: check_against_model(ds, **ok), "1.5", "index 1", "integer")
    ds.y = np.array([0, 1, 2])
    _one_line_error(lambda: check_against_model(ds, **ok), "3 labels", "4 inputs")
    ds.y = None
    check_against_model(ds, **ok)
    _one_line_error(lambda: check_against_model(ds, **ok, require_labels=True), "no labels")
    _one_line_error(lambda: Dataset(x, [0, 1]), "2 labels for 4 inputs")


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_check_nan_inf(bad, kind):
    x = np.zeros((5, 3), np.float32)
    x[2, 1] = bad
    ds = Dataset(x, source="nan.npz")
    _one_line_error(lambda: check_against_model(ds, input_shape=(3,), num_classes=None),
                    "nan.npz", kind, "sample 2")


def test_import_does_not_pull_torch():
    import subprocess
    import sys
    code = "import sys, qcompile.finetune.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
