"""The demo: the whole job on the bundled Fashion-MNIST CNN.

post-training quantization -> a short quantization-aware fine-tune -> the CPU artifact (bit kernels) -> its accuracy
and its speed against onnxruntime fp32 and int8, all on this machine in a few minutes.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from qcompile import api, datasets, evaluate
from qcompile.errors import QcompileError
from qcompile.targets.cpu.caps import model_name


def training_data(console: Console):
    """Fashion-MNIST's 60,000 training images from the Debian package; without it, the bundled unlabeled
    calibration images with distillation from the float model (less accurate, but it runs anywhere)."""
    try:
        datasets.load_fashion_mnist("train")
        return "fashion-mnist:train"
    except QcompileError:
        console.print("[yellow]Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): fine-tuning "
                      "on the 512 bundled calibration images by distillation instead[/]")
        return datasets.load_calib()


def run(out: str | Path = "demo-out", preset: str = "w1a2", quantizer: str = "dorefa", steps: int = 600,
        batch: int = 64, data=None, bench_runs: int = 30) -> dict:
    from qcompile import benchmark
    from qcompile.finetune.api import finetune

    console = Console()
    out = Path(out)
    model = datasets.bundled_model("cnn")
    x, y = datasets.load_sample()
    calib = datasets.load_calib()
    data = training_data(console) if data is None else data
    rows = []

    console.rule(f"1/4 post-training quantization: {preset} {quantizer}")
    start = time.perf_counter()
    ptq = api.compile(model, config=preset, quantizer=quantizer, calib=calib)
    ptq.save(out / "ptq")
    acc = evaluate.compare(ptq.float_model, ptq.model, x, y)
    rows += [("float (onnxruntime)", acc["float_top1"], ""),
             (f"{preset} post-training", acc["quant_top1"], f"compile {time.perf_counter() - start:.1f} s")]

    previous = out / "finetuned"
    if (previous / "checkpoint.pt").is_file():  # an earlier demo run's folder: start the fine-tune afresh
        shutil.rmtree(previous)
    console.rule(f"2/4 quantization-aware fine-tuning: {steps} steps of {batch}")
    start = time.perf_counter()
    with _progress(console) as prog:
        ft = finetune(model, config=preset, quantizer=quantizer, data=data, val=(x, y), steps=steps, batch=batch,
                      out=out / "finetuned", log=console.print, progress=prog)
    ft.save(out / "finetuned")
    rows.append((f"{preset} fine-tuned (fake-quant, onnxruntime)",
                 float((evaluate.predict(ft.model, x).argmax(1) == y).mean()),
                 f"fine-tune {time.perf_counter() - start:.0f} s"))

    console.rule("3/4 compile the fine-tuned model for this CPU (bitwise kernels)")
    start = time.perf_counter()
    art = api.compile(out / "finetuned" / "model.onnx", target="cpu")
    art.save(out / "artifact")
    deployed = evaluate.predict(out / "artifact", x)
    fake = evaluate.predict(ft.model, x)
    identical = bool(np.array_equal(deployed, fake))
    rows.append((f"{preset} deployed artifact (bit kernels)", float((deployed.argmax(1) == y).mean()),
                 f"compile {time.perf_counter() - start:.1f} s; outputs "
                 + ("bit-identical to the fake-quant model" if identical else "DIFFER from the fake-quant model")))

    table = Table(title=f"bundled Fashion-MNIST CNN, {len(y)} test images")
    for col in ("model", "top-1", "vs float", "note"):
        table.add_column(col, justify="right" if col in ("top-1", "vs float") else "left")
    for name, top1, note in rows:
        table.add_row(name, f"{top1:.1%}", f"{(top1 - rows[0][1]) * 100:+.1f} pt", note)
    console.print(table)

    console.rule("4/4 speed of the artifact against onnxruntime on this CPU")
    speed = {}
    for b in (1, batch):
        bench_rows = benchmark.bench_artifact(out / "artifact", batch=b, runs=bench_runs)
        benchmark.print_table(bench_rows, f"batch {b} ({model_name()})")
        speed[b] = bench_rows
    console.print(f"models, reports, curves and the artifact in {out.resolve()}/ "
                  "(ptq/, finetuned/, artifact/)")
    return {"accuracy": [{"model": n, "top1": t, "note": note} for n, t, note in rows], "identical": identical,
            "speed": speed}


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)
