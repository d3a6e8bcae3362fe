"""Shared layer specs of the GPU target tests: the CPU target's cases (awkward K, every bit pair and epilogue, xor
mode, strided / padded / dilated / grouped convs, max-pools) plus tile edges of the GPU kernels."""

from __future__ import annotations

import subprocess

import numpy as np

from qcompile.errors import ToolchainError
from qcompile.targets.cpu import LayerSpec

BITS = [(1, 1), (2, 1), (2, 2), (4, 4), (4, 1), (1, 2), (3, 2)]  # (bits_a, bits_w)
EPIS = ["none", "float", "threshold"]


def _epilogue(rng, n, kind, lo, hi):
    if kind == "float":
        return dict(mult=rng.standard_normal(n).astype(np.float32) * 0.37,
                    bias=rng.standard_normal(n).astype(np.float32) * 100)
    if kind == "threshold":
        levels = int(rng.choice([1, 3, 15]))
        return dict(thresholds=np.sort(rng.integers(lo, hi + 1, size=(n, levels)), axis=1).astype(np.int32))
    return {}


def _wzero2(rng, n, bits_w, asym):
    if asym:
        return (2 * rng.integers(0, 1 << bits_w, size=n)).astype(np.int32)
    return np.full(n, (1 << bits_w) - 1, np.int32)


