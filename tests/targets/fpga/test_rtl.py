"""RTL MVAU (targets/fpga/rtl.py): Verilator runs bit-exact against qcompile.reference, lint, cycles and yosys LUTs
against targets/fpga/estimate.py.

Each Verilator model is built once per geometry (its ROMs are $readmemh files read when the simulation starts), then
run on many random weight / threshold / input sets, with and without random gaps and backpressure on the streams.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from qcompile import reference as ref
from qcompile.targets.cpu.spec import LayerSpec
from qcompile.targets.fpga import estimate, rtl

needs_verilator = pytest.mark.skipif(shutil.which("verilator") is None,
                                     reason="verilator not installed (apt-get install verilator)")
needs_yosys = pytest.mark.skipif(shutil.which("yosys") is None, reason="yosys not installed (apt-get install yosys)")

# (K, N, PE, SIMD, bits_a, L, xor): K never a multiple of SIMD or 64 except the fully parallel one; L = 0 is the
# accumulator output of a float-epilogue layer
GEOMETRIES = {
    "and_w1a2_fold": (50, 12, 3, 8, 2, 3, False),
    "xor_w1a1_fold": (70, 8, 2, 16, 1, 1, True),
    "and_w1a1_acc_serial": (13, 3, 1, 1, 1, 0, False),
    "and_w1a1_parallel": (20, 4, 4, 20, 1, 1, False),
}


def random_spec(rng, K, N, bits_a, L, xor, name="rand"):
    w = rng.integers(0, 2, (N, K)).astype(np.uint8)
    z = np.ones(N, np.int32) if xor else rng.choice([0, 1, 2], N).astype(np.int32)
    span = K * ((1 << bits_a) - 1) * 2
    if L:
        t = np.sort(rng.integers(-span // 2, span // 2 + 1, (N, L)), axis=1).astype(np.int32)
        t[0, -1] = 2**31 - 1  # out of the accumulator's range both ways: the RTL clips, the result must not change
        t[-1, 0] = -(2**31)
        return LayerSpec(name, "gemm", bits_a, 1, w, z, epilogue="threshold", thresholds=np.sort(t, axis=1),
                         xor_mode=xor)
    return LayerSpec(name, "gemm", bits_a, 1, w, z, xor_mode=xor)


def expected(spec, x):
    acc = ref.bit_gemm_xor(x, spec.w) if spec.xor_mode else ref.bit_gemm(x, spec.w, spec.wzero2)
    return ref.epilogue_threshold(acc, spec.thresholds) if spec.epilogue == "threshold" else acc


def write_roms(layer, run_dir):
    for key, lines in layer.roms.items():
        (run_dir / f"{key.split('_')[0].lower()}.mem").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def built(request, tmp_path_factory):
    """One bare qc_mvau build per geometry, with ROM files weights.mem / thresholds.mem / wzero2.mem (W, T, Z)."""
    K, N, PE, SIMD, bits_a, L, xor = GEOMETRIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    shutil.copyfile(rtl.TEMPLATES / rtl.MVAU_SOURCE, d / rtl.MVAU_SOURCE)
    acc_w = (2 * K * ((1 << bits_a) - 1) + 1).bit_length() + 1
    params = {"K": K, "N": N, "PE": PE, "SIMD": SIMD, "BITS_A": bits_a, "XOR_MODE": int(xor), "L": L,
              "ACC_W": acc_w, "Z_W": 3, "W_FILE": "w.mem", "T_FILE": "t.mem", "Z_FILE": "z.mem"}
    out_bits = max(1, L.bit_length()) if L else acc_w
    exe = rtl.verilator_build(d, [rtl.MVAU_SOURCE], "qc_mvau", in_lanes=SIMD, in_bits=bits_a, out_lanes=PE,
                              out_bits=out_bits, build_dir=d / "obj", params=params)
    return request.param, GEOMETRIES[request.param], exe, d, acc_w


@needs_verilator
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_layer_bit_exact_with_backpressure(built, seed):
    name, (K, N, PE, SIMD, bits_a, L, xor), exe, d, acc_w = built
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, K, N, bits_a, L, xor)
    layer = rtl.layer_rtl(spec, PE, SIMD, acc_w=acc_w, z_w=3)
    run = d / f"run{seed}"
    run.mkdir()
    write_roms(layer, run)
    rows = 4
    x = rng.integers(0, 1 << bits_a, (rows, K)).astype(np.uint8)
    want = expected(spec, x)
    for valid, ready in ((100, 100), (70, 40)):
        beats, cycles = rtl.verilator_run(exe, rtl.input_beats(x, SIMD), rows * N // PE, run, seed=seed,
                                          valid_pct=valid, ready_pct=ready)
        got = rtl.output_values(beats, layer)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} seed {seed} valid {valid}% ready {ready}%")
        if valid == ready == 100:  # the cycle model: exact here, the issue asks for 10 %
            est = estimate.mvau_cycles(rows, K, N, PE, SIMD)
            assert abs(cycles - est) <= 0.1 * cycles, (name, cycles, est)
        else:
            assert cycles >= estimate.mvau_cycles(rows, K, N, PE, SIMD) - estimate.PIPELINE_LATENCY


@needs_verilator
@pytest.mark.parametrize("params", [
    {}, {"XOR_MODE": 1}, {"L": 0}, {"BITS_A": 2, "L": 3}, {"K": 4, "SIMD": 4, "PE": 8}, {"K": 50, "SIMD": 7, "PE": 3, "N": 9}])
def test_mvau_lint_clean(params, tmp_path):
    shutil.copyfile(rtl.TEMPLATES / rtl.MVAU_SOURCE, tmp_path / rtl.MVAU_SOURCE)
    assert "Warning" not in rtl.verilator_lint(tmp_path, [rtl.MVAU_SOURCE], "qc_mvau", params)


@needs_verilator
def test_lint_reports_a_warning_as_an_error(tmp_path):
    (tmp_path / "bad.sv").write_text("module bad(input logic [3:0] a, output logic [1:0] y); assign y = a; endmodule\n")
    with pytest.raises(Exception, match="WIDTH"):
        rtl.verilator_lint(tmp_path, ["bad.sv"], "bad")


# --- the bundled MLP's binary layers, chained in one stream --------------------------------------------------------

@pytest.fixture(scope="module", params=["w1a1", "w1a2"])
def mlp_chain(request, tmp_path_factory):
    import onnx_ir as ir

    from qcompile import api, datasets
    from qcompile.artifact import layer_specs
    from qcompile.passes.fuse import FuseBitKernels

    result = api.compile(datasets.bundled_model("mlp"), config=request.param, calib=datasets.load_calib()[:64])
    fused = ir.from_proto(result.model)
    FuseBitKernels(set(result.ctx.layers))(fused, result.ctx)
    specs = [s for s in layer_specs(ir.to_proto(fused), result.model) if s.bits_w == 1]
    assert [s.epilogue for s in specs] == ["threshold", "float"]  # /4/Gemm -> codes -> /7/Gemm -> float epilogue
    foldings = {specs[0].name: (16, 32), specs[1].name: (8, 64)}  # lanes 16 -> 64: through a width converter
    d = tmp_path_factory.mktemp(f"mlp_{request.param}")
    project = rtl.emit_project_rtl(specs, foldings, d)
    exe = rtl.verilator_build(d, project.sources, project.top, in_lanes=project.first.in_lanes,
                              in_bits=project.first.in_bits, out_lanes=project.last.out_lanes,
                              out_bits=project.last.out_bits, build_dir=d / "obj")
    return request.param, specs, foldings, project, exe, d


@needs_verilator
def test_mlp_layers_bit_exact_and_lint_clean(mlp_chain):
    cfg, specs, foldings, project, exe, d = mlp_chain
    assert "Warning" not in rtl.verilator_lint(d, project.sources, project.top)
    rng = np.random.default_rng(7)
    frames = 6
    x = rng.integers(0, 1 << specs[0].bits_a, (frames, specs[0].K)).astype(np.uint8)
    codes = expected(specs[0], x)
    want = expected(specs[1].replace(epilogue="none"), codes)  # the float epilogue runs downstream of the RTL
    out_beats = frames * specs[1].N // project.last.out_lanes
    for valid, ready in ((100, 100), (80, 30)):
        beats, _ = rtl.verilator_run(exe, rtl.input_beats(x, project.first.in_lanes), out_beats, d, seed=3,
                                     valid_pct=valid, ready_pct=ready)
        np.testing.assert_array_equal(rtl.output_values(beats, project.last), want, err_msg=f"{cfg} {valid}/{ready}")


@needs_verilator
def test_mlp_chain_throughput_matches_the_slowest_layer(mlp_chain):
    cfg, specs, foldings, project, exe, d = mlp_chain
    rng = np.random.default_rng(1)
    cycles = {}
    for frames in (1, 9):
        x = rng.integers(0, 1 << specs[0].bits_a, (frames, specs[0].K)).astype(np.uint8)
        _, cycles[frames] = rtl.verilator_run(exe, rtl.input_beats(x, project.first.in_lanes),
                                              frames * specs[1].N // project.last.out_lanes, d)
    per_frame = (cycles[9] - cycles[1]) / 8
    slowest = max(estimate.mvau_cycles(1, s.K, s.N, *foldings[s.name]) - estimate.PIPELINE_LATENCY for s in specs)
    assert abs(per_frame - slowest) <= 0.1 * per_frame, (cfg, cycles, slowest)


def test_rejects_what_it_cannot_build():
    rng = np.random.default_rng(0)
    spec = random_spec(rng, 16, 6, 1, 1, False, name="fc9")
    with pytest.raises(Exception, match="fc9.*PE=4 must divide its 6"):
        rtl.layer_rtl(spec, 4, 8)
    w2 = LayerSpec("fc2bit", "gemm", 2, 2, rng.integers(0, 4, (4, 8)).astype(np.uint8), np.full(4, 3, np.int32))
    with pytest.raises(Exception, match="fc2bit.*binary"):
        rtl.layer_rtl(w2, 1, 1)


# --- yosys -------------------------------------------------------------------------------------------------------

@needs_yosys
@pytest.mark.parametrize("case", [(64, 16, 4, 16, 1, 1, True), (100, 12, 3, 8, 2, 3, False)])
def test_yosys_luts_within_30_percent_of_estimate(case, tmp_path):
    K, N, PE, SIMD, bits_a, L, xor = case
    spec = random_spec(np.random.default_rng(5), K, N, bits_a, L, xor)
    layer = rtl.emit_layer_rtl(spec, PE, SIMD, tmp_path)
    got = rtl.yosys_stat(tmp_path, [rtl.MVAU_SOURCE, f"{layer.module}.sv"], layer.module)
    est = estimate.mvau_resources(K, N, PE, SIMD, bits_a, 1, L, xor=xor)
    assert got["dsp"] == est["dsp"] == 0
    assert abs(est["lut"] - got["lut"]) <= 0.3 * got["lut"], (case, got, est)


@needs_verilator
def test_conv_layer_as_mvau_over_im2col_rows(tmp_path):
    """A padded 3x3 conv (W1A2, thresholds) streamed as its im2col rows: bit-exact against reference.bit_conv."""
    rng = np.random.default_rng(11)
    C, H, W, N = 3, 5, 6, 4
    w = rng.integers(0, 2, (N, C, 3, 3)).astype(np.uint8)
    z = rng.choice([1, 2], N).astype(np.int32)
    t = np.sort(rng.integers(-30, 30, (N, 3)), axis=1).astype(np.int32)
    spec = LayerSpec("conv1", "conv", 2, 1, w, z, in_shape=(C, H, W), pads=(1, 1, 1, 1), strides=(1, 2),
                     epilogue="threshold", thresholds=t)
    layer = rtl.emit_layer_rtl(spec, 2, 9, tmp_path)
    exe = rtl.verilator_build(tmp_path, [rtl.MVAU_SOURCE, f"{layer.module}.sv"], layer.module, in_lanes=9, in_bits=2,
                              out_lanes=2, out_bits=layer.out_bits, build_dir=tmp_path / "obj")
    x = rng.integers(0, 4, (C, H, W)).astype(np.uint8)
    rows = rtl.im2col_rows(spec, x)
    assert layer.rows == rows.shape[0] == spec.out_hw[0] * spec.out_hw[1]
    beats, cycles = rtl.verilator_run(exe, rtl.input_beats(rows, 9), layer.rows * N // 2, tmp_path)
    acc = ref.bit_conv(x[None], w, z, spec.strides, spec.pads)
    want = ref.epilogue_threshold(acc, t)[0].reshape(N, -1).T  # [pixels, N]
    np.testing.assert_array_equal(rtl.output_values(beats, layer), want)
    assert cycles == estimate.mvau_cycles(layer.rows, 27, N, 2, 9)
