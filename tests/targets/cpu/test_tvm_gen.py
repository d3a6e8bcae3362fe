"""The TVM kernel generator (targets/cpu/tvm_gen.py): bit-exact vs qcompile.reference AND vs the C library's layer.

Needs the optional extra (pip install 'qcompile[tvm]'); skipped without it. TVM compiles cost ~0.3 s per kernel, so
every spec is built once (module fixtures) and kernels are shared between specs of one shape (the hypothesis test
builds new layers without compiling anything).
"""

from __future__ import annotations

import re
import sys
import zlib

import numpy as np
import pytest

pytest.importorskip("tvm")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompile import reference as ref
from qcompile.errors import RuntimeInputError, ToolchainError
from qcompile.runtime.kernels import Library
from qcompile.targets.cpu import LayerSpec, build_library, tvm_gen

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the C library is an ELF .so")

GEMM_KS = [1, 63, 64, 65, 1000]
BITS = [(1, 1), (2, 1), (2, 2), (4, 4)]  # (bits_a, bits_w): W1A1, W1A2, W2A2, W4A4
EPIS = ["none", "float", "threshold"]


def _epilogue(rng, n, kind, bound):
    if kind == "float":  # large products: a fused multiply-add would change the last bit of many outputs
        return dict(mult=(rng.standard_normal(n) * 0.37).astype(np.float32),
                    bias=(rng.standard_normal(n) * 100).astype(np.float32))
    if kind == "threshold":
        levels = int(rng.choice([1, 3, 15]))
        return dict(thresholds=np.sort(rng.integers(-bound, bound + 1, (n, levels)), axis=1).astype(np.int32))
    return {}


def _wzero2(rng, n, bits_w, asym):
    if asym:
        return (2 * rng.integers(0, 1 << bits_w, n)).astype(np.int32)
    return np.full(n, (1 << bits_w) - 1, np.int32)


def _gemm_specs() -> list[LayerSpec]:
    rng = np.random.default_rng(7)
    specs = []
    for i, k in enumerate(GEMM_KS):
        for j, (ba, bw) in enumerate(BITS):
            n = [1, 5, 67, 16, 9][(i + j) % 5]
            epi = EPIS[(i + j) % 3]
            bound = k * ((1 << ba) - 1) * (1 << bw) // 4
            specs.append(LayerSpec(f"gemm_a{ba}w{bw}_k{k}_n{n}_{epi}", "gemm", ba, bw,
                                   rng.integers(0, 1 << bw, (n, k), dtype=np.uint8),
                                   _wzero2(rng, n, bw, asym=(i + j) % 2 == 1), epilogue=epi,
                                   **_epilogue(rng, n, epi, bound)))
    for k in (65, 1000):
        specs.append(LayerSpec(f"gemm_xor_k{k}", "gemm", 1, 1, rng.integers(0, 2, (7, k), dtype=np.uint8),
                               np.ones(7, np.int32), xor_mode=True))
    return specs


