"""Generated CPU kernels, every code path, bit-exact against qcompile.reference.

All layers compile into ONE shared library per module (gcc costs seconds; the kernel core is cached), then each
path is forced with QCOMPILE_CPU_PATH. The AVX-512 path runs natively where the CPU has AVX-512 VPOPCNTDQ, and
otherwise on a second build of the same code over SIMDe's portable emulation (Debian: libsimde-dev), so its
indexing, tiling and tails are checked on any x86 machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import reference as ref
from qcompile.errors import QcompileError, ToolchainError
from qcompile.runtime.kernels import KernelPathError, Library, RuntimeInputError
from qcompile.targets.cpu import LayerSpec, build_library, caps
from qcompile.targets.cpu.build import simde_include_dir
from qcompile.targets.cpu.codegen import lut_acc16, lut_conv, lut_layer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU target builds ELF libraries")

GEMM_KS = [1, 63, 64, 65, 1000, 4096]
SHORT_KS = [255, 256, 257]
BITS = [(1, 1), (2, 1), (2, 2), (4, 4), (4, 1), (1, 2), (3, 2)]  # (bits_a, bits_w): W1A1, W1A2, W2A2, W4A4, W1A4...


def _epilogue(rng, n, kind, lo, hi):
    if kind == "float":
        return dict(mult=rng.standard_normal(n).astype(np.float32) * 0.37,
                    bias=rng.standard_normal(n).astype(np.float32) * 100)
    if kind == "threshold":
        levels = int(rng.choice([1, 3, 15]))
        t = np.sort(rng.integers(lo, hi + 1, size=(n, levels)), axis=1).astype(np.int32)
        return dict(thresholds=t)
    return {}


def _wzero2(rng, n, bits_w, asym):
    if asym:
        return (2 * rng.integers(0, 1 << bits_w, size=n)).astype(np.int32)
    return np.full(n, (1 << bits_w) - 1, np.int32)


def _specs() -> list[LayerSpec]:
    rng = np.random.default_rng(2026)
    specs = []
    epis = ["none", "float", "threshold"]
    for i, k in enumerate(GEMM_KS):
        for j, (ba, bw) in enumerate(BITS):
            n = [1, 5, 67, 130, 3, 17, 9][(i + j) % 7] if k < 4096 else [3, 70][j % 2]
            epi = epis[(i + j) % 3]
            w = rng.integers(0, 1 << bw, size=(n, k), dtype=np.uint8)
            bound = k * ((1 << ba) - 1) * (1 << bw)
            specs.append(LayerSpec(f"gemm_a{ba}w{bw}_k{k}_n{n}_{epi}", "gemm", ba, bw, w,
                                   _wzero2(rng, n, bw, asym=(i + j) % 2 == 1), epilogue=epi,
                                   **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    for k in [1, 64, 65, 1000]:
        n = 7
        specs.append(LayerSpec(f"gemm_xor_k{k}", "gemm", 1, 1, rng.integers(0, 2, (n, k), dtype=np.uint8),
                               np.ones(n, np.int32), xor_mode=True))
    convs = [
        # name, (C, H, W), N, (kh, kw), strides, pads, dilations, group, (ba, bw), epilogue, xor
        ("conv1x1", (5, 4, 3), 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (2, 2), "none", False),
        ("conv3x3_pad_c64", (64, 6, 7), 65, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", False),
        ("conv3x3_s2_oddpad_c70", (70, 9, 7), 10, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 1, (2, 1), "float", False),
        ("conv_grouped", (12, 5, 5), 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, (4, 4), "threshold", False),
        ("conv_depthwise", (8, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, (2, 2), "none", False),
        ("conv_dilated", (16, 9, 8), 5, (3, 2), (1, 2), (2, 1, 2, 1), (2, 2), 1, (4, 1), "none", False),
        ("conv_big_c130", (130, 5, 5), 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, (1, 2), "float", False),
        ("conv_5x5_valid", (3, 8, 8), 4, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1), 1, (3, 2), "threshold", False),
        ("conv_xor_pad", (20, 5, 6), 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", True),
        ("conv_xor_valid", (66, 5, 4), 3, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1), "none", True),
        ("conv_xor_grouped_pad", (6, 4, 5), 4, (3, 3), (2, 1), (1, 1, 0, 1), (1, 1), 2, (1, 1), "none", True),
        # the direct conv over packed pixels (group 1, no horizontal dilation): channel padding to 32, segment
        # tails, odd H/W, strides, asymmetric pads, vertical dilation, N and Wo not multiples of the tile
        ("dconv_c32_w1a2_thr", (32, 13, 15), 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (2, 1), "threshold", False),
        ("dconv_c33_dh2", (33, 9, 11), 9, (3, 3), (1, 1), (2, 1, 2, 1), (2, 1), 1, (2, 1), "threshold", False),
        ("dconv_c128_s2", (128, 7, 9), 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (2, 2), "float", False),
        ("dconv_1x5_c96", (96, 3, 11), 4, (1, 5), (1, 3), (0, 2, 0, 2), (1, 1), 1, (3, 2), "none", False),
        ("dconv_xor_c64_s2", (64, 7, 6), 3, (3, 3), (2, 1), (0, 1, 1, 2), (1, 1), 1, (1, 1), "none", True),
        ("dconv_xor_c40", (40, 5, 5), 6, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1), "float", True),
        ("dconv_c1_5x5", (1, 6, 5), 3, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, (4, 4), "threshold", False),
        ("dconv_xor_pad_thr", (64, 6, 9), 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "threshold", True),
        ("dconv_c64_w2a2_thr_asym", (64, 5, 8), 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (2, 2), "threshold",
         False),
        # the LUT conv (AVX2 path, AND mode): one odd 4-channel group and Wo = 1; 3-bit weights (Horner over
        # planes) with stride 2 and vertical dilation; 4-bit activations near the 16-bit sum limit; N around
        # the 32-channel block
        ("lconv_c3_n70_wo1_thr", (3, 6, 1), 70, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (2, 1), "threshold",
         False),
        ("lconv_c20_s2_dh2_w3a1", (20, 11, 10), 33, (3, 3), (2, 2), (0, 1, 1, 0), (2, 1), 1, (1, 3), "float",
         False),
        ("lconv_c256_w1a4", (256, 4, 6), 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (4, 1), "none", False),
        # many channels: one 32-channel block per step (4-pixel tile) over three blocks, threshold epilogue
        ("lconv_c96_n70_thr", (96, 5, 9), 70, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (2, 1), "threshold", False),
    ]
    for name, chw, n, kernel, strides, pads, dil, group, (ba, bw), epi, xor in convs:
        w = rng.integers(0, 1 << bw, size=(n, chw[0] // group, *kernel), dtype=np.uint8)
        bound = chw[0] // group * kernel[0] * kernel[1] * ((1 << ba) - 1) * (1 << bw)
        z2 = np.ones(n, np.int32) if xor else _wzero2(rng, n, bw, asym=bw > 1 and n % 2 == 0)
        specs.append(LayerSpec(name, "conv", ba, bw, w, z2, in_shape=chw, strides=strides, pads=pads,
                               dilations=dil, group=group, epilogue=epi, xor_mode=xor,
                               **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    pools = [  # name, (C, H, W), kernel, strides, dilations, bits
        ("pool_2x2_s2", (16, 28, 28), (2, 2), (2, 2), (1, 1), 2),
        ("pool_2x2_s2_odd", (5, 7, 9), (2, 2), (2, 2), (1, 1), 8),
        ("pool_3x2_s12_dil21", (3, 8, 7), (3, 2), (1, 2), (2, 1), 4),
        ("pool_1x1", (2, 3, 3), (1, 1), (1, 1), (1, 1), 1),
        # the SSE2 loop: two 8-output vectors, a row tail read past the row, scalar at the end of the input
        ("pool_2x2_s2_w43", (3, 5, 43), (2, 2), (2, 2), (1, 1), 8),
        ("pool_2x2_s12", (2, 6, 34), (2, 2), (1, 2), (1, 1), 2),
    ]
    for name, chw, kernel, strides, dil, bits in pools:
        specs.append(LayerSpec.maxpool(name, chw, kernel, strides, dil, bits=bits))
    # short K around the AVX2 vector (4 words) and chunk edges, N a multiple of the 4-channel vector store and
    # not, every epilogue (its own rng: the specs above keep their data)
    rng = np.random.default_rng(255)
    for i, k in enumerate(SHORT_KS):
        for j, (ba, bw) in enumerate([(1, 1), (2, 1), (2, 2), (4, 4)]):
            n = [8, 12, 36, 5][(i + j) % 4]
            epi = epis[(i + j) % 3]
            w = rng.integers(0, 1 << bw, size=(n, k), dtype=np.uint8)
            bound = k * ((1 << ba) - 1) * (1 << bw)
            specs.append(LayerSpec(f"gemm_a{ba}w{bw}_k{k}_n{n}_{epi}", "gemm", ba, bw, w,
                                   _wzero2(rng, n, bw, asym=(i + j) % 2 == 1), epilogue=epi,
                                   **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    for k, epi in [(256, "threshold"), (257, "float")]:
        n = 12
        specs.append(LayerSpec(f"gemm_xor_k{k}_{epi}", "gemm", 1, 1, rng.integers(0, 2, (n, k), dtype=np.uint8),
                               np.ones(n, np.int32), xor_mode=True, epilogue=epi,
                               **_epilogue(rng, n, epi, -k // 2, k // 2)))
    # thresholds past the int16 range next to ones inside the acc range: the LUT conv's 16-bit threshold epilogue
    # (codegen.lut_acc16) clamps them to int16, which must not change a code
    rng = np.random.default_rng(256)
    n, rows = 40, np.arange(40)[:, None]
    inside = np.sort(rng.integers(-300, 301, size=(n, 5)), axis=1)
    low = np.select([rows % 3 == 0, rows % 3 == 1], [-40000, -32769], inside[:, :1])   # one side past int16, the
    high = np.select([rows % 4 == 0, rows % 4 == 1], [40000, 32768], inside[:, 4:])    # other one, both or none
    t = np.concatenate([low, inside[:, 1:4], high], axis=1).astype(np.int32)
    specs.append(LayerSpec("lconv_c32_thr_clamp", "conv", 2, 1, rng.integers(0, 2, size=(n, 32, 3, 3), dtype=np.uint8),
                           _wzero2(rng, n, 1, asym=False), in_shape=(32, 8, 9), pads=(1, 1, 1, 1),
                           epilogue="threshold", thresholds=t))
    # the LUT conv's stage 1 interleaves chunks of whole rows (<= 8192 words): 3 rows per chunk over 7 rows (a short
    # last chunk), and rows wider than a chunk (one row, on the heap)
    for name, chw, n in (("lconv_c256_chunks", (256, 7, 40), 33), ("lconv_c1024_wide", (1024, 3, 40), 8)):
        specs.append(LayerSpec(name, "conv", 2, 1, rng.integers(0, 2, size=(n, chw[0], 3, 3), dtype=np.uint8),
                               _wzero2(rng, n, 1, asym=False), in_shape=chw, pads=(1, 1, 1, 1), epilogue="threshold",
                               **_epilogue(rng, n, "threshold", -300, 300)))
    # a MaxPoolCodes folded into the conv (LayerSpec.pool): in the LUT kernel on its pixel-major rows (Wo >= 16
    # and not a multiple of 16, an odd window with rows and columns left over, Wo < 16 with N past a block, a
    # 32-bit epilogue), and through scratch + the max-pool kernel (the popcount convs, every generic path)
    rng = np.random.default_rng(257)
    pooled = [  # name, (C, H, W), N, pads, (ba, bw), xor, pool
        ("lconv_pool2_c32", (32, 28, 22), 64, (1, 1, 1, 1), (2, 1), False, (2, 2)),
        ("lconv_pool32_c20", (20, 11, 13), 70, (1, 1, 1, 1), (2, 1), False, (3, 2)),
        ("lconv_pool2_c128_wo7", (128, 7, 7), 40, (1, 1, 1, 1), (2, 1), False, (2, 2)),
        ("lconv_pool2_w2a4_acc32", (64, 6, 9), 33, (0, 0, 0, 0), (4, 2), False, (2, 2)),
        ("dconv_pool2_xor", (64, 9, 9), 40, (1, 1, 1, 1), (1, 1), True, (2, 2)),
        ("conv_pool1x3_c5", (5, 6, 10), 6, (1, 1, 1, 1), (2, 2), False, (1, 3)),
    ]
    for name, chw, n, pads, (ba, bw), xor, pool in pooled:
        bound = chw[0] * 9 * ((1 << ba) - 1) * (1 << bw)
        z2 = np.ones(n, np.int32) if xor else _wzero2(rng, n, bw, asym=bw > 1)
        specs.append(LayerSpec(name, "conv", ba, bw, rng.integers(0, 1 << bw, size=(n, chw[0], 3, 3), dtype=np.uint8),
                               z2, in_shape=chw, pads=pads, epilogue="threshold", xor_mode=xor, pool=pool,
                               **_epilogue(rng, n, "threshold", -bound // 4, bound // 4)))
    # float input quantized by the layer (LayerSpec.in_thresholds): in the LUT kernel's stage 1 (with and without
    # a pool, a level no float reaches = NaN), through scratch codes (the popcount conv: xor mode; every generic
    # path), with the float epilogue
    rng = np.random.default_rng(258)
    floats = [  # name, (C, H, W), N, (ba, bw), xor, pool, epilogue, thresholds
        ("lconv_fin_pool2", (32, 12, 18), 40, (2, 1), False, (2, 2), "threshold", [-0.5, 0.0, 0.75]),
        ("lconv_fin_c3_nan", (3, 5, 9), 33, (2, 1), False, None, "threshold", [-1.0, 1.5, np.nan]),
        ("lconv_fin_float", (8, 6, 6), 5, (2, 2), False, None, "float", [0.1, 0.2, 0.3]),
        ("dconv_fin_xor_pool", (64, 7, 7), 9, (1, 1), True, (2, 2), "threshold", [0.0]),
    ]
    for name, chw, n, (ba, bw), xor, pool, epi, thr in floats:
        bound = chw[0] * 9 * ((1 << ba) - 1) * (1 << bw)
        z2 = np.ones(n, np.int32) if xor else _wzero2(rng, n, bw, asym=False)
        specs.append(LayerSpec(name, "conv", ba, bw, rng.integers(0, 1 << bw, size=(n, chw[0], 3, 3), dtype=np.uint8),
                               z2, in_shape=chw, pads=(1, 1, 1, 1), epilogue=epi, xor_mode=xor, pool=pool,
                               in_thresholds=np.array(thr, np.float32),
                               **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    # a BitGemm quantizing its float input (the MLP's first quantized layer): K not a multiple of 64, both epilogues
    for name, k, n, (ba, bw), epi, thr in (("gemm_fin_k200", 200, 37, (2, 1), "threshold", [-0.5, 0.0, 0.75]),
                                           ("gemm_fin_k65_float", 65, 10, (1, 2), "float", [0.25])):
        bound = k * ((1 << ba) - 1) * (1 << bw)
        specs.append(LayerSpec(name, "gemm", ba, bw, rng.integers(0, 1 << bw, size=(n, k), dtype=np.uint8),
                               _wzero2(rng, n, bw, asym=bw > 1), in_shape=(k,), epilogue=epi,
                               in_thresholds=np.array(thr, np.float32),
                               **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    return specs


SPECS = _specs()
BY_NAME = {s.name: s for s in SPECS}


def expected(spec: LayerSpec, x: np.ndarray) -> np.ndarray:
    if spec.in_thresholds is not None:  # the layer's own input quantizer (NaN compares false: code 0)
        x = (x[..., None] >= spec.in_thresholds).sum(axis=-1).astype(np.uint8)
    if spec.op == "maxpool":
        return ref.max_pool_codes(x, spec.kernel, spec.strides, spec.dilations)
    geo = dict(strides=spec.strides, pads=spec.pads, dilations=spec.dilations, group=spec.group)
    if spec.op == "gemm":
        acc = ref.bit_gemm_xor(x, spec.w) if spec.xor_mode else ref.bit_gemm(x, spec.w, spec.wzero2)
    else:
        acc = ref.bit_conv_xor(x, spec.w, **geo) if spec.xor_mode else ref.bit_conv(x, spec.w, spec.wzero2, **geo)
    if spec.epilogue == "float":
        return ref.epilogue_float(acc, spec.mult, spec.bias)
    if spec.epilogue == "threshold":
        codes = ref.epilogue_threshold(acc, spec.thresholds)
        return codes if spec.pool is None else ref.max_pool_codes(codes, spec.pool, spec.pool, (1, 1))
    return acc


def make_input(spec: LayerSpec, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if spec.in_thresholds is not None:  # floats around the thresholds, the thresholds themselves, inf, NaN
        x = rng.normal(0.0, 1.0, (batch, *spec.in_shape)).astype(np.float32)
        t = spec.in_thresholds[np.isfinite(spec.in_thresholds)]
        special = np.concatenate([t, np.nextafter(t, -np.inf), [np.inf, -np.inf, np.nan, -0.0]]).astype(np.float32)
        x.flat[rng.choice(x.size, min(x.size, 4 * special.size), replace=False)] = np.resize(special, min(x.size, 4 * special.size))
        return x
    return rng.integers(0, 1 << spec.bits_a, size=(batch, *spec.in_shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def native_lib(tmp_path_factory) -> Library:
    return Library(build_library(SPECS, tmp_path_factory.mktemp("cpu_native")))


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory) -> Library:
    if simde_include_dir() is None:
        pytest.skip("SIMDe headers missing (apt-get install libsimde-dev): cannot emulate AVX-512 here")
    return Library(build_library(SPECS, tmp_path_factory.mktemp("cpu_emulated"), emulate_avx512=True))


@pytest.fixture(params=["generic", "avx2", "avx512"])
def path_lib(request, monkeypatch):
    """(path, library) with QCOMPILE_CPU_PATH forcing the path; AVX-512 falls back to the emulated build."""
    path = request.param
    lib = request.getfixturevalue("native_lib")
    if not lib.path_available(path):
        if path != "avx512":
            pytest.skip(f"this CPU has no {path}")
        lib = request.getfixturevalue("emulated_lib")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", path)
    assert lib.selected_path() == path
    return path, lib


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_layer_bit_exact(path_lib, name):
    path, lib = path_lib
    spec = BY_NAME[name]
    for batch in (1, 3, 6) if spec.op == "gemm" else (1, 2):
        x = make_input(spec, batch, seed=batch * 7919 + len(name))
        y = lib.run(name, x)
        want = expected(spec, x)
        assert y.dtype == want.dtype and y.shape == want.shape
        np.testing.assert_array_equal(y, want, err_msg=f"{name} path={path} batch={batch}")


@pytest.mark.parametrize("name", [s.name for s in SPECS if s.op == "gemm" and s.K <= 1000])
def test_gemm_rows_1_to_17_bit_exact(path_lib, name):
    """Every row count around the register tiles (full tiles, leftover rows, the small-batch stack buffer)."""
    path, lib = path_lib
    spec = BY_NAME[name]
    for batch in range(1, 18):
        x = make_input(spec, batch, seed=batch * 131 + len(name))
        np.testing.assert_array_equal(lib.run(name, x), expected(spec, x), err_msg=f"{name} path={path} M={batch}")


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from([s.name for s in SPECS if s.K <= 1000]), batch=st.integers(1, 13),
       seed=st.integers(0, 2**32 - 1), path=st.sampled_from(["generic", "avx2", "avx512"]))
def test_random_batches_bit_exact(native_lib, emulated_lib, name, batch, seed, path):
    lib = native_lib if native_lib.path_available(path) else emulated_lib if path == "avx512" else None
    if lib is None:
        return
    spec = BY_NAME[name]
    x = make_input(spec, batch, seed)
    os.environ["QCOMPILE_CPU_PATH"] = path
    try:
        np.testing.assert_array_equal(lib.run(name, x), expected(spec, x))
    finally:
        del os.environ["QCOMPILE_CPU_PATH"]


def test_auto_path_is_the_best_available(native_lib, monkeypatch):
    monkeypatch.delenv("QCOMPILE_CPU_PATH", raising=False)
    c = caps.detect()
    assert native_lib.selected_path() == c.path
    spec = BY_NAME["gemm_a2w2_k1000_n67_none"] if "gemm_a2w2_k1000_n67_none" in BY_NAME else SPECS[0]
    x = make_input(spec, 5, 1)
    np.testing.assert_array_equal(native_lib.run(spec.name, x), expected(spec, x))


def test_large_batch_and_threads_agree(native_lib, monkeypatch):
    spec = next(s for s in SPECS if s.name.startswith("gemm_a2w2_k4096"))
    x = make_input(spec, 67, 5)
    want = expected(spec, x)
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("QCOMPILE_NUM_THREADS", threads)
        assert native_lib.num_threads() == int(threads)
        np.testing.assert_array_equal(native_lib.run(spec.name, x), want)


@pytest.mark.parametrize("threads", ["2", "3"])
def test_short_rows_split_by_rows_bit_exact(native_lib, emulated_lib, monkeypatch, threads):
    """Enough rows and small weights: the AVX-512 kernel splits rows across threads and each task packs its own
    rows (layer_dgemm.c); every GEMM of the library at M = 33..257 on that path, against the reference."""
    lib = native_lib if native_lib.path_available("avx512") else emulated_lib
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx512")
    monkeypatch.setenv("QCOMPILE_NUM_THREADS", threads)
    checked = 0
    for spec in (s for s in SPECS if s.op == "gemm" and s.N * s.K * s.bits_w <= 1 << 20):
        for batch in (33, 64, 257):
            x = make_input(spec, batch, seed=batch + spec.K)
            np.testing.assert_array_equal(lib.run(spec.name, x), expected(spec, x),
                                          err_msg=f"{spec.name} M={batch} threads={threads}")
            checked += 1
    assert checked >= 15


def test_float_epilogue_is_not_fused(native_lib):
    """The data must tell an FMA from a multiply-then-add, and the kernel must give the latter."""
    spec = next(s for s in SPECS if s.epilogue == "float" and s.op == "gemm" and s.K >= 1000)
    x = make_input(spec, 64, 11)
    acc = ref.bit_gemm(x, spec.w, spec.wzero2).astype(np.float32)
    fused = (acc.astype(np.float64) * spec.mult.astype(np.float64) + spec.bias).astype(np.float32)
    separate = (acc * spec.mult) + spec.bias
    assert np.any(fused != separate), "test data cannot distinguish an FMA"
    np.testing.assert_array_equal(native_lib.run(spec.name, x), separate)


def test_unknown_or_unavailable_path_raises(native_lib, monkeypatch):
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "sse9")
    assert native_lib.selected_path() is None
    with pytest.raises(KernelPathError, match="sse9"):
        native_lib.run(SPECS[0].name, make_input(SPECS[0], 1, 0))
    if not native_lib.path_available("avx512"):
        monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx512")
        with pytest.raises(KernelPathError, match="available"):
            native_lib.run(SPECS[0].name, make_input(SPECS[0], 1, 0))


def test_run_checks_inputs(native_lib):
    spec = BY_NAME["conv1x1"]
    with pytest.raises(RuntimeInputError, match="shape"):
        native_lib.run("conv1x1", np.zeros((1, 5, 4, 4), np.uint8))
    with pytest.raises(RuntimeInputError, match="exceed"):
        native_lib.run("conv1x1", np.full((1, *spec.in_shape), 4, np.uint8))
    with pytest.raises(RuntimeInputError, match="no layer"):
        native_lib.run("nope", np.zeros(3, np.uint8))
    assert native_lib.run("conv1x1", np.zeros((0, *spec.in_shape), np.uint8)).shape == (0, *spec.out_shape)
    # a layer that quantizes its input takes floats (float64 is converted), not codes
    fin = BY_NAME["lconv_fin_c3_nan"]
    assert native_lib.layers[fin.name].in_dtype == np.float32
    with pytest.raises(RuntimeInputError, match="float32 values"):
        native_lib.run(fin.name, np.zeros((1, *fin.in_shape), np.uint8))
    x = make_input(fin, 2, 3)
    np.testing.assert_array_equal(native_lib.run(fin.name, x.astype(np.float64)), expected(fin, x))


def test_manifest_describes_layers(native_lib):
    info = native_lib.layers["conv3x3_s2_oddpad_c70"]
    assert info.op == "conv" and info.in_shape == (70, 9, 7) and info.out_shape == (10, 5, 3)
    assert info.out_dtype == np.float32
    assert native_lib.manifest["abi"] == 1


def test_missing_compiler_raises_toolchain_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(ToolchainError, match=r"C compiler .* not found; install gcc"):
        build_library(SPECS[:1], tmp_path)


def test_compile_failure_names_the_first_error(tmp_path):
    with pytest.raises(ToolchainError, match="failed: .*(error|unrecognized)"):
        build_library(SPECS[:1], tmp_path, extra_cflags=["-fno-such-flag-qcompile"])


def test_bad_specs_are_refused():
    w = np.zeros((2, 8), np.uint8)
    with pytest.raises(QcompileError, match="xor mode"):
        LayerSpec("x", "gemm", 2, 1, w, np.ones(2, np.int32), xor_mode=True)
    with pytest.raises(QcompileError, match="weight codes"):
        LayerSpec("x", "gemm", 1, 1, w + 2, np.ones(2, np.int32))
    with pytest.raises(ValueError, match="thresholds"):
        LayerSpec("x", "gemm", 1, 1, w, np.ones(2, np.int32), epilogue="threshold")
    with pytest.raises(ValueError, match="group"):
        LayerSpec("x", "conv", 1, 1, np.zeros((3, 2, 1, 1), np.uint8), np.ones(3, np.int32), in_shape=(4, 2, 2),
                  group=2)
    conv = dict(w=np.zeros((3, 4, 1, 1), np.uint8), wzero2=np.ones(3, np.int32), in_shape=(4, 2, 3))
    with pytest.raises(ValueError, match="threshold epilogue takes a pool"):
        LayerSpec("x", "conv", 1, 1, **conv, pool=(2, 2))
    with pytest.raises(ValueError, match="pool window"):
        LayerSpec("x", "conv", 1, 1, **conv, epilogue="threshold", thresholds=np.zeros((3, 1), np.int32), pool=(3, 1))
    ok = LayerSpec("x", "conv", 1, 1, **conv, epilogue="threshold", thresholds=np.zeros((3, 1), np.int32), pool=(2, 3))
    assert ok.out_hw == (2, 3) and ok.out_shape == (3, 1, 1)


def test_from_node_attributes():
    w = np.zeros((4, 3, 3, 3), np.uint8)
    s = LayerSpec.from_node("c", "BitConv", {"bits_a": 2, "bits_w": 1, "strides": [2, 2], "pads": [1, 1, 1, 1],
                                             "group": 1, "epilogue": b"none", "kernel_shape": [3, 3]},
                            w, np.ones(4, np.int32), in_shape=(3, 8, 8))
    assert s.op == "conv" and s.out_shape == (4, 4, 4) and s.K == 27


_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("how", ["package", "file"])
def test_kernel_loader_needs_only_numpy(how):
    """kernels.py itself needs numpy alone (loaded as a file, onnxruntime blocked too); through the package
    (qcompile.runtime, which also serves InferenceSession) no onnx/torch/click/compiler is imported."""
    blocked = {"onnx", "torch", "click", "rich", "onnx_ir", "onnxscript"}
    if how == "file":
        blocked.add("onnxruntime")
        load = textwrap.dedent("""
            import importlib.util
            spec = importlib.util.spec_from_file_location("kernels_alone", %r)
            k = sys.modules["kernels_alone"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(k)
        """ % sys.modules[Library.__module__].__file__)
    else:
        load = "import qcompile.runtime.kernels as k\n"
    code = f"BLOCKED = {blocked!r}\n" + _BLOCK + load + "print(k.Library.__name__)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Library" in proc.stdout


def test_caps_parse_and_variants():
    info = "flags\t: fpu sse2 avx2 popcnt fma avx512f avx512bw avx512_vpopcntdq amx_tile amx_int8\ncpu MHz\t: 2500.0\n"
    c = caps.detect("cpu", cpuinfo=info)
    assert (c.path, c.popcount_bits, c.int8_dot, c.ghz) == ("avx512", 512, "amx", 2.5)
    assert caps.detect("cpu:avx2", cpuinfo=info).path == "avx2"
    assert caps.detect("cpu:generic", cpuinfo=info).popcount_bits == 64
    zen = caps.detect("cpu", cpuinfo="flags\t: sse2 avx2 popcnt fma\n")
    assert zen.path == "avx2" and zen.int8_dot is None
    with pytest.raises(ValueError, match="cpu:avx2"):
        caps.detect("gpu")


def test_maxpool_spec_and_manifest(native_lib):
    m = native_lib.manifest["layers"]["pool_2x2_s2"]
    assert m["op"] == "maxpool" and m["out_dtype"] == "uint8" and m["out_shape"] == [16, 14, 14]
    assert m["kernel"] == [2, 2] and m["strides"] == [2, 2]
    with pytest.raises(ValueError, match="no pads"):
        LayerSpec("p", "maxpool", 2, 1, np.zeros((3, 1, 2, 2), np.uint8), np.zeros(3, np.int32), in_shape=(3, 4, 4),
                  pads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="window"):
        LayerSpec("p", "maxpool", 2, 1, np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, np.int32), in_shape=(3, 4, 4))
    with pytest.raises(ValueError, match="empty"):
        LayerSpec.maxpool("p", (3, 2, 2), (3, 3))
    x = make_input(BY_NAME["pool_2x2_s2"], 1, 3)  # batch 1, 2-bit codes
    with pytest.raises(RuntimeInputError, match="exceed 2 bits"):
        native_lib.run("pool_2x2_s2", x | 4)


LUT_LAYERS = [s.name for s in SPECS if lut_layer(s)]


@pytest.fixture(scope="module")
def popcount_lib(tmp_path_factory) -> Library:
    """The layers that the AVX2 path runs by lookup tables, built with popcounts instead (lut=False)."""
    return Library(build_library([BY_NAME[n] for n in LUT_LAYERS], tmp_path_factory.mktemp("cpu_popcount"),
                                 lut=False))


def _top(spec: LayerSpec) -> LayerSpec:
    """Every weight at its top code: with the top activation codes, S reaches K * qmax * pmax."""
    return spec.replace(name=spec.name + "_top", w=np.full_like(spec.w, (1 << spec.bits_w) - 1))


@pytest.fixture(scope="module")
def top_lib(tmp_path_factory) -> Library:
    return Library(build_library([_top(BY_NAME[n]) for n in LUT_LAYERS], tmp_path_factory.mktemp("cpu_top")))


def test_lut_eligibility_and_manifest(native_lib, popcount_lib):
    assert {"conv3x3_pad_c64", "dconv_c32_w1a2_thr", "lconv_c256_w1a4", "conv_5x5_valid", "gemm_a2w1_k1_n5_float",
            "gemm_a2w2_k4096_n3_float", "gemm_a3w2_k65_n67_none"} <= set(LUT_LAYERS)
    # XOR modes, groups, horizontal dilation, a byte that one lookup could overflow (W4A4), and W1A1 GEMMs
    # (the popcount kernel is as fast there) stay on popcounts
    for name in ("conv_xor_pad", "dconv_xor_c40", "conv_grouped", "conv_dilated", "dconv_c1_5x5", "gemm_xor_k64",
                 "gemm_a1w1_k1000_n3_float", "gemm_a4w4_k1000_n1_float"):
        assert not lut_layer(BY_NAME[name]), name
    # the 16-bit threshold epilogue: threshold LUT convs whose acc fits strictly inside int16
    assert lut_acc16(BY_NAME["lconv_c32_thr_clamp"]) and lut_acc16(BY_NAME["dconv_c64_w2a2_thr_asym"])
    assert not lut_acc16(BY_NAME["lconv_c256_w1a4"])  # int32 epilogue: not a threshold layer
    w2a2 = BY_NAME["dconv_c64_w2a2_thr_asym"]
    assert not lut_acc16(w2a2.replace(w=np.zeros((6, 250, 3, 3), np.uint8), in_shape=(250, 5, 8)))  # 2*S > 32766
    big = BY_NAME["lconv_c256_w1a4"]
    assert not lut_conv(big.replace(w=np.zeros((32, 500, 3, 3), np.uint8), in_shape=(500, 4, 6)))  # S > 65535
    kernels = native_lib.manifest["layers"]
    assert {n for n, v in kernels.items() if v.get("avx2_kernel") == "lut"} == set(LUT_LAYERS)
    assert all(v["avx2_kernel"] == "popcount" for v in popcount_lib.manifest["layers"].values())
    # the AVX-512 path runs the LUT convs too, and the LUT GEMMs only in a library without AVX-512 layer kernels
    lut_convs = {n for n in LUT_LAYERS if BY_NAME[n].op == "conv"}
    want = lut_convs if native_lib.manifest["layer_avx512"] else set(LUT_LAYERS)
    assert {n for n, v in kernels.items() if v.get("avx512_kernel") == "lut"} == want


def test_avx512_library_runs_its_gemms_on_the_avx512_kernel(emulated_lib):
    """A library with AVX-512 layer kernels records (and runs, QC_LUT_GEMM) its LUT-eligible GEMMs on them."""
    assert emulated_lib.manifest["layer_avx512"]
    lut_convs = {n for n in LUT_LAYERS if BY_NAME[n].op == "conv"}
    assert {n for n, v in emulated_lib.manifest["layers"].items() if v.get("avx512_kernel") == "lut"} == lut_convs


def _random_lut_specs(count: int = 24, seed: int = 7) -> list[LayerSpec]:
    """Random LUT-eligible geometries (one library for all): any channel count (odd 4-channel groups), 1..3 taps
    each way, strides, asymmetric pads, vertical dilation, N around the 32-channel block, every epilogue, and
    GEMMs with any K."""
    rng = np.random.default_rng(seed)
    specs, epis = [], ["none", "float", "threshold"]
    pairs = [(2, 1), (1, 2), (2, 2), (3, 1), (4, 1), (1, 3), (3, 2), (1, 1)]
    while len(specs) < count:
        ba, bw = pairs[int(rng.integers(len(pairs)))]
        n, epi = int(rng.integers(1, 71)), epis[int(rng.integers(3))]
        z2 = _wzero2(rng, n, bw, asym=bool(rng.integers(2)))
        if len(specs) % 3 == 2:
            k = int(rng.integers(1, 301))
            spec = LayerSpec(f"rand{len(specs)}_gemm", "gemm", ba, bw, rng.integers(0, 1 << bw, (n, k), dtype=np.uint8),
                             z2, epilogue=epi, **_epilogue(rng, n, epi, -k, k))
            if ba * bw < 2:
                continue
        else:
            c, h, w = (int(v) for v in rng.integers(1, [71, 10, 10]))
            kh, kw = (int(v) for v in rng.integers(1, 4, 2))
            dh = int(rng.integers(1, 3))
            pads = tuple(int(rng.integers(0, kk)) if kk > 1 else 0 for kk in (kh, kw, kh, kw))
            if h + pads[0] + pads[2] < dh * (kh - 1) + 1 or w + pads[1] + pads[3] < kw:
                continue
            bound = c * kh * kw * ((1 << ba) - 1) * (1 << bw)
            spec = LayerSpec(f"rand{len(specs)}_conv", "conv", ba, bw,
                             rng.integers(0, 1 << bw, (n, c, kh, kw), dtype=np.uint8), z2, in_shape=(c, h, w),
                             strides=tuple(int(v) for v in rng.integers(1, 3, 2)), pads=pads, dilations=(dh, 1),
                             epilogue=epi, **_epilogue(rng, n, epi, -bound // 4, bound // 4))
            if epi == "threshold" and len(specs) % 2:  # a folded pool, up to the whole output
                spec = spec.replace(pool=tuple(int(rng.integers(1, o + 1)) for o in spec.out_hw))
        if lut_layer(spec):
            specs.append(spec)
    return specs


RANDOM_LUT = _random_lut_specs()


def test_random_lut_geometries_bit_exact_on_avx2(tmp_path, monkeypatch):
    if not caps.detect().avx2:
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx2")
    lib = Library(build_library(RANDOM_LUT, tmp_path))
    assert all(v["avx2_kernel"] == "lut" for v in lib.manifest["layers"].values())
    for i, spec in enumerate(RANDOM_LUT):
        for batch in (1, 2 + i % 9):
            x = make_input(spec, batch, seed=i * 31 + batch)
            np.testing.assert_array_equal(lib.run(spec.name, x), expected(spec, x), err_msg=f"{spec.name} {spec.in_shape} {spec.strides} {spec.pads} {spec.dilations} batch {batch}")


@pytest.mark.parametrize("name", LUT_LAYERS)
def test_lut_and_popcount_kernels_bit_exact_on_avx2(native_lib, popcount_lib, top_lib, monkeypatch, name):
    """Both kernels of the AVX2 path, on random codes and on the top codes (the byte and 16-bit sums' worst
    case: every lookup at its largest entry)."""
    if not native_lib.path_available("avx2"):
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx2")
    spec, top = BY_NAME[name], _top(BY_NAME[name])
    top_x = np.full((2, *spec.in_shape), np.inf, np.float32) if spec.in_thresholds is not None else \
        np.full((2, *spec.in_shape), (1 << spec.bits_a) - 1, np.uint8)
    xs = [make_input(spec, 3, 5), top_x]
    for x in xs:
        for lib in (native_lib, popcount_lib):
            np.testing.assert_array_equal(lib.run(name, x), expected(spec, x), err_msg=name)
        np.testing.assert_array_equal(top_lib.run(top.name, x), expected(top, x), err_msg=f"{name} top weights")


@pytest.mark.parametrize("name", ["dconv_c32_w1a2_thr", "dconv_xor_c64_s2", "conv3x3_pad_c64", "lconv_c256_chunks"])
def test_direct_conv_threads_and_row_blocks_agree(native_lib, monkeypatch, name):
    """Tasks are whole images once the batch gives every thread 4 of them, else blocks of rows: every split
    (threads x batch) gives the reference's output."""
    spec = BY_NAME[name]
    for batch in (1, 5, 17):
        x = make_input(spec, batch, 100 + batch)
        want = expected(spec, x)
        for threads in ("1", "2", "3"):
            monkeypatch.setenv("QCOMPILE_NUM_THREADS", threads)
            np.testing.assert_array_equal(native_lib.run(spec.name, x), want, err_msg=f"{threads} threads, {batch}")


def test_lut_conv_buffers_are_reused_and_safe_across_threads(native_lib, monkeypatch):
    """A LUT conv keeps its table buffers between calls (their padding border must stay zero) and gives them to one
    caller at a time: calls from several Python threads at once, each with its own batch, against the reference."""
    import threading

    if not native_lib.path_available("avx2"):
        pytest.skip("this CPU has no AVX2")
    monkeypatch.setenv("QCOMPILE_CPU_PATH", "avx2")
    names = [n for n in ("conv3x3_pad_c64", "lconv_c256_chunks", "conv_5x5_valid") if n in BY_NAME and
             native_lib.manifest["layers"][n].get("avx2_kernel") == "lut"]
    assert names
    cases = [(BY_NAME[n], b, make_input(BY_NAME[n], b, 7 * b + i)) for i, n in enumerate(names) for b in (1, 6, 2)]
    wants = [expected(spec, x) for spec, _, x in cases]
    errors = []

    def worker(k):
        for rep in range(6):
            i = (k + rep) % len(cases)
            spec, _, x = cases[i]
            if not np.array_equal(native_lib.run(spec.name, x), wants[i]):
                errors.append(f"{spec.name} batch {x.shape[0]} (thread {k}, call {rep})")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
