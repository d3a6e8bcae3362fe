"""The demo: the bundled Fashion-MNIST CNN at w2a2, balanced vs uniform, float vs quantized accuracy."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qcompile import api, datasets, evaluate


def run(out: str | Path = "demo-out", preset: str = "w2a2", quantizers=("balanced", "uniform")) -> list[dict]:
    console = Console()
    model = datasets.bundled_model("cnn")
    x, y = datasets.load_sample()
    calib = datasets.load_calib()
    rows = []
    steps = len(quantizers) * 3
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        task = prog.add_task("starting", total=steps)
        for q in quantizers:
            prog.update(task, description=f"{q}: compiling")
            start = time.perf_counter()
            result = api.compile(model, config=preset, quantizer=q, calib=calib,
                                 progress=lambda name, q=q: prog.update(task, description=f"{q}: {name}"))
            seconds = time.perf_counter() - start
            prog.advance(task)
            prog.update(task, description=f"{q}: saving")
            result.save(Path(out) / q)
            prog.advance(task)
            prog.update(task, description=f"{q}: evaluating {len(y)} images")
            acc = evaluate.compare(result.float_model, result.model, x, y)
            prog.advance(task)
            rows.append({"quantizer": q, **acc, "compression": result.report["totals"]["compression"],
                         "compile_s": seconds})
    table = Table(title=f"bundled Fashion-MNIST CNN, {preset}, {len(y)} test images")
    for col in ("quantizer", "float top-1", "quantized top-1", "change", "agreement", "weights smaller", "compile"):
        table.add_column(col, justify="left" if col == "quantizer" else "right")
    for r in rows:
        table.add_row(r["quantizer"], f"{r['float_top1']:.1%}", f"{r['quant_top1']:.1%}",
                      f"{(r['quant_top1'] - r['float_top1']) * 100:+.1f} pt", f"{r['agreement']:.1%}",
                      f"{r['compression']}x", f"{r['compile_s']:.1f} s")
    console.print(table)
    console.print(f"models, reports and weight plots in {Path(out).resolve()}/<quantizer>/")
    return rows
