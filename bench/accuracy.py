"""Accuracy of the bundled models, float vs quantized, per quantizer and preset (run on demand, not a test).

    python bench/accuracy.py [--write]     # --write replaces the "## Accuracy" section of bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import platform

from _common import write_section

from qcompile import api, datasets, evaluate

QUANTIZERS = ("balanced", "balanced-mean", "uniform", "dorefa")
PRESETS = ("w4a4", "w2a2", "w1a2")


def measure() -> list[dict]:
    x, y = datasets.load_sample()
    calib = datasets.load_calib()
    rows = []
    for model in ("cnn", "mlp"):
        for preset in PRESETS:
            for q in QUANTIZERS:
                result = api.compile(datasets.bundled_model(model), config=preset, quantizer=q, calib=calib)
                acc = evaluate.compare(result.float_model, result.model, x, y)
                rows.append({"model": model, "preset": preset, "quantizer": q, **acc,
                             "entropy": sum(r["entropy_bits"] for r in result.report["layers"])
                             / max(len(result.report["layers"]), 1)})
                print(f"{model} {preset} {q:14s} float {acc['float_top1']:.3f} quant {acc['quant_top1']:.3f}",
                      flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    x, _ = datasets.load_sample()
    lines = ["## Accuracy (bundled models, post-training quantization)", "",
             f"{datetime.date.today()}, {platform.node() or 'dev machine'}; `python bench/accuracy.py --write`. "
             f"Top-1 on the bundled {len(x)}-image Fashion-MNIST test sample; first/last layer float, per-channel "
             "weights, calibration on the bundled 512 training images (MSE clip), bias correction on. "
             "'entropy' = mean effective bits of the weight codes (k = every level equally used).", "",
             "| model | preset | float | " + " | ".join(QUANTIZERS) + " |", "|---|---|---|" + "---|" * len(QUANTIZERS)]
    for model in ("cnn", "mlp"):
        for preset in PRESETS:
            sel = {r["quantizer"]: r for r in rows if r["model"] == model and r["preset"] == preset}
            best = max(sel.values(), key=lambda r: r["quant_top1"])["quantizer"]
            cells = [(f"**{sel[q]['quant_top1']:.1%}**" if q == best else f"{sel[q]['quant_top1']:.1%}")
                     + f" ({sel[q]['entropy']:.2f} b)" for q in QUANTIZERS]
            lines.append(f"| {model} | {preset} | {next(iter(sel.values()))['float_top1']:.1%} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"




if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    table = markdown(measure())
    print(table)
    if args.write:
        write_section(table.splitlines()[0], table)