CONVS = [
    # name, (C, H, W), N, (kh, kw), strides, pads, dilations, group, (ba, bw), epilogue, xor
    ("conv1x1", (5, 4, 3), 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (2, 2), "none", False),
    ("conv3x3_pad_c64", (64, 6, 7), 65, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", False),
    ("conv3x3_s2_oddpad_c70", (70, 9, 7), 10, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 1, (2, 1), "float", False),
    ("conv_grouped", (12, 5, 5), 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, (4, 4), "threshold", False),
    ("conv_depthwise", (8, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, (2, 2), "float", False),
    ("conv_dilated_strided", (16, 9, 8), 5, (3, 2), (1, 2), (2, 1, 2, 1), (2, 2), 1, (4, 1), "threshold", False),
    ("conv3x3_valid_tiny", (3, 3, 4), 4, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 2), "none", False),  # P = 2
    ("conv_xor_pad", (20, 5, 6), 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", True),
    ("conv_xor_grouped_pad", (6, 4, 5), 4, (3, 3), (2, 1), (1, 1, 0, 1), (1, 1), 2, (1, 1), "float", True),
]


def _conv_specs() -> list[LayerSpec]:
    rng = np.random.default_rng(11)
    specs = []
    for name, (c, h, w), n, (kh, kw), strides, pads, dil, g, (ba, bw), epi, xor in CONVS:
        bound = kh * kw * c // g * ((1 << ba) - 1) * (1 << bw) // 4
        specs.append(LayerSpec(name, "conv", ba, bw, rng.integers(0, 1 << bw, (n, c // g, kh, kw), dtype=np.uint8),
                               np.ones(n, np.int32) if xor else _wzero2(rng, n, bw, asym=len(specs) % 2 == 0),
                               in_shape=(c, h, w), strides=strides, pads=pads, dilations=dil, group=g, epilogue=epi,
                               xor_mode=xor, **_epilogue(rng, n, epi, bound)))
    return specs


GEMMS = _gemm_specs()
CONV_SPECS = _conv_specs()


def expected(spec: LayerSpec, x: np.ndarray) -> np.ndarray:
    if spec.op == "gemm":
        acc = ref.bit_gemm_xor(x, spec.w) if spec.xor_mode else ref.bit_gemm(x, spec.w, spec.wzero2)
    else:
        geo = dict(strides=spec.strides, pads=spec.pads, dilations=spec.dilations, group=spec.group)
        acc = (ref.bit_conv_xor(x, spec.w, **geo) if spec.xor_mode
               else ref.bit_conv(x, spec.w, spec.wzero2, **geo))
    if spec.epilogue == "float":
        return ref.epilogue_float(acc, spec.mult, spec.bias)
    if spec.epilogue == "threshold":
        return ref.epilogue_threshold(acc, spec.thresholds)
    return acc


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Equal dtype, shape and bytes (float32 compared bit for bit)."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    if not np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)):
        bad = np.argwhere(got != want)
        raise AssertionError(f"{what}: {len(bad)} of {got.size} outputs differ, first at {bad[:3].tolist()}")


@pytest.fixture(scope="module")
def c_lib(tmp_path_factory) -> Library:
    return Library(build_library(GEMMS + CONV_SPECS, tmp_path_factory.mktemp("tvm_vs_c")))


@pytest.fixture(scope="module")
def layers() -> dict[str, tvm_gen.TvmLayer]:
    return {s.name: tvm_gen.build_tvm_layer(s) for s in GEMMS + CONV_SPECS}


def _check(spec, layer, c_lib, batches):
    rng = np.random.default_rng(zlib.crc32(spec.name.encode()))
    for batch in batches:
        x = rng.integers(0, 1 << spec.bits_a, (batch, *spec.in_shape), dtype=np.uint8)
        got = layer.run(x, batch)
        assert_same(got, expected(spec, x), f"{spec.name} batch {batch} vs reference")
        assert_same(got, c_lib.run(spec.name, x, batch), f"{spec.name} batch {batch} vs C library")


@pytest.mark.parametrize("spec", GEMMS, ids=lambda s: s.name)
def test_gemm_bit_exact(spec, layers, c_lib):
    _check(spec, layers[spec.name], c_lib, (1, 6))  # batch 1: the 1-row kernel; 6: the tiled one, padded rows


@pytest.mark.parametrize("spec", CONV_SPECS, ids=lambda s: s.name)
def test_conv_bit_exact(spec, layers, c_lib):
    _check(spec, layers[spec.name], c_lib, (1, 3))


def test_system_target_names_the_cpu():
    t = tvm_gen.system_target()
    assert t["kind"] == "llvm" and t["mcpu"] != "native" and t["num-cores"] >= 1
    import tvm

    tvm.target.Target(t)  # accepted by TVM as is
    flags = tvm_gen._cpu_flags()
    if "avx2" in flags:  # an x86 host with AVX2: LLVM knows it, so no silent fallback to generic
        assert t["mcpu"] != "generic"
        assert "-avx2" not in t.get("mattr", [])
    if flags and "avx512f" not in flags:
        assert "-avx512f" in t.get("mattr", [])


def _float_specs():
    floats = [s for s in GEMMS + CONV_SPECS if s.epilogue == "float"]
    assert len(floats) >= 4
    return floats[:1] + floats[-2:]  # a GEMM, a strided conv with odd pads, an xor conv


def test_float_epilogue_has_no_fma(layers, c_lib):
    """TVM fuses a*b + c into llvm.fmuladd by default; the generated code must multiply, then add. The vector
    popcount style keeps AVX2/FMA enabled (the scalar one, auto on AMD Zen, masks them), so both are checked."""
    for spec in _float_specs():
        for layer in (layers[spec.name], tvm_gen.build_tvm_layer(spec, popcount="vector")):
            asm = "\n".join(layer.source("asm", batch) for batch in (1, 5))
            what = f"{spec.name} ({layer.style.name} popcount)"
            for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"):
                assert op not in asm, f"{what}: {op} in the float epilogue"
            assert re.search(r"\bv?mul[sp]s\b", asm), f"{what}: no float multiply in the kernel?"
            _check(spec, layer, c_lib, (1, 5))


@pytest.mark.parametrize("name", ["gemm_a2w2_k1000", "conv_grouped"])  # + the float specs above
def test_other_popcount_style_bit_exact(name, c_lib):
    """The style auto does not pick here (vector on AMD Zen, scalar elsewhere) is exact too."""
    spec = next(s for s in GEMMS + CONV_SPECS if s.name.startswith(name))
    auto = tvm_gen._style(tvm_gen.system_target()).name
    layer = tvm_gen.build_tvm_layer(spec, popcount="vector" if auto == "scalar" else "scalar")
    assert layer.style.name != auto
    _check(spec, layer, c_lib, (1, 6))


def test_kernels_are_shared_between_specs_of_one_shape(layers):
    spec = next(s for s in GEMMS if s.K == 65 and s.bits_a == 2 and s.bits_w == 2)
    before = len(tvm_gen._KERNELS)
    other = spec.replace(name="other", w=(spec.w ^ 1), wzero2=spec.wzero2 + 2)
    layer = tvm_gen.build_tvm_layer(other)
    x = np.random.default_rng(0).integers(0, 4, (2, 65), dtype=np.uint8)
    assert_same(layer.run(x), expected(other, x), "same-shape layer")
    assert len(tvm_gen._KERNELS) == before


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), batch=st.sampled_from([1, 2, 5, 9]), asym=st.booleans())
def test_random_weights_and_inputs(layers, seed, batch, asym):
    """Fresh weights / wzero2 / thresholds / inputs through already compiled kernels (no TVM compile here)."""
    rng = np.random.default_rng(seed)
    base = next(s for s in CONV_SPECS if s.name == "conv_grouped")  # W4A4, grouped, padded, threshold
    n, bw = base.N, base.bits_w
    spec = base.replace(name="rand", w=rng.integers(0, 1 << bw, base.w.shape, dtype=np.uint8),
                        wzero2=_wzero2(rng, n, bw, asym),
                        thresholds=np.sort(rng.integers(-300, 300, base.thresholds.shape), axis=1).astype(np.int32))
    x = rng.integers(0, 1 << base.bits_a, (batch, *base.in_shape), dtype=np.uint8)
    assert_same(tvm_gen.build_tvm_layer(spec).run(x, batch), expected(spec, x), f"seed {seed}")


def test_run_checks_inputs(layers):
    layer = layers[next(s.name for s in GEMMS if s.K == 64 and s.bits_a == 2 and s.bits_w == 2)]
    with pytest.raises(RuntimeInputError):
        layer.run(np.zeros((2, 63), np.uint8))
    with pytest.raises(RuntimeInputError):
        layer.run(np.full((1, 64), 4, np.uint8))  # codes of 3 bits for a 2-bit layer
    with pytest.raises(RuntimeInputError):
        layer.run(np.zeros((1, 64), np.float32))
    out = layer.run(np.zeros((0, 64), np.uint8), 0)
    assert out.shape == (0, *layer.out_shape) and out.dtype == layer.out_dtype
    flat = np.random.default_rng(1).integers(0, 4, 3 * 64, dtype=np.uint8)  # flat input + batch, as Library.run
    assert_same(layer.run(flat, 3), layer.run(flat.reshape(3, 64)), "flat input")


def test_only_bit_layers():
    pool = LayerSpec.maxpool("pool", (4, 6, 6), (2, 2), (2, 2), (1, 1), bits=2)
    with pytest.raises(ValueError, match="BitGemm/BitConv"):
        tvm_gen.build_tvm_layer(pool)


def test_missing_tvm_is_a_toolchain_error(monkeypatch):
    spec = GEMMS[0]
    tvm_gen._import_tvm.cache_clear()
    tvm_gen.tvm_available.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` raises ImportError
        assert tvm_gen.tvm_available() is False
        with pytest.raises(ToolchainError, match=r"apache-tvm not installed; pip install 'qcompile\[tvm\]'"):
            tvm_gen.build_tvm_layer(spec)
    finally:
        monkeypatch.undo()
        tvm_gen._import_tvm.cache_clear()
        tvm_gen.tvm_available.cache_clear()
    assert tvm_gen.tvm_available() is True
