import numpy as np
import pytest

from qcompile import datasets, demo


def test_demo_runs_the_whole_job_and_fine_tuning_recovers_accuracy(tmp_path):
    """The README's main command: post-training, a short fine-tune, the artifact, accuracy and speed."""
    try:
        datasets.load_fashion_mnist("train")
    except Exception:
        pytest.skip("dataset-fashion-mnist is not installed (scripts/test.sh installs it when run as root)")
    res = demo.run(tmp_path / "demo", "w1a2", "dorefa", steps=120, bench_runs=3)
    acc = {r["model"]: r["top1"] for r in res["accuracy"]}
    floating, ptq = acc["float (onnxruntime)"], acc["w1a2 post-training"]
    tuned = acc["w1a2 fine-tuned (fake-quant, onnxruntime)"]
    deployed = acc["w1a2 deployed artifact (bit kernels)"]
    assert floating > 0.9 and ptq < 0.7                   # W1A2 post-training loses 40 points ...
    assert tuned > ptq + 0.2 and tuned > 0.85              # ... a short fine-tune brings most of them back
    assert res["identical"] and deployed == tuned          # the artifact computes the fine-tuned model exactly
    for batch, rows in res["speed"].items():
        engines = {r["engine"] for r in rows}
        assert {"qcompile (artifact)", "onnxruntime fp32"} <= engines
        assert all(np.isfinite(r["p50_ms"]) and r["p50_ms"] > 0 for r in rows)
    for sub in ("ptq/model.onnx", "finetuned/model.onnx", "finetuned/curves.png", "artifact/manifest.json"):
        assert (tmp_path / "demo" / sub).is_file(), sub