def _gemm(rng, name, k, n, ba, bw, epi, asym):
    w = rng.integers(0, 1 << bw, size=(n, k), dtype=np.uint8)
    bound = k * ((1 << ba) - 1) * (1 << bw)
    return LayerSpec(name, "gemm", ba, bw, w, _wzero2(rng, n, bw, asym), epilogue=epi,
                     **_epilogue(rng, n, epi, -bound // 4, bound // 4))


def gpu_specs() -> list[LayerSpec]:
    rng = np.random.default_rng(2026)
    specs = []
    for i, k in enumerate([1, 63, 65, 257, 1000]):        # K never a multiple of the 256-bit MMA step but one
        for j, (ba, bw) in enumerate(BITS):
            if (i + j) % 2:                                  # half the grid keeps the emulation quick
                continue
            n = [1, 5, 67, 130, 3, 17, 9][(i + j) % 7]
            epi = EPIS[(i + j) % 3]
            specs.append(_gemm(rng, f"gemm_a{ba}w{bw}_k{k}_n{n}_{epi}", k, n, ba, bw, epi, (i + j) % 4 == 1))
    specs.append(_gemm(rng, "gemm_a1w1_k256_n8_none", 256, 8, 1, 1, "none", False))
    specs.append(_gemm(rng, "gemm_a2w2_k2048_n70_thr", 2048, 70, 2, 2, "threshold", True))
    specs.append(_gemm(rng, "gemm_a1w1_k512_n130_float", 512, 130, 1, 1, "float", False))  # 2 channel tiles
    specs.append(_gemm(rng, "gemm_a8w8_k100_n9_none", 100, 9, 8, 8, "none", True))          # widest codes
    for k, epi in [(1, "none"), (65, "threshold"), (257, "float"), (1000, "none")]:
        n = 7
        specs.append(LayerSpec(f"gemm_xor_k{k}_{epi}", "gemm", 1, 1, rng.integers(0, 2, (n, k), dtype=np.uint8),
                               np.ones(n, np.int32), xor_mode=True, epilogue=epi,
                               **_epilogue(rng, n, epi, -k // 2, k // 2)))
    convs = [
        # name, (C, H, W), N, (kh, kw), strides, pads, dilations, group, (ba, bw), epilogue, xor
        ("conv1x1", (5, 4, 3), 6, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, (2, 2), "none", False),
        ("conv3x3_pad_c64", (64, 6, 7), 65, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", False),
        ("conv3x3_s2_oddpad_c70", (70, 9, 7), 10, (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 1, (2, 1), "float", False),
        ("conv_grouped", (12, 5, 5), 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3, (4, 4), "threshold", False),
        ("conv_depthwise", (8, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 8, (2, 2), "none", False),
        ("conv_dilated", (16, 9, 8), 5, (3, 2), (1, 2), (2, 1, 2, 1), (2, 2), 1, (4, 1), "none", False),
        ("conv_big_c130_g2", (130, 5, 5), 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2, (1, 2), "float", False),
        ("conv_5x5_valid", (3, 8, 8), 4, (5, 5), (1, 1), (0, 0, 0, 0), (1, 1), 1, (3, 2), "threshold", False),
        ("conv_c128_s2_vec4", (128, 7, 9), 5, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, (2, 2), "float", False),
        ("conv_c64_w2a2_thr_asym", (64, 5, 8), 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (2, 2), "threshold",
         False),
        ("conv_xor_pad", (20, 5, 6), 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "none", True),
        ("conv_xor_valid", (66, 5, 4), 3, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1), 1, (1, 1), "none", True),
        ("conv_xor_grouped_pad", (6, 4, 5), 4, (3, 3), (2, 1), (1, 1, 0, 1), (1, 1), 2, (1, 1), "none", True),
        ("conv_xor_pad_thr", (64, 6, 9), 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, (1, 1), "threshold", True),
    ]
    for name, chw, n, kernel, strides, pads, dil, group, (ba, bw), epi, xor in convs:
        w = rng.integers(0, 1 << bw, size=(n, chw[0] // group, *kernel), dtype=np.uint8)
        bound = chw[0] // group * kernel[0] * kernel[1] * ((1 << ba) - 1) * (1 << bw)
        z2 = np.ones(n, np.int32) if xor else _wzero2(rng, n, bw, asym=bw > 1 and n % 2 == 0)
        specs.append(LayerSpec(name, "conv", ba, bw, w, z2, in_shape=chw, strides=strides, pads=pads,
                               dilations=dil, group=group, epilogue=epi, xor_mode=xor,
                               **_epilogue(rng, n, epi, -bound // 4, bound // 4)))
    # a 2x2 max-pool folded into a conv (threshold epilogue), MaxPoolCodes layers, a layer quantizing float input
    w = rng.integers(0, 2, size=(9, 16, 3, 3), dtype=np.uint8)
    specs.append(LayerSpec("conv_pool_folded", "conv", 2, 1, w, np.ones(9, np.int32), in_shape=(16, 7, 9),
                           pads=(1, 1, 1, 1), epilogue="threshold", pool=(2, 2),
                           thresholds=np.sort(rng.integers(-60, 60, (9, 3)), axis=1).astype(np.int32)))
    # reads the folded conv's pooled codes [9, 3, 4] flattened: the device-resident chain test
    specs.append(_gemm(rng, "gemm_after_pool_k108_a2", 108, 10, 2, 1, "float", False))
    for name, chw, kernel, strides, dil, bits in [("pool_2x2_s2_odd", (5, 7, 9), (2, 2), (2, 2), (1, 1), 8),
                                                  ("pool_3x2_s12_dil21", (3, 8, 7), (3, 2), (1, 2), (2, 1), 4)]:
        specs.append(LayerSpec.maxpool(name, chw, kernel, strides, dil, bits=bits))
    t = np.array([-0.5, 0.0, 0.25, 0.25, 1.0, 2.0, np.nan], np.float32)
    specs.append(LayerSpec("gemm_float_in_a3w1", "gemm", 3, 1, rng.integers(0, 2, (6, 40), dtype=np.uint8),
                           np.ones(6, np.int32), in_thresholds=t))
    specs.append(LayerSpec("conv_float_in_a3w2", "conv", 3, 2, rng.integers(0, 4, (4, 3, 3, 3), dtype=np.uint8),
                           np.full(4, 3, np.int32), in_shape=(3, 5, 5), pads=(1, 1, 1, 1), in_thresholds=t))
    return specs


def reference_output(spec: LayerSpec, x: np.ndarray) -> np.ndarray:
    """What the layer must write for input ``x`` (qcompile.reference, nothing else)."""
    from qcompile import reference as ref

    if spec.op == "maxpool":
        return ref.max_pool_codes(x, spec.kernel, spec.strides, spec.dilations)
    if spec.in_thresholds is not None:  # the folded quantizer: code = #{k : x >= T[k]} (NaN never reached)
        t = spec.in_thresholds
        x = np.sum(x[..., None] >= t, axis=-1).astype(np.uint8)
    if spec.op == "gemm":
        acc = ref.bit_gemm_xor(x, spec.w) if spec.xor_mode else ref.bit_gemm(x, spec.w, spec.wzero2)
    else:
        geo = dict(strides=spec.strides, pads=spec.pads, dilations=spec.dilations, group=spec.group)
        acc = ref.bit_conv_xor(x, spec.w, **geo) if spec.xor_mode else ref.bit_conv(x, spec.w, spec.wzero2, **geo)
    if spec.epilogue == "float":
        return ref.epilogue_float(acc, spec.mult, spec.bias)
    if spec.epilogue == "threshold":
        y = ref.epilogue_threshold(acc, spec.thresholds)
        return y if spec.pool is None else ref.max_pool_codes(y, spec.pool, spec.pool)
    return acc


def random_input(spec: LayerSpec, batch: int, rng) -> np.ndarray:
    shape = (batch, *spec.in_shape)
    if spec.in_thresholds is not None:
        return rng.choice(np.array([-1, -0.5, 0, 0.1, 0.25, 0.3, 1, 1.5, 2, 3, np.nan], np.float32), size=shape)
    return rng.integers(0, 1 << spec.bits_a, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------- test helpers
def have_nvcc() -> bool:
    from qcompile.targets.gpu import build as gpu_build

    try:
        gpu_build.nvcc_command()
        return True
    except ToolchainError:
        return False


def same_bits(y: np.ndarray, r: np.ndarray) -> bool:
    """Equal dtype, shape and bits (float32 compared as their bit patterns)."""
    if y.dtype != r.dtype or y.shape != r.shape:
        return False
    return np.array_equal(y.view(np.uint32), r.view(np.uint32)) if y.dtype == np.float32 else np.array_equal(y, r)


def build_emulated(specs, out, archs, **library_options):
    """A library's sources and its host emulation; nvcc builds the fatbin for ``archs`` in the background meanwhile
    (PTX kept in out/ptx) when it is installed. Returns {"dir", "manifest", "so", "nvcc": the Popen or None}."""
    from qcompile.targets.gpu import build as gpu_build

    manifest = gpu_build.build_gpu_library(specs, out, nvcc=False, **library_options)
    job = None
    if have_nvcc():
        (out / "ptx").mkdir()
        argv = [*gpu_build.nvcc_command(), *gpu_build.NVCC_FLAGS, "--fatbin", f"-I{gpu_build.TEMPLATES}",
                *gpu_build.nvcc_flags(archs, sm75=False), "-keep", f"-keep-dir={out / 'ptx'}",
                "-o", str(out / "qc_gpu.fatbin"), str(out / "qc_gpu.cu")]
        job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return {"dir": out, "manifest": manifest, "so": gpu_build.build_emulation(out), "nvcc": job}
