"""GPU kernels, bit-exact against qcompile.reference without a GPU, and compiled by nvcc for sm_80 and sm_90.

The generated qc_gpu.cu is compiled twice per module: by g++ through templates/emu/cuda_emu.h (every block's
threads as fibers, the b1 MMA in the PTX ISA's fragment layout) and, in the background meanwhile, by nvcc into the
fatbin with the PTX kept, which is checked for the b1 tensor-core MMA. The runtime's launcher
(qcompile.runtime.gpu.GpuLibrary) drives the emulation exactly as it drives a GPU.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from qcompile.errors import ArtifactError, ToolchainError
from qcompile.runtime import gpu as gpu_rt
from qcompile.runtime.gpu import CudaDevice, EmuDevice, GpuLibrary, GpuUnavailableError
from qcompile.targets.gpu import build as gpu_build
from qcompile.targets.gpu.build import build_gpu_library, compile_fatbin

from tests.targets.gpu.gpu_cases import (build_emulated, gpu_specs, have_nvcc, random_input, reference_output,
                                        same_bits)

SPECS = gpu_specs()
BY_NAME = {s.name: s for s in SPECS}
MMA = "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc"
ARCHS = ("80", "90")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Sources + constants (no fatbin yet), nvcc started in the background, the emulation built meanwhile."""
    built = build_emulated(SPECS, tmp_path_factory.mktemp("gpu_kernels"), ARCHS)
    yield built
    job = built["nvcc"]
    if job is not None and job.poll() is None:
        job.kill()


@pytest.fixture(scope="module")
def lib(built):
    return GpuLibrary(built["manifest"], EmuDevice(built["so"]))


@pytest.mark.parametrize("path", ["mma", "popc"])
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_layer_bit_exact(lib, monkeypatch, path, name):
    monkeypatch.setenv("QCOMPILE_GPU_PATH", path)
    spec = BY_NAME[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    x = random_input(spec, 3, rng)
    y = lib.run(name, x)
    r = reference_output(spec, x)
    assert same_bits(y, r), f"{name} on the {path} path differs from qcompile.reference"


@pytest.mark.parametrize("name, batches", [
    ("gemm_a1w1_k512_n130_float", [1, 129, 257]),   # one row; rows past one and two 128-row tiles
    ("gemm_a2w2_k2048_n70_thr", [1, 65]),
    ("gemm_xor_k257_float", [1, 130]),
    ("conv3x3_pad_c64", [1, 4]),                     # 4 images = 168 rows: two M tiles
    ("conv_xor_grouped_pad", [1, 7]),
    ("conv_pool_folded", [1, 5]),
])
@pytest.mark.parametrize("path", ["mma", "popc"])
def test_batch_one_and_many_tiles(lib, monkeypatch, name, batches, path):
    monkeypatch.setenv("QCOMPILE_GPU_PATH", path)
    spec = BY_NAME[name]
    rng = np.random.default_rng(7)
    for batch in batches:
        x = random_input(spec, batch, rng)
        assert same_bits(lib.run(name, x), reference_output(spec, x)), f"{name} batch {batch} on {path}"


def test_chain_stays_on_device(lib):
    """A threshold conv (with its folded 2x2 max-pool) hands its codes to the next BitGemm by device pointer."""
    conv, fc = BY_NAME["conv_pool_folded"], BY_NAME["gemm_after_pool_k108_a2"]
    x = random_input(conv, 2, np.random.default_rng(3))
    ptr = lib.upload(x)
    codes = lib.run_device(conv.name, ptr, 2)                  # [2, 9, 3, 4] codes on the device = [2, 108]
    y = lib.download(lib.run_device(fc.name, codes, 2), (2, fc.N), np.float32)
    lib.device.free(ptr)
    want = reference_output(fc, reference_output(conv, x).reshape(2, -1))
    assert same_bits(y, want)


def test_sm75_device_runs_the_cuda_core_path(built, monkeypatch):
    old = GpuLibrary(built["manifest"], EmuDevice(built["so"], cc=(7, 5)))
    monkeypatch.delenv("QCOMPILE_GPU_PATH", raising=False)
    assert old.gemm_path == "popc"
    monkeypatch.setenv("QCOMPILE_GPU_PATH", "mma")
    with pytest.raises(GpuUnavailableError, match="needs sm_80"):
        old.gemm_path
    monkeypatch.setenv("QCOMPILE_GPU_PATH", "bogus")
    with pytest.raises(Exception, match="use mma or popc"):
        old.gemm_path


def test_run_checks_inputs(lib):
    with pytest.raises(Exception, match="expected uint8"):
        lib.run("conv1x1", np.zeros((1, 5, 4, 3), np.float32))
    with pytest.raises(Exception, match="no layer"):
        lib.run("nope", np.zeros((1, 5), np.uint8))
    assert lib.run("conv1x1", np.zeros((0, 5, 4, 3), np.uint8)).shape == (0, 6, 4, 3)


def test_tampered_constants_are_refused(built, tmp_path):
    for f in built["dir"].iterdir():
        if f.is_file() and f.suffix in (".json", ".bin", ".cu"):
            shutil.copy(f, tmp_path / f.name)
    blob = bytearray((tmp_path / "qc_gpu_constants.bin").read_bytes())
    blob[0] ^= 1
    (tmp_path / "qc_gpu_constants.bin").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="qc_gpu_constants.bin: missing or not the file"):
        GpuLibrary(tmp_path / "qc_gpu.json", EmuDevice(built["so"]))


