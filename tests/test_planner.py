"""The planner: per-layer kernel choice from estimates or timings, with reasons, and the partition-switch rule."""

import numpy as np
import pytest

from qcompile import planner
from qcompile.targets.cpu import LayerSpec
from qcompile.targets.cpu.caps import CpuCaps

CAPS = CpuCaps(name="cpu", path="avx2", popcount_bits=256, avx512_vpopcntdq=False, avx2=True, int8_dot=None,
               cores=2, l1d_bytes=32768, ghz=2.0, float_peak_gflops=128.0)


def _gemm(name, k=256, n=256, bits_a=1, bits_w=1):
    rng = np.random.default_rng(len(name))
    return LayerSpec(name, "gemm", bits_a, bits_w, rng.integers(0, 1 << bits_w, (n, k), dtype=np.uint8),
                     np.full(n, (1 << bits_w) - 1, np.int32))


def test_estimates_grow_with_bits_and_batch():
    w1a1, w2a2 = _gemm("a"), _gemm("b", bits_a=2, bits_w=2)
    e1, e2 = planner.estimate_ms(w1a1, CAPS, 64), planner.estimate_ms(w2a2, CAPS, 64)
    assert e2["bitserial"] > e1["bitserial"] and e2["float"] == pytest.approx(e1["float"])
    assert planner.estimate_ms(w1a1, CAPS, 256)["bitserial"] > e1["bitserial"]


def _conv(name, c=64, n=64, bits_a=2, bits_w=1, xor=False):
    rng = np.random.default_rng(len(name))
    return LayerSpec(name, "conv", bits_a, bits_w, rng.integers(0, 1 << bits_w, (n, c, 3, 3), dtype=np.uint8),
                     np.full(n, (1 << bits_w) - 1, np.int32), in_shape=(c, 14, 14), pads=(1, 1, 1, 1), xor_mode=xor)


def test_lut_convs_are_estimated_by_lookups_not_popcounts():
    """On the AVX2 path an eligible conv's cost does not grow with activation bits (one lookup per 4 channels
    covers any code width); a popcount conv (XOR mode, or another path) does."""
    a1, a2 = _conv("a1", bits_a=1), _conv("a2", bits_a=2)
    assert planner.lut_kernel(a2, CAPS) and not planner.lut_kernel(_conv("x", bits_a=1, xor=True), CAPS)
    e1, e2 = planner.estimate_ms(a1, CAPS, 64)["bitserial"], planner.estimate_ms(a2, CAPS, 64)["bitserial"]
    assert e2 == pytest.approx(e1)
    why = planner.choose([a2], CAPS, 64)["a2"].why
    assert "lut " in why and "bitserial" not in why  # the report names the kernel that will run
    generic = CAPS.__class__(**{**CAPS.__dict__, "path": "generic"})
    assert not planner.lut_kernel(a2, generic)
    assert planner.estimate_ms(a2, generic, 64)["bitserial"] > planner.estimate_ms(a1, generic, 64)["bitserial"]


def test_an_amx_cpu_keeps_convs_off_convinteger():
    """On an AVX-512 + AMX CPU the estimate must not send convs to onnxruntime's ConvInteger (no AMX/VNNI kernel
    there: the bundled CNN took 186 ms instead of 39 when it did), while GEMMs may still go to AMX's
    MatMulInteger; AVX-512 convs are estimated as the AVX2 LUT kernels that run them."""
    amx = CAPS.__class__(**{**CAPS.__dict__, "path": "avx512", "popcount_bits": 512, "avx512_vpopcntdq": True,
                            "int8_dot": "amx"})
    conv = _conv("c", c=64, n=64, bits_a=2, bits_w=1)
    assert planner.lut_kernel(conv, amx)
    est = planner.estimate_ms(conv, amx, 64)
    assert est["int8"] > est["float"] > est["bitserial"]
    assert planner.choose([conv], amx, 64)["c"].kernel == "bitserial"
    assert not planner.lut_kernel(_gemm("g2", bits_a=2), amx)  # BitGemm: the AVX-512 popcount kernel
    gemm = _gemm("g", k=1024, n=1024, bits_a=4, bits_w=4)
    assert planner.estimate_ms(gemm, amx, 64)["int8"] < planner.estimate_ms(gemm, amx, 64)["float"]


def test_choice_is_the_fastest_and_says_why():
    specs = [_gemm("big", k=4096, n=4096)]
    c = planner.choose(specs, CAPS, 64)["big"]
    assert c.kernel == min(c.estimate_ms, key=c.estimate_ms.get) == "bitserial"
    assert "estimated at batch 64" in c.why
    measured = {"big": {"bitserial": 3.0, "int8": 1.0, "float": 2.0}}
    c = planner.choose(specs, CAPS, 64, measured)["big"]
    assert c.kernel == "int8" and "would be slower here" in c.why and "measured" in c.why


def test_force_overrides_every_layer():
    specs = [_gemm("a"), _gemm("b")]
    measured = {"a": {"bitserial": 9.0, "int8": 1.0, "float": 2.0}, "b": {"bitserial": 9.0, "int8": 1.0, "float": 2.0}}
    choices = planner.choose(specs, CAPS, 64, measured, force="bitserial")
    assert {c.kernel for c in choices.values()} == {"bitserial"}
    assert all(c.why.startswith("forced by --kernel bitserial") for c in choices.values())


def test_a_run_that_saves_less_than_the_partition_switch_stays_in_onnxruntime():
    specs = [_gemm("a"), _gemm("b"), _gemm("c"), _gemm("d")]
    small = planner.PARTITION_SWITCH_MS / 4  # each bit layer saves this much: a and b together save half a switch
    measured = {
        "a": {"bitserial": 0.010, "int8": 0.010 + small, "float": 0.5},
        "b": {"bitserial": 0.010, "int8": 0.5, "float": 0.010 + small},
        "c": {"bitserial": 0.5, "int8": 0.1, "float": 0.2},                      # int8 on its own merits
        "d": {"bitserial": 0.010, "int8": 1.0, "float": 1.0},                    # saves far more than a switch
    }
    choices = planner.choose(specs, CAPS, 1, measured)
    assert [choices[n].kernel for n in "abcd"] == ["int8", "float", "int8", "bitserial"]
    assert "leaving onnxruntime and coming back" in choices["a"].why and "a, b" in choices["a"].why
    assert "leaving onnxruntime" not in choices["c"].why and "leaving onnxruntime" not in choices["d"].why


def test_measure_times_every_candidate(tmp_path):
    from qcompile.runtime.kernels import Library
    from qcompile.targets.cpu import build_library

    specs = [_gemm("m1", k=70, n=9), _gemm("m2", k=130, n=5, bits_a=2)]
    lib = Library(build_library(specs, tmp_path))
    times = planner.measure(specs, lib, batch=3)
    assert set(times) == {"m1", "m2"}
    for t in times.values():
        assert set(t) == set(planner.KERNELS) and all(0 < v < 1000 for v in t.values())
    choices = planner.choose(specs, CAPS, 3, times)
    assert all("measured at batch 3" in c.why for c in choices.values())
