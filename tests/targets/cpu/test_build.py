"""The kernel core's cache and its background pre-build (targets/cpu/build.py)."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_layer_avx512_kernels_compile_natively_and_are_recorded(tmp_path):
    """The per-layer AVX-512 BitGemm with the real intrinsics compiles on any x86 host (it runs only where the CPU
    has AVX-512; its logic is checked under SIMDe in test_kernels); the other paths stay exact."""
    import json

    spec = _spec()
    so = build_library([spec], tmp_path / "lib", layer_avx512=True)
    assert json.loads((tmp_path / "lib" / "qcompile_kernels.json").read_text())["layer_avx512"] is True
    x = np.random.default_rng(1).integers(0, 4, (5, 70), dtype=np.uint8)
    np.testing.assert_array_equal(Library(so).run("g", x), ref.bit_gemm(x, spec.w, spec.wzero2))


@pytest.mark.parametrize("layer_avx512", [True, False])
def test_emulated_avx512_gemm_both_kernels_bit_exact(tmp_path, monkeypatch, layer_avx512):
    """AVX-512 BitGemm through the per-layer kernel (AVX-512 targets) and through the core's kernel (a library built
    for another target, run on an AVX-512 CPU): K around the 8-word vector, batch 1 and more."""
    if build_mod.simde_include_dir() is None:
        pytest.skip("SIMDe headers missing (apt-get install libsimde-dev)")
    rng = np.random.default_rng(7)
    specs = [LayerSpec(f"g{k}_{ba}{bw}", "gemm", ba, bw, rng.integers(0, 1 << bw, (11, k), dtype=np.uint8),
                       np.full(11, (1 << bw) - 1, np.int32)) for k in (63, 512, 577) for ba, bw in ((1, 1), (2, 2))]
    lib = Library(build_library(specs, tmp_path / "lib", emulate_avx512=True, layer_avx512=layer_avx512))
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx512")
    for spec in specs:
        for batch in (1, 5):
            x = rng.integers(0, 1 << spec.bits_a, (batch, spec.K), dtype=np.uint8)
            np.testing.assert_array_equal(lib.run(spec.name, x), ref.bit_gemm(x, spec.w, spec.wzero2))
