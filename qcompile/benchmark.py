"""`qcompile bench`: the artifact against its float model on onnxruntime fp32 and onnxruntime int8, one run."""

from __future__ import annotations

import logging

import tempfile
import time
from pathlib import Path

import numpy as np

from qcompile.errors import ArtifactError
from qcompile.evaluate import session


# onnxruntime's worker threads spin for tens of ms after a run (its default) and take a core from whatever runs
# next: interleaved with onnxruntime fp32, the bundled CNN's artifact timed 14.4 ms instead of 11.2-12.1 on 2 cores
# (onnxruntime's own times did not change without the spin). Each engine's timing starts after this pause.
SETTLE_S = 0.15


def settle() -> None:
    """Let the previous engine's spinning threads go idle before timing the next one."""
    time.sleep(SETTLE_S)


def _time(fn, runs: int, warmup: int = 3) -> np.ndarray:
    settle()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def synthetic_feeds(inputs, batch: int, seed: int = 0) -> dict:
    """Timing inputs for a session's inputs: floats uniform in [0, 1), integer inputs (ids, masks) ones; a symbolic
    first axis is the batch, other symbolic sizes become 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in inputs:
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 1) for i, d in enumerate(arg.shape)]
        if arg.type in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(arg.type, np.float16)
            feeds[arg.name] = rng.random(shape).astype(dtype)
        else:
            from qcompile.passes.calibrate import ORT_TYPES

            if arg.type not in ORT_TYPES:
                raise ArtifactError(f"input '{arg.name}' has type {arg.type}; bench cannot make inputs for it")
            feeds[arg.name] = np.ones(shape, ORT_TYPES[arg.type])
    return feeds


def int8_model(float_model: Path, feeds: dict, out_dir: Path, seed: int = 0) -> Path:
    """onnxruntime's own static int8 quantization (QDQ, per-channel weights) of the float model.

    Calibrated on inputs like `feeds` (random floats): this model is only timed, never used for accuracy."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(seed)
            self.batches = iter([{k: (rng.random(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
                                  for k, v in feeds.items()} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    out = out_dir / "int8.onnx"
    # quantize_static logs "Please consider to run pre-processing" on the root logger each time; its
    # pre-processing (quant_pre_process) made no difference to this baseline's speed on the bundled models
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(float_model), str(out), Reader(), per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return out


def bench_artifact(artifact: str | Path, *, batch: int = 64, runs: int = 30, feeds: dict | None = None,
                   input_files=()) -> list[dict]:
    """Time the artifact and the baselines on `feeds` or the .npy `input_files` ([NAME=]FILE.npy: real inputs), or
    on synthetic inputs of batch `batch`."""
    from qcompile.fileio import read_input_files
    from qcompile.runtime import InferenceSession

    artifact = Path(artifact)
    sess = InferenceSession(artifact)
    if input_files:
        feeds = read_input_files(input_files, [i.name for i in sess.get_inputs()])
    if feeds is None:
        feeds = synthetic_feeds(sess.get_inputs(), batch)
    else:
        batch = next((len(v) for v in feeds.values() if np.ndim(v) > 0), 1)
        sess.run(None, feeds)  # the user's inputs: a wrong name, dtype or shape is one RuntimeInputError here
    float_path = artifact / "float.onnx"
    engines = {"qcompile (artifact)": lambda: sess.run(None, feeds)}
    fp32 = session(float_path)
    engines["onnxruntime fp32"] = lambda: fp32.run(None, feeds)
    with tempfile.TemporaryDirectory() as tmp:
        i8 = session(int8_model(float_path, feeds, Path(tmp)))
    engines["onnxruntime int8 (quantize_static)"] = lambda: i8.run(None, feeds)
    fq = session(artifact / "fakequant.onnx")
    engines["onnxruntime fake-quant"] = lambda: fq.run(None, feeds)
    rows = []
    for name, fn in engines.items():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - onnxruntime's and the runtime's errors, as one line
            shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feeds.items())
            raise ArtifactError(f"{artifact}: {name} failed on the timing inputs ({shapes}): "
                                f"{str(exc).strip().splitlines()[0][:160]}; time real inputs with "
                                "--input NAME=FILE.npy") from None
        t = _time(fn, runs)
        rows.append({"engine": name, "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
                     "images_per_s": batch / float(np.percentile(t, 50)) * 1e3, "batch": batch})
    base = {r["engine"]: r["p50_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_fp32"] = base["onnxruntime fp32"] / r["p50_ms"]
        r["speedup_vs_int8"] = base["onnxruntime int8 (quantize_static)"] / r["p50_ms"]
    return rows


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("engine", "p50 ms", "p90 ms", "images/s", "vs fp32", "vs int8"):
        table.add_column(col, justify="left" if col == "engine" else "right")
    for r in rows:
        table.add_row(r["engine"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['images_per_s']:.0f}",
                      f"{r['speedup_vs_fp32']:.2f}x", f"{r['speedup_vs_int8']:.2f}x")
    Console().print(table)
