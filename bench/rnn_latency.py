"""Latency per token of a compiled quantized LSTM/GRU against onnxruntime's float and int8 ones and numpy.

The recurrent layer of each bundled KJV language model (input 128, hidden 200), alone in a one-node model, run over a
window of 35 tokens at batch 1 and 16:

* onnxruntime fp32: the ONNX LSTM/GRU op;
* onnxruntime int8: `quantize_dynamic` of that model (the LSTM becomes com.microsoft DynamicQuantizeLSTM; onnxruntime
  has no quantized GRU, so the GRU stays float there: the column says so);
* numpy: the float cell step by step (passes/rnn.run, float32);
* qcompile: the W2A2 / W4A4 artifact (one Recurrent custom op in one onnxruntime session: the time loop in the kernel
  library), calibrated on the shipped sample's embeddings.

Each engine is timed in turns (best of `--reps` runs of the window), single-threaded and with the machine's threads.
Prints one table; `--write` puts it into bench/RESULTS.md. Usage: python bench/rnn_latency.py [--write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).parent))
from _common import best_ms, cpu_name, load_average, publish  # noqa: E402

SEQ = 35


def layer_model(cell: str, out: Path) -> tuple[Path, np.ndarray]:
    """The bundled LM's LSTM/GRU node as a one-node model, and a calibration/feed sequence of its real inputs
    (the embeddings of the shipped sample's tokens)."""
    from qcompile import datasets, lm

    src = onnx.load(datasets.bundled_lm(cell))
    node = next(n for n in src.graph.node if n.op_type == cell.upper())
    inits = {t.name: t for t in src.graph.initializer}
    hidden = next(a.i for a in node.attribute if a.name == "hidden_size")
    W = onnx.numpy_helper.to_array(inits[node.input[1]])
    keep = [i for i in node.input[1:4] if i]
    rnn = helper.make_node(node.op_type, ["x", *node.input[1:4]], ["y"], name=node.name,
                           **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph([rnn], "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                             ["seq", "batch", W.shape[2]])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                             ["seq", W.shape[0], "batch", hidden])],
                              [inits[i] for i in keep])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = out / f"{cell}_layer.onnx"
    onnx.save(model, path)
    # real inputs: the embedding of the sample's tokens (the Gather before the recurrent layer)
    tokens, _ = datasets.load_lm_sample()
    emb_name = next(n for n in src.graph.node if n.op_type == "Gather").input[0]
    table = onnx.numpy_helper.to_array(inits[emb_name])
    x = table[lm.batchify(tokens[:20000], 16)[:SEQ * 8]].astype(np.float32)     # [280, 16, 128]
    return path, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = ap.parse_args()

    import qcompile
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from qcompile.passes.rnn import recurrent_spec, run
    from qcompile.runtime import InferenceSession

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for cell in ("lstm", "gru"):
            path, x = layer_model(cell, tmp)
            quantize_dynamic(str(path), str(tmp / f"{cell}_int8.onnx"), weight_type=QuantType.QInt8)
            int8_ops = {n.op_type for n in onnx.load(tmp / f"{cell}_int8.onnx").graph.node}
            arts = {}
            for bits in (2, 4):
                r = qcompile.compile(path, config=f"w{bits}a{bits}", calib={"x": x.reshape(-1, 16, x.shape[-1])[:SEQ * 4]},
                                     target="cpu")
                r.save(tmp / f"{cell}_w{bits}")
                arts[bits] = tmp / f"{cell}_w{bits}"
            model = onnx.load(path)
            consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
            spec = recurrent_spec(model.graph.node[0], consts.get)
            # numpy first, before any onnxruntime session exists: spinning session threads would stall its BLAS
            numpy_ms = {b: best_ms(lambda: run(spec, np.ascontiguousarray(x[:SEQ, :b])), max(3, args.reps // 20))
                        for b in (1, 16)}
            for threads in (1, 0):
                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.log_severity_level = 3
                f32 = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                i8 = ort.InferenceSession(str(tmp / f"{cell}_int8.onnx"), so, providers=["CPUExecutionProvider"])
                q = {b: InferenceSession(a, intra_op_num_threads=threads) for b, a in arts.items()}
                for batch in (1, 16):
                    xb = np.ascontiguousarray(x[:SEQ, :batch])  # noqa: B023 - each lambda runs at once
                    feeds = {"x": xb}
                    t = {"fp32": best_ms(lambda: f32.run(None, feeds), args.reps),
                         "int8": best_ms(lambda: i8.run(None, feeds), args.reps),
                         "numpy": numpy_ms[batch]}
                    for b, sess in q.items():
                        t[f"w{b}a{b}"] = best_ms(lambda: sess.run(None, feeds), args.reps)
                    rows.append((cell.upper(), threads or "all", batch, t,
                                 "DynamicQuantizeLSTM" if "DynamicQuantizeLSTM" in int8_ops else "float (no int8 GRU)"))
    us = lambda ms: f"{ms / SEQ * 1e3:.2f}"  # noqa: E731 - per token, microseconds
    lines = ["## Recurrent layer latency per token (bench/rnn_latency.py)", "",
             f"{cpu_name()}, load {load_average()}; the bundled KJV LMs' recurrent layer (input 128, hidden 200), "
             f"windows of {SEQ} tokens, best of {args.reps}; microseconds per token (per step of all `batch` "
             "sequences); ratios = onnxruntime fp32 time / qcompile time.", "",
             "| layer | threads | batch | ORT fp32 | ORT int8 | numpy | qcompile W2A2 | qcompile W4A4 | W2A2 vs fp32 | "
             "W2A2 vs int8 | W4A4 vs fp32 | ORT int8 op |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for cell, threads, batch, t, int8_op in rows:
        lines.append(f"| {cell} | {threads} | {batch} | {us(t['fp32'])} | {us(t['int8'])} | {us(t['numpy'])} | "
                     f"{us(t['w2a2'])} | {us(t['w4a4'])} | **{t['fp32'] / t['w2a2']:.2f}x** | "
                     f"{t['int8'] / t['w2a2']:.2f}x | {t['fp32'] / t['w4a4']:.2f}x | {int8_op} |")
    publish("## Recurrent layer latency per token (bench/rnn_latency.py)", "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
