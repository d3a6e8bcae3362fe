"""The bundled Fashion-MNIST CNN at W1A1 in Larq + Larq Compute Engine, timed with LCE's own interpreter.

Runs INSIDE bench/lce/.venv (bash bench/lce/setup.sh), called by bench/lce/bench_lce.py; also by hand:

    bench/lce/.venv/bin/python bench/lce/lce_model.py [--rounds 5] [--threads 2] [--batches 1 64]

Prints one JSON object on stdout: {"1": ms, "64": ms, "setting": {batch: fastest interpreter setting},
"all": {setting: {batch: ms}}, "lce_version": ..., "tensorflow_version": ..., "larq_version": ...}.

The topology is models/fmnist_cnn.onnx's (input 1x28x28 NCHW there, 28x28x1 NHWC here):

    Conv 32 3x3 pad 1 (float) -> BN -> ReLU
    Conv 64 3x3 pad 1 (W1A1) -> BN -> ReLU -> MaxPool 2
    Conv 128 3x3 pad 1 (W1A1) -> BN -> ReLU -> MaxPool 2
    Conv 128 3x3 pad 1 (W1A1) -> BN -> ReLU -> MaxPool 2 -> Flatten (1152)
    Gemm 256 (W1A1) -> BN -> ReLU
    Gemm 10 (float)

with the same layers binary as qcompile's w1a1 plan (`qcompile inspect`: the first conv and the last Gemm stay
float, the three inner convs and the 1152->256 Gemm are W1A1). Binary layers are larq QuantConv2D / QuantDense
with ste_sign input and kernel quantizers and weight_clip, in larq's idiom for LCE: BatchNorm right after each
binary layer (LCE fuses it into the binary conv's output transform), no ReLU in front of a sign (ReLU then sign
would be constant; the 1-bit code of a ReLU output is a threshold, which the sign of the BN output is, so the
compute is the same), MaxPool after BN (LCE turns MaxPool -> sign into a bitpacked max-pool), and one-padding
(`pad_values=1.0`, LCE's fast "same" padding). Weights are random: this measures latency only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # larq and LCE 0.16 build on tf-keras (Keras 2)

import numpy as np  # noqa: E402

# interpreter settings of LCE 0.16's Interpreter (use_reference_bconv, use_indirect_bgemm, use_xnnpack)
SETTINGS = {
    "default (optimized bgemm)": dict(use_reference_bconv=False, use_indirect_bgemm=False, use_xnnpack=False),
    "use_indirect_bgemm": dict(use_reference_bconv=False, use_indirect_bgemm=True, use_xnnpack=False),
    "use_reference_bconv": dict(use_reference_bconv=True, use_indirect_bgemm=False, use_xnnpack=False),
    "default + xnnpack": dict(use_reference_bconv=False, use_indirect_bgemm=False, use_xnnpack=True),
    "use_indirect_bgemm + xnnpack": dict(use_reference_bconv=False, use_indirect_bgemm=True, use_xnnpack=True),
}
# the 1152->256 W1A1 Gemm: LCE 0.16 has no binary fully-connected op (a QuantDense becomes a float FULLY_CONNECTED
# behind an LceDequantize), so it is also built as the equivalent binary conv; the faster one counts
GEMM = {"dense": "Gemm as QuantDense", "conv": "Gemm as 3x3 QuantConv2D"}


def build(batch: int, gemm: str):
    import larq as lq
    import tensorflow as tf

    keras = tf.keras
    binary = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                  use_bias=False)

    def bn():
        return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)

    x_in = keras.Input(shape=(28, 28, 1), batch_size=batch, name="input")
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(x_in)           # /0/Conv, float
    x = keras.layers.ReLU()(bn()(x))
    x = lq.layers.QuantConv2D(64, 3, padding="same", pad_values=1.0, **binary)(x)  # /3/Conv
    x = keras.layers.MaxPool2D(2)(bn()(x))
    x = lq.layers.QuantConv2D(128, 3, padding="same", pad_values=1.0, **binary)(x)  # /7/Conv
    x = keras.layers.MaxPool2D(2)(bn()(x))
    x = lq.layers.QuantConv2D(128, 3, padding="same", pad_values=1.0, **binary)(x)  # /11/Conv
    x = keras.layers.MaxPool2D(2)(bn()(x))
    if gemm == "dense":
        x = keras.layers.Flatten()(x)                                               # 3*3*128 = 1152
        x = lq.layers.QuantDense(256, **binary)(x)                                  # /16/Gemm
    else:  # the same product as a binary 3x3 "valid" conv over the 3x3x128 map, which LCE runs as LceBconv2d
        x = lq.layers.QuantConv2D(256, 3, padding="valid", **binary)(x)             # /16/Gemm
        x = keras.layers.Flatten()(x)
    x = keras.layers.ReLU()(bn()(x))
    x = keras.layers.Dense(10)(x)                                                   # /19/Gemm, float
    model = keras.Model(x_in, x)
    # random BN statistics, so the fused output transforms are not trivial
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.1, beta.shape).astype(np.float32),
                               rng.normal(0, 0.1, mean.shape).astype(np.float32),
                               rng.uniform(0.5, 1.5, var.shape).astype(np.float32)])
    return model


def convert(batch: int, gemm: str) -> bytes:
    import larq_compute_engine as lce

    return lce.convert_keras_model(build(batch, gemm), target="arm")  # "arm" is LCE's only CPU target (x86 runs it too)


def op_counts(flatbuffer: bytes) -> dict[str, int]:
    """Ops of the converted model (to check the binary layers became LceBconv2d etc.)."""
    try:
        from tensorflow.lite.python import schema_py_generated as schema
    except ImportError:  # pragma: no cover
        return {}
    m = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    names = []
    for code in m.operatorCodes:
        b = max(code.builtinCode, code.deprecatedBuiltinCode)
        names.append(code.customCode.decode() if code.customCode else
                     next(k for k, v in vars(schema.BuiltinOperator).items() if v == b))
    out: dict[str, int] = {}
    for op in m.subgraphs[0].operators:
        out[names[op.opcodeIndex]] = out.get(names[op.opcodeIndex], 0) + 1
    return out


def best_ms(run, reps: int) -> float:
    """bench/_common.best_ms, the previous setting's worker threads idle first (as qcompile.benchmark.settle)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from _common import best_ms as common_best_ms

    return common_best_ms(run, reps, settle_s=0.15)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from importlib.metadata import version

    from larq_compute_engine.tflite.python.interpreter import Interpreter

    times: dict[str, dict[int, float]] = {}
    ops = {}
    for batch in args.batches:
        x = np.random.default_rng(batch).random((batch, 28, 28, 1), dtype=np.float32)
        engines = {}
        for gemm, label in GEMM.items():
            fb = convert(batch, gemm)  # the interpreter runs the batch the model was converted for
            ops[f"{label}, batch {batch}"] = op_counts(fb)
            for name, kw in SETTINGS.items():
                try:
                    it = Interpreter(fb, num_threads=args.threads, **kw)
                    it.interpreter.predict([x])  # the wrapper: one invoke on the whole batch
                    engines[f"{name}; {label}"] = it
                except Exception as e:  # a setting this build lacks
                    print(f"lce_model: setting {name!r} unavailable: {e}", file=sys.stderr)
        best: dict[str, float] = {k: float("inf") for k in engines}
        for _ in range(args.rounds):  # interleaved rounds: a busy spell of the machine hits every setting alike
            for name, it in engines.items():
                best[name] = min(best[name], best_ms(lambda: it.interpreter.predict([x]),
                                                     reps=20 if batch == 1 else 3))
        for name, ms in best.items():
            times.setdefault(name, {})[batch] = ms
            print(f"lce_model: batch {batch} {name}: {ms:.3f} ms", file=sys.stderr)

    result: dict = {"setting": {}, "all": times, "ops": ops}
    for batch in args.batches:
        name = min((k for k in times if batch in times[k]), key=lambda k: times[k][batch])
        result[batch] = times[name][batch]
        result["setting"][batch] = name
    result.update(lce_version=version("larq-compute-engine"), tensorflow_version=version("tensorflow-cpu"),
                  larq_version=version("larq"),
                  threads=args.threads, rounds=args.rounds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
