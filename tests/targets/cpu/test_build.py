"""The kernel core's cache and its background pre-build (targets/cpu/build.py)."""

from __future__ import annotations

import numpy as np

from qcompile.runtime.kernels import Library
from qcompile.targets.cpu import LayerSpec, build_library
from qcompile.targets.cpu import build as build_mod
from qcompile import reference as ref


def _spec() -> LayerSpec:
    rng = np.random.default_rng(3)
    return LayerSpec("g", "gemm", 2, 1, rng.integers(0, 2, (5, 70), dtype=np.uint8), np.ones(5, np.int32))


def test_prebuild_fills_the_cache_and_the_build_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    fut = build_mod.prebuild_core()
    assert fut is not None
    # a build started while the pre-build runs waits for it rather than compiling the core again
    so = build_library([_spec()], tmp_path / "lib")
    cached = fut.result(timeout=600)
    objs = list((tmp_path / "cache" / "cpu-core").glob("core-*.o"))
    assert objs == [cached]
    assert not list((tmp_path / "cache" / "cpu-core").glob("prebuild-*")), "scratch folder left behind"
    assert build_mod.prebuild_core() is None  # cached: nothing to do
    x = np.random.default_rng(0).integers(0, 4, (3, 70), dtype=np.uint8)
    spec = _spec()
    np.testing.assert_array_equal(Library(so).run("g", x), ref.bit_gemm(x, spec.w, spec.wzero2))


def test_prebuild_without_a_compiler_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler-qcompile")
    assert build_mod.prebuild_core() is None
