"""HLS C++ of the fpga target (targets/fpga/hls.py): g++ C simulation against Xilinx's open-source ap_types, every
output value bit-exact against qcompile.reference applied layer by layer (hls.reference_chain).

One g++ per design (-O1). Designs: the bundled MLP (W1A1, W1A2: float input through the folded input quantizer,
threshold codes, the float epilogue), the bundled CNN (W1A1: three padded convs with folded 2x2 pools, the Flatten
into a Gemm), a synthetic conv chain (W2A2 bit-serial conv with dilation and a floor-mode pool, a general
MaxPoolCodes through the sliding window, an asymmetrically padded conv, an xor-mode Gemm) and a W3A4 -> W4A4 Gemm
chain with int32 output; PE and SIMD above 1 everywhere and width converters between unequal lanes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcompile.errors import ConfigError, QuantizationError
from qcompile.targets.cpu.spec import LayerSpec
from qcompile.targets.fpga import hls, project

needs_ap_types = pytest.mark.skipif(project.ap_types_dir() is None,
                                    reason="Xilinx ap_types headers missing (pip install --no-deps hls4ml)")


def run_csim(design, tmp_path, frames=4, x=None):
    want = project.write_hls_project(design, tmp_path, part="xc7z020clg400-1", clock_mhz=100, frames=frames, x=x)
    got = project.csim(tmp_path)
    return got, want


def random_thresholds(rng, n, levels, span):
    return np.sort(rng.integers(-span, span + 1, (n, levels)), axis=1).astype(np.int32)


# ---- the bundled models ---------------------------------------------------------------------------------------------

@needs_ap_types
@pytest.mark.parametrize("config, foldings", [
    ("w1a1", {"/4/Gemm": (16, 32), "/7/Gemm": (8, 64)}),   # 16 -> 64 lanes: a width converter
    ("w1a2", {"/4/Gemm": (4, 8), "/7/Gemm": (32, 16)}),
])
def test_bundled_mlp_csim_bit_exact(specs_of, tmp_path, config, foldings):
    specs = specs_of("mlp", config)
    assert [s.epilogue for s in specs] == ["threshold", "float"] and specs[0].in_thresholds is not None
    design = hls.build_design(specs, foldings)
    assert [s.kind for s in design.stages] == ["quant", "mvau", "dwc", "mvau"]
    got, want = run_csim(design, tmp_path, frames=6)
    np.testing.assert_array_equal(got, want)
    # the float32 logits of the chain: the same bits as reference.epilogue_float
    assert want.dtype == np.uint32 and np.isfinite(want.view(np.float32)).all()


@needs_ap_types
def test_bundled_cnn_csim_bit_exact(specs_of, tmp_path):
    specs = specs_of("cnn", "w1a1")
    assert [s.pool for s in specs[:3]] == [(2, 2)] * 3 and specs[-1].op == "gemm"
    foldings = {"/3/Conv": (16, 32), "/7/Conv": (32, 64), "/11/Conv": (32, 128), "/16/Gemm": (16, 64)}
    design = hls.build_design(specs, foldings)
    got, want = run_csim(design, tmp_path, frames=1)
    np.testing.assert_array_equal(got, want)


# ---- synthetic chains: the cases the bundled models do not reach ----------------------------------------------------

def balanced(spec, x, quantiles):
    """``spec`` with thresholds per channel at these quantiles of its accumulators on ``x`` (codes that vary, so a
    wrong window, lane or threshold shows in the output)."""
    acc = hls.reference_chain([spec.replace(epilogue="none", thresholds=None, pool=None)], x)
    per_channel = np.moveaxis(acc, 1, 0).reshape(acc.shape[1], -1)
    q = np.quantile(per_channel, quantiles, axis=1).T
    return spec.replace(epilogue="threshold", thresholds=np.ceil(q).astype(np.int32))


def conv_chain(rng, frames=5):
    """float (3, 9, 9) -> W2A2 conv 3x3 dilation (1, 2) + folded 2x2 pool (9 -> 4, floor) -> MaxPoolCodes 2x2 stride 1
    (sliding window + max) -> W1A2 conv 2x2 with pads (1, 0, 0, 1) -> 1-bit codes -> xor Gemm (54 -> 10), float out.
    Returns the specs and float input frames at and around the input thresholds."""
    in_thr = np.array([0.25, 0.5, np.nan], np.float32)
    a = LayerSpec("convA", "conv", 2, 2, rng.integers(0, 4, (8, 3, 3, 3)).astype(np.uint8),
                  rng.choice([1, 3, 4], 8).astype(np.int32), in_shape=(3, 9, 9), pads=(1, 2, 1, 2), dilations=(1, 2),
                  in_thresholds=in_thr)
    x = rng.uniform(0.0, 0.75, (frames, 3, 9, 9)).astype(np.float32)
    near = np.array([0.25, np.nextafter(np.float32(0.25), np.float32(0)), 0.5, np.nextafter(np.float32(0.5), 1)])
    pick = rng.random(x.shape) < 0.2
    x[pick] = rng.choice(near.astype(np.float32), int(pick.sum()))
    x[0, 0, 0, :2] = np.nan                                  # code 0, as on the CPU
    a = balanced(a, x, [0.9, 0.96, 0.985]).replace(pool=(2, 2))  # two max pools follow: high quantiles
    codes = hls.reference_chain([a], x)
    pool = LayerSpec.maxpool("pool", (8, 4, 4), (2, 2), (1, 1), bits=2)
    codes = hls.reference_chain([pool], codes)
    b = LayerSpec("convB", "conv", 2, 1, rng.integers(0, 2, (6, 8, 2, 2)).astype(np.uint8),
                  rng.choice([1, 2], 6).astype(np.int32), in_shape=(8, 3, 3), pads=(1, 0, 0, 1))
    b = balanced(b, codes, [0.5])
    c = LayerSpec("fc", "gemm", 1, 1, rng.integers(0, 2, (10, 54)).astype(np.uint8), np.ones(10, np.int32),
                  epilogue="float", mult=rng.standard_normal(10).astype(np.float32) / 7,
                  bias=rng.standard_normal(10).astype(np.float32), xor_mode=True)
    return [a, pool, b, c], x


@needs_ap_types
def test_synthetic_conv_pool_chain_csim_bit_exact(tmp_path):
    specs, x = conv_chain(np.random.default_rng(5))
    design = hls.build_design(specs, {"convA": (4, 3), "convB": (2, 8), "fc": (5, 9)})
    assert [s.kind for s in design.stages] == ["quant", "swg", "mvau", "pool", "swg", "wmax", "dwc", "swg", "mvau",
                                               "dwc", "mvau"]
    got, want = run_csim(design, tmp_path, x=x)
    np.testing.assert_array_equal(got, want)
    # the stream order is the reference's NCHW output, channels innermost; here [frames, 10] floats
    np.testing.assert_array_equal(want.view(np.float32), hls.reference_chain(specs, x))


@needs_ap_types
def test_multibit_gemm_chain_int32_out_csim_bit_exact(tmp_path):
    """W3A4 (thresholds to 4-bit codes, bit-serial over 4x3 planes) -> W4A4 with the accumulator out."""
    rng = np.random.default_rng(9)
    a = LayerSpec("g1", "gemm", 4, 3, rng.integers(0, 8, (12, 40)).astype(np.uint8),
                  rng.choice([6, 7, 8], 12).astype(np.int32), epilogue="threshold",
                  thresholds=random_thresholds(rng, 12, 15, 600))
    b = LayerSpec("g2", "gemm", 4, 4, rng.integers(0, 16, (6, 12)).astype(np.uint8),
                  rng.choice([15, 16], 6).astype(np.int32))
    design = hls.build_design([a, b], {"g1": (3, 8), "g2": (2, 4)})
    got, want = run_csim(design, tmp_path, frames=8)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(want.view(np.int32), hls.reference_chain([a, b], project.random_input(design, 8)))


# ---- what the generator refuses -----------------------------------------------------------------------------------

def test_folding_that_does_not_divide_is_refused(specs_of):
    specs = specs_of("mlp", "w1a1")
    with pytest.raises(ConfigError, match=r"layer '/4/Gemm': folding PE=16 x SIMD=24 .*SIMD must divide K"):
        hls.build_design(specs, {"/4/Gemm": (16, 24), "/7/Gemm": (8, 64)})   # K = 256 is not a multiple of 24
    with pytest.raises(ConfigError, match=r"layer '/7/Gemm': folding PE=3"):
        hls.build_design(specs, {"/4/Gemm": (16, 32), "/7/Gemm": (3, 64)})
    conv, _ = conv_chain(np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"'convA'.*input channels=3"):   # SIMD divides C, not only K = 27
        hls.build_design(conv, {"convA": (4, 9), "convB": (2, 8), "fc": (5, 9)})


def test_unsupported_layers_are_refused():
    rng = np.random.default_rng(1)
    grouped = LayerSpec("dw", "conv", 1, 1, rng.integers(0, 2, (4, 1, 3, 3)).astype(np.uint8), np.ones(4, np.int32),
                        in_shape=(4, 5, 5), group=4)
    with pytest.raises(QuantizationError, match="'dw'.*group-1"):
        hls.build_design([grouped], {"dw": (1, 1)})
    a = LayerSpec("a", "gemm", 1, 1, rng.integers(0, 2, (4, 8)).astype(np.uint8), np.ones(4, np.int32),
                  epilogue="float", mult=np.ones(4, np.float32), bias=np.zeros(4, np.float32))
    b = LayerSpec("b", "gemm", 1, 1, rng.integers(0, 2, (2, 4)).astype(np.uint8), np.ones(2, np.int32))
    with pytest.raises(QuantizationError, match="'a': its float output feeds 'b'"):
        hls.build_design([a, b], {"a": (1, 1), "b": (1, 1)})


# ---- the CLI's project folder ---------------------------------------------------------------------------------------

@needs_ap_types
def test_cli_writes_a_project_whose_csim_passes(tmp_path):
    from click.testing import CliRunner

    from qcompile import datasets
    from qcompile.cli import main

    out = tmp_path / "out"
    np.savez(tmp_path / "calib.npz", x=datasets.load_calib()[:64])
    res = CliRunner().invoke(main, ["compile", str(datasets.bundled_model("mlp")), "--config", "w1a2",
                                    "--calib", str(tmp_path / "calib.npz"), "--target", "fpga", "--part", "xc7z045",
                                    "--fps", "1e6", "-o", str(out)])
    assert res.exit_code == 0, res.output
    fpga = out / "fpga"
    for rel in ("hls/qc_top.cpp", "hls/qc_params.h", "hls/qc_hls.h", "hls/tb_qc_top.cpp", "hls/run_hls.tcl",
                "hls/csim.sh", "hls/vectors/input.txt", "hls/vectors/expected.txt", "report.md"):
        assert (fpga / rel).is_file(), rel
    assert "set_part xc7z045ffg900-2" in (fpga / "hls" / "run_hls.tcl").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fpga"]["fps"] >= 1e6 and manifest["fpga"]["part"] == "xc7z045"
    assert "## FPGA folding" in (out / "report.md").read_text()
    assert (fpga / "rtl" / "qc_top.sv").is_file() or (fpga / "rtl" / "NOT_GENERATED.txt").is_file()
    got = project.csim(fpga / "hls", build_dir=tmp_path / "build")
    want = np.loadtxt(fpga / "hls" / "vectors" / "expected.txt", skiprows=1, dtype=np.uint64, ndmin=2)
    np.testing.assert_array_equal(got, want.astype(np.uint32))
    from qcompile.errors import ArtifactError
    from qcompile.runtime import InferenceSession

    with pytest.raises(ArtifactError, match="an FPGA project .*csim.sh"):  # not a host artifact: said so
        InferenceSession(out)


def test_cli_relaxes_an_unreachable_frame_rate_and_refuses_an_unknown_part(tmp_path):
    from click.testing import CliRunner

    from qcompile import datasets
    from qcompile.cli import main

    np.savez(tmp_path / "calib.npz", x=datasets.load_calib()[:64])
    res = CliRunner().invoke(main, ["compile", str(datasets.bundled_model("cnn")), "--config", "w1a1",
                                    "--calib", str(tmp_path / "calib.npz"), "--target", "fpga", "--part", "xc7z020",
                                    "--keep-float", "/16/Gemm", "--fps", "1e9", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output   # a target beyond reach gives the fastest design that fits, and says so
    report = (tmp_path / "o" / "report.md").read_text()
    assert "does not fit the budget" in report or "beyond the fully parallel design" in report
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    # /16/Gemm kept in float: the chain is the three convs, the last one with the float epilogue (its pool on the host)
    assert sorted(manifest["fpga"]["foldings"]) == ["/11/Conv", "/3/Conv", "/7/Conv"]
    assert manifest["fpga"]["stream_out"]["kind"] == "float32"
    res = CliRunner().invoke(main, ["compile", str(datasets.bundled_model("mlp")), "--config", "w1a1", "--calib",
                                    str(tmp_path / "calib.npz"), "--target", "fpga", "--part", "xc9z999",
                                    "-o", str(tmp_path / "p")])
    assert res.exit_code == 1 and res.output.strip().splitlines()[-1].startswith("error: unknown FPGA part 'xc9z999'")
