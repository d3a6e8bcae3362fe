"""Hardware-aware kernel choice per quantized layer: bit-serial popcount, onnxruntime int8, or float.

A cost model turns each layer's work (M x N x K multiply-adds, bit planes) and the target's capabilities into
estimated milliseconds; with autotune, each candidate is timed on this machine and the fastest is kept. Every
choice carries its reason, and a low-bit layer is never put on a kernel the estimate (or the clock) says is slower
than float without the report saying so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

KERNELS = ("bitserial", "int8", "float")

# Sustained throughput per core per cycle, by what the CPU has (the design numbers; bench/ measures the real ones):
# popcount bits (AVX-512 VPOPCNTDQ ~512, AVX2 nibble-LUT ~128, scalar popcnt 64), fp32 FMA MACs, int8 MACs.
POPCOUNT_BITS_PER_CYCLE = {"avx512": 512, "avx2": 128, "generic": 64}
FLOAT_MACS_PER_CYCLE = {"avx512": 32, "avx2": 16, "generic": 4}
INT8_MACS_PER_CYCLE = {"amx": 1024, "vnni": 128, None: 32}  # VNNI vpdpbusd; AVX2 vpmaddubsw
# onnxruntime's ConvInteger has no VNNI/AMX kernel, whatever the CPU: the 3x3 256-channel bench conv measured
# 15.6 G MAC/s on 2 Sapphire Rapids cores (AMX) and 17.6 on 2 Zen 1 cores, 8x slower than its float Conv
INT8_CONV_MACS_PER_CYCLE = 8
# AVX2 vpshufb over 4-channel tables: 32 lookups x 4 multiply-adds per instruction, ~1 per cycle (layer_lconv.c)
LUT_MACS_PER_CYCLE = 128
EFFICIENCY = {"bitserial": 0.5, "int8": 0.4, "float": 0.6}
CALL_OVERHEAD_MS = {"bitserial": 0.01, "int8": 0.03, "float": 0.03}
# A bit layer is a custom-op node inside the one onnxruntime session the runtime makes (runtime/inference.py):
# leaving onnxruntime's own kernels costs the op's dispatch (in the profile's per-call cost) and, between float
# convs, a layout reorder out of and back into NCHWc. A few us; it was 30 us per switch when each float
# partition was its own onnxruntime run, and kept the bundled MLP's W1A2 layers on int8 (measured then 0.045 ms at
# batch 1 against 0.038 ms on the bit kernels).
PARTITION_SWITCH_MS = 0.003
# A grouped BitConv gathers its im2col rows group by group, one bit-field copy per output pixel, tap and activation
# plane (layer_conv.c, stage 2): measured 3.2-3.7 ns each on Zen 4 for depthwise 5x5 convs (rapidocr's classifier:
# 7.5 ms for a 104-group layer whose GEMM is 0.03 ms). Depthwise layers with few channels per group pay it in full.
GROUPED_IM2COL_NS_PER_TAP = 3.5
# 9-bit weight integers on onnxruntime's int8 ops: the layer's ConvInteger/MatMulInteger plus a window sum and
# three int32 elementwise ops over the output (passes/int8.py); a rough 30 % (--autotune measures it)
NINE_BIT_INT8_COST = 1.3


@dataclass
class KernelChoice:
    node: str
    kernel: str
    estimate_ms: dict[str, float]
    measured_ms: dict[str, float] = field(default_factory=dict)
    why: str = ""


def lead_rows(spec) -> int:
    """Rows per sample of a BitGemm over [batch, seq, ..., K]; a symbolic size (0) counts as 1."""
    return int(np.prod([d or 1 for d in spec.extra.get("lead_shape", ())], dtype=np.int64))


def layer_macs(spec, batch: int) -> tuple[int, int, int]:
    """(M, N, K) of the layer as a GEMM: rows are output pixels (conv) or samples (gemm)."""
    ho, wo = spec.out_hw
    rows = lead_rows(spec)  # a BitGemm over [batch, seq, K]
    return batch * ho * wo * rows, spec.N, spec.K


def lut_kernel(spec, caps) -> bool:
    """Whether the layer's bit kernel sums by lookup tables on this target rather than by popcounts: what
    targets.cpu.codegen.x86_kernels says for the target's path (an AVX-512 target's library has the AVX-512 BitGemm
    kernels, which it keeps its BitGemms on; its BitConvs run the AVX2 LUT kernels)."""
    from qcompile.targets.cpu.codegen import x86_kernels

    return x86_kernels(spec).get(f"{caps.path}_kernel") == "lut"


def weight_ints(spec) -> np.ndarray:
    """The integers 2q - zero2 a fake-quant layer multiplies by (int16: 8-bit weights need 9 bits)."""
    return 2 * spec.w.astype(np.int16) - spec.wzero2.reshape((-1,) + (1,) * (spec.w.ndim - 1)).astype(np.int16)


def int8_fits(spec) -> bool:
    """onnxruntime's ConvInteger/MatMulInteger take int8 weights: 2q - zero2 in [-128, 127] directly; 9-bit
    integers (8-bit weights) go as 2 x int8 + a per-channel offset (passes/int8.py), at NINE_BIT_INT8_COST."""
    ints = weight_ints(spec)
    return not ints.size or (int(ints.min()) >= -128 and int(ints.max()) <= 127)


def estimate_ms(spec, caps, batch: int, profile=None) -> dict[str, float]:
    """Predicted milliseconds of the layer on each candidate at ``batch``: from this machine's measured profile
    (targets.cpu.profile) where it has the candidate, else from the design constants below."""
    m, n, k = layer_macs(spec, batch)
    hz = caps.ghz * 1e9 * caps.cores
    path = caps.path
    if path == "avx512" and spec.op == "conv":
        path = "avx2"  # the AVX-512 path runs BitConv on the AVX2 kernels (templates/common.h, QC_PER_LAYER)
    int8_rate = INT8_CONV_MACS_PER_CYCLE if spec.op == "conv" else INT8_MACS_PER_CYCLE.get(caps.int8_dot, 32)
    if lut_kernel(spec, caps):  # one table lookup per 4 channels and weight plane, whatever the activation bits
        bit_cycles = m * n * k * spec.bits_w / (LUT_MACS_PER_CYCLE * hz * EFFICIENCY["bitserial"])
    else:                       # one AND+popcount bit per plane pair
        bit_cycles = m * n * k * spec.bits_a * spec.bits_w / (POPCOUNT_BITS_PER_CYCLE[path] * hz * EFFICIENCY["bitserial"])
    if spec.op == "conv" and spec.group > 1:
        ho, wo = spec.out_hw
        taps = batch * ho * wo * spec.kernel[0] * spec.kernel[1] * spec.group * spec.bits_a
        bit_cycles += taps * GROUPED_IM2COL_NS_PER_TAP * 1e-9
    est = {
        "bitserial": bit_cycles,
        "int8": m * n * k / (int8_rate * hz * EFFICIENCY["int8"]),
        "float": m * n * k / (FLOAT_MACS_PER_CYCLE[caps.path] * hz * EFFICIENCY["float"]),
    }
    est = {kern: t * 1e3 + CALL_OVERHEAD_MS[kern] for kern, t in est.items()}
    if profile is not None:
        from qcompile.targets.cpu.profile import rate_key, work_units

        sums = "lut" if lut_kernel(spec, caps) else "popcount"
        for kern in est:
            got = profile.predict_ms(rate_key(spec, kern, sums), work_units(spec, kern, sums, m * n * k))
            if got is not None:
                est[kern] = got
        if spec.op == "conv" and spec.group > 1:
            est["bitserial"] += taps * GROUPED_IM2COL_NS_PER_TAP * 1e-6
    if not int8_fits(spec):  # the window-sum conv (one channel, or one per group) and three int32 elementwise ops
        est["int8"] *= NINE_BIT_INT8_COST if spec.group == 1 else 2.0
    return est


def choose(specs, caps, batch: int, measured: dict[str, dict[str, float]] | None = None,
           force: str | None = None, profile=None) -> dict[str, KernelChoice]:
    """Per layer, the fastest kernel by measurement (autotune) or estimate; `force` overrides the choice for
    every layer (the report still shows what the model predicted).

    Then per run of consecutive bit-serial layers (``specs`` in graph order): if the run saves less than the
    onnxruntime partition switch it causes (PARTITION_SWITCH_MS), it goes back to its best onnxruntime kernels."""
    choices, basis_of = {}, {}
    for spec in specs:
        est = estimate_ms(spec, caps, batch, profile)
        meas = (measured or {}).get(spec.name, {})
        basis = meas or est
        basis_of[spec.name] = basis
        kernel = force or min(basis, key=basis.get)
        how = "measured" if meas else "predicted (this CPU's profile)" if profile is not None else "estimated"
        bit_name = "lut" if lut_kernel(spec, caps) else "bitserial"  # what the report calls the bit kernel
        others = ", ".join(f"{bit_name if k == 'bitserial' else k} {v:.3f} ms"
                           for k, v in sorted(basis.items(), key=lambda kv: kv[1]))
        why = f"{how} at batch {batch}: {others}"
        if force:
            why = f"forced by --kernel {force}; " + why
        elif kernel != "bitserial":
            why = f"the W{spec.bits_w}A{spec.bits_a} bit kernel ({bit_name}) would be slower here; " + why
        choices[spec.name] = KernelChoice(spec.name, kernel, est, meas, why)
    if not force:
        for run in _bitserial_runs(specs, choices):
            best_ort = {s.name: min((k for k in KERNELS if k != "bitserial" and k in basis_of[s.name]),
                                    key=basis_of[s.name].get) for s in run}
            saved = sum(basis_of[s.name][best_ort[s.name]] - basis_of[s.name]["bitserial"] for s in run)
            if saved >= PARTITION_SWITCH_MS:
                continue
            names = ", ".join(s.name for s in run)
            for s in run:
                c = choices[s.name]
                c.kernel = best_ort[s.name]
                c.why = (f"bit-serial would save {saved:.3f} ms over {names} but leaving onnxruntime and coming back "
                         f"costs ~{PARTITION_SWITCH_MS:.3f} ms; " + c.why)
    return choices


def _bitserial_runs(specs, choices) -> list[list]:
    """Maximal runs of consecutive specs whose choice is bitserial."""
    runs, cur = [], []
    for spec in specs:
        if choices[spec.name].kernel == "bitserial":
            cur.append(spec)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


# ------------------------------------------------------------------------------------------------ autotune
def _best_ms(fn, reps: int = 5) -> float:
    fn()
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(specs, library, batch: int) -> dict[str, dict[str, float]]:
    """Time each layer on its three candidates at `batch`: the built bit kernel, and one-node onnxruntime models
    (ConvInteger/MatMulInteger + Cast, and a float Conv/Gemm) on inputs of the same shape, less the cost of an
    onnxruntime run itself (inside a partition the layer does not pay it; leaving onnxruntime does, which
    choose() charges as PARTITION_SWITCH_MS)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qcompile.passes.int8 import probe_model

    from qcompile.passes.calibrate import session_options

    rng = np.random.default_rng(0)
    so = session_options()
    # as the deployed runtime: idle onnxruntime workers must not spin, or they take the cores the bit kernel is
    # timed on next (measured: W1A2 K=N=256 batch 64 read 0.18-0.35 ms with spinning, 0.12 ms alone)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    out = {}
    # A one-node probe pays a whole onnxruntime run (Python, feeds, dispatch): tens of us that the layer does not
    # cost inside a float partition. Time an Identity model and take that off the onnxruntime candidates.
    ident = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [batch, 1])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)]), opset_imports=[helper.make_opsetid("", 21)])
    isess = ort.InferenceSession(ident.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xi = np.zeros((batch, 1), np.uint8)
    run_ms = _best_ms(lambda: isess.run(None, {"x": xi}))
    for spec in specs:
        rows = batch * lead_rows(spec)  # [batch, seq, K] BitGemms
        x = rng.integers(0, 2 ** spec.bits_a, (rows, *spec.in_shape), dtype=np.uint8)
        times = {"bitserial": _best_ms(lambda: library.run(spec.name, x, rows, check=False))}
        w_int = weight_ints(spec)
        if spec.op == "conv":
            attrs = dict(strides=list(spec.strides), pads=list(spec.pads), dilations=list(spec.dilations),
                         group=spec.group, kernel_shape=list(spec.kernel))
            int8_probe = probe_model(w_int, x.shape, attrs)
            nodes_f = [helper.make_node("Conv", ["xf", "wf"], ["y"], **attrs)]
            w_f = w_int.astype(np.float32)
        else:
            int8_probe = probe_model(np.ascontiguousarray(w_int.T), x.shape)
            nodes_f = [helper.make_node("MatMul", ["xf", "wf"], ["y"])]
            w_f = np.ascontiguousarray(w_int.T.astype(np.float32))
        g = helper.make_graph(nodes_f, "probe",
                              [helper.make_tensor_value_info("xf", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w_f, "wf")])
        float_probe = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        for kind, model, feeds in (("int8", int8_probe, {"x": x}),
                                   ("float", float_probe, {"xf": x.astype(np.float32)})):
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            times[kind] = max(_best_ms(lambda s=sess, f=feeds: s.run(None, f)) - run_ms, 1e-3)
        out[spec.name] = times
    return out
