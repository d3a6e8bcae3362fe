"""The folding chooser (targets/fpga/folding.py) on budgets that fit and ones that do not, and its error messages."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.errors import ConfigError
from qcompile.targets.cpu.spec import LayerSpec
from qcompile.targets.fpga import estimate, folding
from qcompile.targets.fpga.parts import PARTS, get_part


def check_plan(plan, specs):
    """Every folding divides its layer, the frame rate is the slowest layer's, the totals fit the budget."""
    for spec in specs:
        if spec.op == "maxpool":
            continue
        pe, simd = plan.foldings[spec.name]
        assert spec.N % pe == 0 and (spec.in_shape[0] if spec.op == "conv" else spec.K) % simd == 0
    assert plan.cycles_per_frame == max(lay.cycles for lay in plan.layers)
    assert plan.fps == pytest.approx(plan.clock_mhz * 1e6 / plan.cycles_per_frame)
    assert all(plan.totals[r] <= plan.budget[r] for r in folding.RESOURCES)
    for lay in plan.layers:
        if lay.op != "maxpool":  # the MVAU's numbers are estimate.py's
            assert lay.mvau_cycles == estimate.mvau_cycles(lay.rows, lay.K, lay.N, lay.pe, lay.simd)
            assert lay.cycles >= lay.mvau_cycles - estimate.PIPELINE_LATENCY


def test_parts_table():
    assert {"xc7z020", "xc7z045", "xcu250"} <= set(PARTS)
    assert get_part("xc7z020clg400-1").lut == 53_200 and get_part("XC7Z045").bram18 == 1_090
    with pytest.raises(ConfigError, match="unknown FPGA part 'xc9'; known: xc7z020"):
        get_part("xc9")


@pytest.mark.parametrize("config", ["w1a1", "w1a2"])
def test_mlp_at_the_finn_tfc_yardstick_budget(specs_of, config):
    """FINN's TFC-style MLP: 12.3 M frames/s on a ZC706 (xc7z045, 200 MHz): 16 cycles a frame suffice."""
    specs = specs_of("mlp", config)
    plan = folding.choose_folding(specs, "xc7z045", 12.3e6)
    check_plan(plan, specs)
    assert plan.meets_target and plan.cycles_per_frame == 16 and plan.fps == 12.5e6
    assert not plan.notes
    md = plan.markdown()
    assert "**16 cycles per frame**" in md and "12,500,000 frames/s" in md and "`/7/Gemm`" in md


def test_a_slow_target_gets_the_cheapest_design(specs_of):
    specs = specs_of("mlp", "w1a1")
    fast = folding.choose_folding(specs, "xc7z020", 1e6)
    slow = folding.choose_folding(specs, "xc7z020", 1e3)
    cheapest = folding.choose_folding(specs, "xc7z020", None)
    for plan in (fast, slow, cheapest):
        check_plan(plan, specs)
    assert fast.meets_target and slow.meets_target and fast.fps > slow.fps
    assert fast.totals["lut"] > slow.totals["lut"] >= cheapest.totals["lut"]
    # the slow design is the cheapest that keeps up: every layer's cycles within the target's
    assert slow.cycles_per_frame <= slow.clock_mhz * 1e6 / 1e3


def test_cnn_on_each_part(specs_of):
    specs = specs_of("cnn", "w1a2")
    small = folding.choose_folding(specs, "xc7z020", 1000)
    big = folding.choose_folding(specs, "xcu250", 20_000)
    for plan in (small, big):
        check_plan(plan, specs)
        assert plan.meets_target
    assert big.fps >= 20_000 and [lay.rows for lay in big.layers] == [784, 196, 49, 1]
    # SIMD divides a conv's input channels, so the first conv needs at least 28*28 pixels x 9 taps cycles per frame
    beyond = folding.choose_folding(specs, "xcu250", 100_000)
    assert beyond.cycles_per_frame == 784 * 9 and "beyond the fully parallel design" in beyond.notes[0]


def test_unreachable_target_is_relaxed_to_the_fastest_design_that_fits(specs_of):
    specs = specs_of("cnn", "w1a1")
    plan = folding.choose_folding(specs, "xc7z020", 1e9)
    check_plan(plan, specs)
    assert not plan.meets_target and "does not fit the budget" in plan.notes[0]
    # one step faster no longer fits: the next smaller cycle limit over every layer's options exceeds the budget
    faster = [c for spec in specs for c in (lay.cycles for lay in folding.candidates(spec))
              if c < plan.cycles_per_frame]
    if faster:
        tighter = folding.choose_folding(specs, "xc7z020", plan.clock_mhz * 1e6 / max(faster))
        assert not tighter.meets_target or tighter.cycles_per_frame >= plan.cycles_per_frame


def big_layer(name="huge", k=4096, n=4096):
    rng = np.random.default_rng(0)
    return LayerSpec(name, "gemm", 4, 4, rng.integers(0, 16, (n, k)).astype(np.uint8), np.full(n, 15, np.int32),
                     epilogue="threshold", thresholds=np.sort(rng.integers(-99, 99, (n, 15)), axis=1).astype(np.int32))


def test_a_layer_that_never_fits_is_named_with_what_it_needs():
    with pytest.raises(folding.FoldingError) as err:
        folding.choose_folding([big_layer()], "xc7z020", 100)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("layer 'huge' does not fit xc7z020 (70% of the part: 37,240 LUT")
    assert "its cheapest folding (PE=" in msg and "BRAM18" in msg.split("needs")[-1]


def test_layers_that_fit_alone_but_not_together():
    a, b = big_layer("a", 1024, 1024), big_layer("b", 1024, 1024)
    # a budget between one layer's smallest need and two layers'
    part = get_part("xcu250")
    need = min(folding.candidates(a), key=lambda lay: folding._cost(lay.res, part.budget(1.0))).res
    util = 1.5 * max(need[r] / getattr(part, r) for r in folding.RESOURCES)
    folding.choose_folding([a], part, None, utilization=util)
    with pytest.raises(folding.FoldingError, match=r"^the layers do not fit xcu250 .* together: at their smallest "
                                                   r"foldings they need .*largest: layer '[ab]'"):
        folding.choose_folding([a, b], part, None, utilization=util)


def test_given_foldings_are_checked(specs_of):
    specs = specs_of("mlp", "w1a1")
    plan = folding.evaluate_folding(specs, {"/4/Gemm": (16, 32), "/7/Gemm": (16, 32)}, "xc7z045")
    assert plan.cycles_per_frame == 128 and plan.foldings == {"/4/Gemm": (16, 32), "/7/Gemm": (16, 32)}
    with pytest.raises(ConfigError, match="'/7/Gemm': folding PE=5"):
        folding.evaluate_folding(specs, {"/4/Gemm": (16, 32), "/7/Gemm": (5, 32)}, "xc7z045")
    with pytest.raises(ConfigError, match="target frame rate must be positive"):
        folding.choose_folding(specs, "xc7z045", 0)
