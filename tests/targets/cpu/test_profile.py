"""The planner's machine profile: fitted, cached per machine, used by the cost model, shown by `qcompile machine`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qcompile import planner
from qcompile.targets.cpu import caps as caps_mod
from qcompile.targets.cpu import profile as prof_mod
from qcompile.targets.cpu.spec import LayerSpec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QCOMPILE_PLANNER", raising=False)
    prof_mod._memo.clear()
    yield tmp_path
    prof_mod._memo.clear()


def test_fit_recovers_per_call_cost_and_rate():
    pts = [(w, 0.004 + w / 2e9 * 1e3) for w in (1e6, 5e6, 2e7)]
    call, rate = prof_mod._fit(pts)
    assert call == pytest.approx(0.004) and rate == pytest.approx(2e9)
    # noise that makes the larger probe faster puts everything into the rate, never a negative one
    call, rate = prof_mod._fit([(1e6, 0.5), (2e6, 0.4)])
    assert call == 0 and rate > 0
    call, rate = prof_mod._fit([(1e6, 0.001), (2e6, 0.004)])       # negative intercept -> through the origin
    assert call == 0 and rate > 0


def test_profile_is_measured_once_and_cached(cache, monkeypatch):
    caps = caps_mod.detect()
    prof = prof_mod.machine_profile(caps, log=lambda m: None)
    path = prof_mod.profile_path(caps)
    assert path.is_file() and path.parent == cache / "machine"
    kinds = {k.split(":")[0] for k in prof.rate}
    assert kinds == {"bit", "int8", "float"} and all(r > 0 for r in prof.rate.values())
    assert all(v >= 0 for v in prof.call_ms.values())
    assert {p["batch"] for p in prof.probes} == set(prof_mod.PROBE_BATCHES)

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(prof_mod, "measure_profile", boom)
    prof_mod._memo.clear()
    again = prof_mod.machine_profile(caps)                          # from the file, not measured
    assert again.rate == prof.rate


def test_a_stale_or_damaged_cache_is_measured_again(cache, monkeypatch):
    caps = caps_mod.detect()
    path = prof_mod.profile_path(caps)
    path.parent.mkdir(parents=True)
    fake = prof_mod.MachineProfile(prof_mod.profile_key(caps), {"float:gemm": 0.0}, {"float:gemm": 1.0})
    calls = []
    monkeypatch.setattr(prof_mod, "measure_profile", lambda c, log=None: calls.append(1) or fake)
    for content in ("{not json", json.dumps({**fake.to_json(), "key": {**fake.key, "kernels": "other"}})):
        path.write_text(content)
        prof_mod._memo.clear()
        assert prof_mod.machine_profile(caps, log=lambda m: None) is fake
    assert len(calls) == 2
    assert json.loads(path.read_text())["key"] == fake.key           # rewritten (atomically) with the new profile


def test_design_constants_on_request(cache, monkeypatch):
    monkeypatch.setenv("QCOMPILE_PLANNER", "design")
    assert prof_mod.machine_profile(caps_mod.detect()) is None


def test_estimates_come_from_the_profile():
    caps = caps_mod.detect()
    rng = np.random.default_rng(0)
    spec = LayerSpec("g", "gemm", 2, 1, rng.integers(0, 2, (64, 300), dtype=np.uint8), np.ones(64, np.int32))
    sums = "lut" if planner.lut_kernel(spec, caps) else "popcount"
    prof = prof_mod.MachineProfile({}, {f"bit:gemm:{sums}": 0.002, "int8:gemm": 0.01},
                                   {f"bit:gemm:{sums}": 1e12, "int8:gemm": 1e11})
    est = planner.estimate_ms(spec, caps, 8, prof)
    macs = 8 * 64 * 300
    bit_work = macs * (1 if sums == "lut" else 2)
    assert est["bitserial"] == pytest.approx(0.002 + bit_work / 1e12 * 1e3)
    assert est["int8"] == pytest.approx(0.01 + macs / 1e11 * 1e3)
    assert est["float"] == pytest.approx(planner.estimate_ms(spec, caps, 8)["float"])  # not in the profile
    choice = planner.choose([spec], caps, 8, profile=prof)["g"]
    assert choice.kernel == "bitserial" and "this CPU's profile" in choice.why


def test_machine_command_shows_the_profile(cache):
    from qcompile.cli import main

    res = CliRunner().invoke(main, ["machine", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # the one-time "calibrating" line goes to stderr
    assert data["rate"] and data["key"]["cpu"] == caps_mod.model_name()
    res = CliRunner().invoke(main, ["machine"])
    assert res.exit_code == 0 and "bit:gemm" in res.output and "G MAC/s" in res.output


def test_autotuned_artifact_reports_predicted_against_measured(cache, tiny_model_path, tmp_path):
    from graphs import tiny_inputs

    from qcompile import api

    result = api.compile(tiny_model_path, config="w1a2", calib=tiny_inputs(64, 3), target="cpu", autotune=True,
                         plan_batch=4)
    assert result.manifest["target"]["cost_model"] == "this CPU's measured profile"
    timed = [p for p in result.manifest["plan"] if p.get("measured_ms")]
    assert timed and all(set(p["estimate_ms"]) == set(p["measured_ms"]) == set(planner.KERNELS) for p in timed)
    result.save(tmp_path / "art")
    md = (tmp_path / "art" / "report.md").read_text()
    assert "## Kernel plan" in md
    node = timed[0]["node"]
    plan_md = md[md.index("## Kernel plan"):]
    row = next(line for line in plan_md.splitlines() if line.startswith(f"| {node} |"))
    assert f"{timed[0]['estimate_ms']['int8']:.3f} / {timed[0]['measured_ms']['int8']:.3f}" in row


def test_time_in_library_times_a_layer(tmp_path):
    from qcompile.runtime.kernels import Library
    from qcompile.targets.cpu import build_library

    rng = np.random.default_rng(1)
    spec = LayerSpec("g", "gemm", 1, 1, rng.integers(0, 2, (16, 70), dtype=np.uint8), np.ones(16, np.int32))
    lib = Library(build_library([spec], tmp_path))
    t = lib.time_in_library("g", rng.integers(0, 2, (3, 70), dtype=np.uint8), reps=5)
    assert 0 < t < 0.1