# ---------------------------------------------------------------------------------------------------- no GPU
def test_no_driver_is_one_clear_line(monkeypatch):
    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(gpu_rt.ctypes, "CDLL", no_lib)
    with pytest.raises(GpuUnavailableError) as err:
        CudaDevice(b"")
    assert "no CUDA driver (libcuda.so.1 not found)" in str(err.value) and "\n" not in str(err.value)


def test_no_device_is_one_clear_line(monkeypatch):
    class FakeDriver:  # libcuda present, no GPU: cuInit returns CUDA_ERROR_NO_DEVICE (100)
        def __getattr__(self, name):
            fn = (lambda *a: 100) if name == "cuInit" else (lambda *a: 0)
            fn.argtypes = None
            return fn
    monkeypatch.setattr(gpu_rt.ctypes, "CDLL", lambda *a, **k: FakeDriver())
    with pytest.raises(GpuUnavailableError, match="^no CUDA device: the gpu target needs an NVIDIA GPU"):
        CudaDevice(b"")


def test_this_machine_without_gpu_fails_cleanly():
    """Whatever this machine has, an empty module never loads: the error is a GpuUnavailableError line."""
    with pytest.raises(GpuUnavailableError) as err:
        CudaDevice(b"")
    assert "\n" not in str(err.value)


def test_missing_nvcc_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setattr(gpu_build.shutil, "which", lambda name: None)
    with pytest.raises(ToolchainError, match="nvcc not found: the gpu target needs the CUDA toolkit") as err:
        build_gpu_library(SPECS[:1], tmp_path)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("NVCC", "/no/such/nvcc")
    with pytest.raises(ToolchainError, match="NVCC='/no/such/nvcc' is not an executable"):
        gpu_build.nvcc_command()


# ---------------------------------------------------------------------------------------------------- nvcc
nvcc_needed = pytest.mark.skipif(not have_nvcc(), reason="nvcc (CUDA toolkit) not installed: the GPU kernels are "
                                                          "not compiled for sm_80/sm_90 here")


@nvcc_needed
def test_nvcc_compiles_every_kernel_for_sm80_sm90_with_b1_mma(built):
    out, _ = built["nvcc"].communicate(timeout=900)
    assert built["nvcc"].returncode == 0, out[-2000:]
    assert (built["dir"] / "qc_gpu.fatbin").stat().st_size > 0
    import json
    layers = json.loads(built["manifest"].read_text())["layers"]
    for arch in ARCHS:
        ptx = (built["dir"] / "ptx" / f"qc_gpu.compute_{arch}.ptx").read_text()
        bodies = {m.group(1): m.group(2) for m in
                  re.finditer(r"\.entry (\w+)\((.*?)(?=\.entry |\Z)", ptx, re.S)}
        for layer in layers:
            for role, name in layer["kernels"].items():
                assert name in bodies, f"{name} missing from the compute_{arch} PTX"
                if role == "mma":
                    body = bodies[name]
                    assert MMA in body and "cp.async.cg.shared.global" in body or "cp.async.ca.shared.global" in body
                    assert body.count(MMA) >= layer["bits_a"] * layer["bits_w"], name
                if role == "popc":
                    assert "popc.b32" in bodies[name] and MMA not in bodies[name]


@nvcc_needed
def test_build_gpu_library_default_target_has_sm75_sm80_sm90_and_ptx(tmp_path):
    spec = BY_NAME["gemm_xor_k65_threshold"]
    manifest = build_gpu_library([spec], tmp_path, archs=("80", "90"), keep_ptx_dir=tmp_path / "ptx")
    data = __import__("json").loads(manifest.read_text())
    assert data["fatbin"] == "qc_gpu.fatbin" and set(data["sha256"]) == {"qc_gpu.cu", "qc_gpu_constants.bin",
                                                                          "qc_gpu.fatbin"}
    assert sorted(p.name for p in (tmp_path / "ptx").glob("*.ptx")) == \
        ["qc_gpu.compute_75.ptx", "qc_gpu.compute_80.ptx", "qc_gpu.compute_90.ptx"]
    assert MMA not in (tmp_path / "ptx" / "qc_gpu.compute_75.ptx").read_text()  # sm_75: the __popc path only
    with pytest.raises(ToolchainError, match="nvcc broken.cu failed: .*error"):
        (tmp_path / "broken.cu").write_text("this is not C++\n")
        compile_fatbin(tmp_path / "broken.cu", tmp_path / "broken.fatbin", ("80",))
