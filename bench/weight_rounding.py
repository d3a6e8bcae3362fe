"""Post-training weight rounding, nearest against GPTQ, on a residual network (run on demand, not a test).

    python bench/weight_rounding.py [--write]

Trains a small residual CNN (conv-BN-ReLU stem, two residual blocks, a strided downsampling conv) on the 60,000
Fashion-MNIST training images for one epoch (torch, about a minute on 2 cores; seeded), exports it to ONNX, then
compiles it post-training with each quantizer at W4A4 and W2A4, nearest rounding against GPTQ (`--rounding gptq`),
and scores onnxruntime's fake-quant models on the full 10,000-image test set. --write replaces the "## Weight
rounding" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import cpu_name, load_average, publish

from qcompile import api, datasets, evaluate

QUANTIZERS = ("uniform", "dorefa", "balanced")
PRESETS = ("w4a4", "w2a4")


def residual_net():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), Block(32),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                         Block(64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def train(path: Path) -> float:
    import torch

    torch.manual_seed(0)
    x, y = datasets.load_fashion_mnist("train")
    x, y = torch.from_numpy(datasets.to_float(x)), torch.from_numpy(y.astype(np.int64))
    net = residual_net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    net.train()
    for i in range(0, len(x) - 127, 128):
        idx = order[i:i + 128]
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:2],), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False, dynamic_axes={"input": {0: "N"}})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    xt, yt = datasets.load_fashion_mnist("test")
    xt, yt = datasets.to_float(xt), yt.astype(np.int64)
    calib = datasets.load_calib()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "resnet.onnx"
        train_s = train(model)
        for preset in PRESETS:
            for q in QUANTIZERS:
                row = {"preset": preset, "quantizer": q}
                for rounding in ("nearest", "gptq"):
                    start = time.perf_counter()
                    result = api.compile(model, config=preset, quantizer=q, calib=calib, weight_rounding=rounding)
                    row[f"{rounding}_s"] = time.perf_counter() - start
                    pf = evaluate.predict(result.float_model, xt).argmax(1)
                    row["float"] = float((pf == yt).mean())
                    row[rounding] = float((evaluate.predict(result.model, xt).argmax(1) == yt).mean())
                print(row, flush=True)
                rows.append(row)
    lines = ["## Weight rounding (post-training, residual CNN)", "",
             f"{datetime.date.today()}, {cpu_name()}, 2 cores, load {load_average()}; "
             "`python bench/weight_rounding.py --write`. A residual CNN (stem, two residual blocks, a strided conv; "
             f"BN folded) trained one epoch on Fashion-MNIST in this run ({train_s:.0f} s), float top-1 "
             f"{rows[0]['float']:.2%} on the 10,000 test images; post-training quantization calibrated on the "
             "bundled 512 images, first/last layer float. GPTQ keeps each quantizer's grid and picks the levels "
             "that minimise the layer's output error on the calibration data.", "",
             "| preset | quantizer | nearest | GPTQ | change | compile nearest / GPTQ |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['quantizer']} | {r['nearest']:.2%} | {r['gptq']:.2%} | "
                     f"{(r['gptq'] - r['nearest']) * 100:+.2f} pt | {r['nearest_s']:.1f} / {r['gptq_s']:.1f} s |")
    text = "\n".join(lines) + "\n"
    publish(lines[0], text, args.write)


if __name__ == "__main__":
    main()
