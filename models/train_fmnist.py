#!/usr/bin/env python
"""Train the bundled Fashion-MNIST models and export them to ONNX (offline; needs the torch extra).

    python models/train_fmnist.py --model all --out models/

Writes, into --out:
  fmnist_cnn.onnx     conv-BN-ReLU CNN (architecture fixed: benchmarks depend on it)
  fmnist_mlp.onnx     TFC-style MLP 784-256-256-256-10 with BN1d+ReLU
  fmnist_sample.npz   first 1000 images of the official test split: x uint8 [1000,1,28,28], y uint8 [1000]
  fmnist_calib.npz    512 train images, stratified by class with a fixed seed: x uint8 [512,1,28,28]

Preprocessing is qcompile.datasets.to_float (x/255, no normalization), the same the compiler uses.
BatchNormalization nodes are kept in the ONNX graphs (the compiler's canonicalize pass folds them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qcompile.datasets import load_fashion_mnist, to_float  # noqa: E402

DEFAULT_EPOCHS = {"cnn": 1, "mlp": 10}
OPSET = 17
SEED = 0
SAMPLE_N = 1000
CALIB_N = 512


def conv_block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


def make_cnn() -> nn.Module:
    # 28x28 -> conv1 -> conv2+pool 14x14 -> conv3+pool 7x7 -> conv4+pool 3x3 (floor) -> 1152 -> 256 -> 10
    return nn.Sequential(
        *conv_block(1, 32, pool=False),
        *conv_block(32, 64, pool=True),
        *conv_block(64, 128, pool=True),
        *conv_block(128, 128, pool=True),
        nn.Flatten(),
        nn.Linear(128 * 3 * 3, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 10),
    )


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 10),
    )


MAKERS = {"cnn": make_cnn, "mlp": make_mlp}


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def train(name: str, epochs: int, batch: int, lr: float, hflip: bool,
          xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> nn.Module:
    seed_everything(SEED)
    model = MAKERS[name]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(xtr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                                pct_start=0.25)
    rng = np.random.default_rng(SEED)
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(xtr)))
        loss_sum, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            if hflip:
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
        acc = evaluate(model, xte, yte)
        print(f"[{name}] epoch {epoch}/{epochs}  loss {loss_sum / len(xtr):.4f}  train acc {correct / len(xtr):.4f}  "
              f"test acc {acc:.4f}  elapsed {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return model


def _inline_identities(model_proto) -> None:
    """Replace `y = Identity(initializer)` by an initializer named y.

    The TorchScript exporter deduplicates equal parameters (e.g. BN running_var == weight == 1) into Identity
    nodes; the compiler wants plain initializers on BatchNormalization.
    """
    import onnx
    from onnx import numpy_helper

    g = model_proto.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in {o.name for o in g.output}:
            arr = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(arr.copy(), name=node.output[0]))
            inits[node.output[0]] = g.initializer[-1]
        else:
            keep.append(node)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)
    onnx.checker.check_model(model_proto)


def export(model: nn.Module, path: Path, xcheck: np.ndarray) -> None:
    import onnx
    import onnxruntime as ort

    model.eval()
    dummy = torch.from_numpy(xcheck[:2])
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model, (dummy,), str(tmp),
        dynamo=False,
        export_params=True,
        do_constant_folding=False,  # constant folding in EVAL mode fuses Conv+BN; we keep BN for the compiler
        training=torch.onnx.TrainingMode.EVAL,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    proto = onnx.load(str(tmp))
    tmp.unlink()
    _inline_identities(proto)
    proto.producer_name = "qcompile models/train_fmnist.py"
    onnx.save(proto, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    nbn = ops.count("BatchNormalization")
    if nbn == 0:
        raise RuntimeError(f"{path}: exporter folded BatchNormalization away")

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = xcheck[:256]
    got = sess.run(["logits"], {"input": xb})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(xb)).numpy()
    diff = float(np.abs(got - want).max())
    print(f"exported {path} ({path.stat().st_size} bytes, opset {OPSET}, {nbn} BatchNormalization nodes, "
          f"ops: {' '.join(dict.fromkeys(ops))}); onnxruntime vs torch max abs diff {diff:.2e}", flush=True)
    if diff >= 1e-4:
        raise RuntimeError(f"{path}: onnxruntime output differs from torch by {diff}")


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), 1000):
        correct += int((sess.run(["logits"], {"input": x[i:i + 1000]})[0].argmax(1) == y[i:i + 1000]).sum())
    return correct / len(x)


def write_data(out: Path, xtr_u8: np.ndarray, ytr_u8: np.ndarray, xte_u8: np.ndarray, yte_u8: np.ndarray) -> None:
    np.savez_compressed(out / "fmnist_sample.npz", x=xte_u8[:SAMPLE_N], y=yte_u8[:SAMPLE_N])
    # Stratified: CALIB_N // 10 per class, the remainder from the first classes; fixed seed, sorted indices.
    rng = np.random.default_rng(1234)
    per, rem = divmod(CALIB_N, 10)
    idx = np.concatenate([rng.choice(np.flatnonzero(ytr_u8 == c), per + (c < rem), replace=False)
                          for c in range(10)])
    idx.sort()
    np.savez_compressed(out / "fmnist_calib.npz", x=xtr_u8[idx])
    print(f"wrote {out / 'fmnist_sample.npz'} and {out / 'fmnist_calib.npz'} ({len(idx)} train images)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["cnn", "mlp", "all"], default="all")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs per model (default: {DEFAULT_EPOCHS})")
    ap.add_argument("--out", type=Path, default=REPO / "models")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--hflip", action="store_true", help="random horizontal flips (light augmentation)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-data", action="store_true", help="do not (re)write the sample/calibration .npz files")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    xtr_u8, ytr_u8 = load_fashion_mnist("train")
    xte_u8, yte_u8 = load_fashion_mnist("test")
    if not args.no_data:
        write_data(args.out, xtr_u8, ytr_u8, xte_u8, yte_u8)

    xtr, ytr = torch.from_numpy(to_float(xtr_u8)), torch.from_numpy(ytr_u8.astype(np.int64))
    xte_np, yte_np = to_float(xte_u8), yte_u8.astype(np.int64)
    xte, yte = torch.from_numpy(xte_np), torch.from_numpy(yte_np)

    names = ["cnn", "mlp"] if args.model == "all" else [args.model]
    for name in names:
        epochs = args.epochs or DEFAULT_EPOCHS[name]
        t0 = time.time()
        model = train(name, epochs, args.batch, args.lr, args.hflip, xtr, ytr, xte, yte)
        train_s = time.time() - t0
        path = args.out / f"fmnist_{name}.onnx"
        export(model, path, xte_np)
        full = evaluate(model, xte, yte)
        full_ort = ort_accuracy(path, xte_np, yte_np)
        sample = ort_accuracy(path, xte_np[:SAMPLE_N], yte_np[:SAMPLE_N])
        print(f"[{name}] final: {epochs} epochs in {train_s:.0f}s; float test accuracy (10000 images) "
              f"torch {full:.4f} onnxruntime {full_ort:.4f}; on the {SAMPLE_N}-image sample {sample:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
