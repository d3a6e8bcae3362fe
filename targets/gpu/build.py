"""Build the GPU kernels: nvcc -> one fatbin (SASS for each arch + PTX for later GPUs); g++ -> the emulation.

``build_gpu_library(specs, out_dir, archs, chains)`` writes into ``out_dir``::

    qc_gpu.cu             generated layers (templates/bitkernels.cuh does the work)
    qc_gpu.fatbin         nvcc --fatbin, sm_75 (CUDA-core path) + each arch's SASS + PTX of the newest
    qc_gpu_constants.bin  every layer's packed weights and epilogue arrays (256-byte aligned)
    qc_gpu.json           the manifest the runtime reads: layers, kernels, tiles, blob offsets, sha256 of the files

``build_emulation(out_dir)`` compiles the same ``qc_gpu.cu`` as host C++ through templates/emu/cuda_emu.h into
``qc_gpu_emu.so``, which the runtime can drive instead of a GPU (tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from qcompile.errors import ToolchainError
from qcompile.fileio import sha256_file
from qcompile.packing import round_up
from qcompile.targets.cpu.spec import LayerSpec

from .codegen import chain_layers, generate, pack_constants, plan

__all__ = ["TEMPLATES", "DEFAULT_ARCHS", "nvcc_command", "nvcc_flags", "build_gpu_library", "build_emulation",
           "compile_fatbin"]

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_ARCHS = ("80", "90")
NVCC_FLAGS = ("-std=c++17", "-O3", "--fmad=false", "-Xptxas=-O3")
MANIFEST = "qc_gpu.json"
SCHEMA = "qcompile.gpu-kernels"


def nvcc_command() -> list[str]:
    """``$NVCC`` (default ``nvcc``, then /usr/local/cuda/bin/nvcc) split like a shell; ToolchainError if missing."""
    cmd = os.environ.get("NVCC")
    if cmd:
        argv = shlex.split(cmd)
        if argv and shutil.which(argv[0]):
            return argv
        raise ToolchainError(f"NVCC={cmd!r} is not an executable; point it at the CUDA toolkit's nvcc")
    for candidate in ("nvcc", "/usr/local/cuda/bin/nvcc"):
        if shutil.which(candidate):
            return [candidate]
    raise ToolchainError("nvcc not found: the gpu target needs the CUDA toolkit (12.0 or newer) to build its "
                         "kernels; install it (NVIDIA's cuda-toolkit package, or apt-get install "
                         "nvidia-cuda-toolkit) or set NVCC=/path/to/nvcc")


def nvcc_flags(archs: Sequence[str], *, sm75: bool = True) -> list[str]:
    """-gencode for the CUDA-core path on sm_75, SASS for each arch, and PTX of the newest for later GPUs."""
    archs = sorted({str(a) for a in archs}, key=int)
    flags = ["-gencode", "arch=compute_75,code=sm_75"] if sm75 and "75" not in archs else []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _run(argv: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    except OSError as exc:
        raise ToolchainError(f"{what}: cannot run {argv[0]} ({exc})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "error" in ln.lower()] or \
            (proc.stderr + proc.stdout).strip().splitlines() or ["(no output)"]
        raise ToolchainError(f"{what} failed: {lines[0].strip()[:300]}")


def compile_fatbin(source: Path, out: Path, archs: Sequence[str], *, keep_ptx_dir: Path | None = None) -> Path:
    """nvcc --fatbin ``source`` -> ``out``; with ``keep_ptx_dir`` the intermediate PTX files stay there."""
    argv = [*nvcc_command(), *NVCC_FLAGS, "--fatbin", f"-I{TEMPLATES}", *nvcc_flags(archs), "-o", str(out),
            str(source)]
    if keep_ptx_dir is not None:
        keep_ptx_dir.mkdir(parents=True, exist_ok=True)
        argv[1:1] = ["-keep", f"-keep-dir={keep_ptx_dir}"]
    _run(argv, f"nvcc {source.name}")
    return out


def build_gpu_library(specs: Sequence[LayerSpec], out_dir: str | Path, archs: Sequence[str] = DEFAULT_ARCHS, *,
                      chains: Mapping[str, str] | None = None, nvcc: bool = True,
                      keep_ptx_dir: Path | None = None) -> Path:
    """Generate, pack and (with ``nvcc``) compile; returns the manifest's path. ``chains`` maps a threshold layer to
    the bit layer that reads its codes: the producer also gets kernels writing the consumer's packed input
    (codegen.chain_layers; ValueError when the two cannot chain). ``nvcc=False`` writes everything but the fatbin
    (an emulation-only build)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")
    layers = [plan(s, i) for i, s in enumerate(specs)]
    by_name = {layer.spec.name: layer for layer in layers}
    for producer, consumer in (chains or {}).items():
        chain_layers(by_name[producer], by_name[consumer])
    source = out / "qc_gpu.cu"
    source.write_text(generate(layers))
    blob = bytearray()
    entries = []
    for spec, layer in zip(specs, layers):
        data = pack_constants(spec, layer)
        blob += b"\0" * (round_up(len(blob), 256) - len(blob))
        entry = layer.manifest()
        entry["blob_offset"], entry["blob_bytes"] = len(blob), len(data)
        blob += data
        entries.append(entry)
    (out / "qc_gpu_constants.bin").write_bytes(bytes(blob))
    manifest = {"schema": SCHEMA, "version": 1, "archs": sorted({str(a) for a in archs}, key=int),
                "source": source.name, "constants": "qc_gpu_constants.bin", "fatbin": None, "layers": entries}
    if nvcc:
        fatbin = compile_fatbin(source, out / "qc_gpu.fatbin", archs, keep_ptx_dir=keep_ptx_dir)
        manifest["fatbin"] = fatbin.name
    manifest["sha256"] = {name: sha256_file(out / name) for name in
                          [manifest["source"], manifest["constants"]] + ([manifest["fatbin"]] if nvcc else [])}
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


def build_emulation(out_dir: str | Path, *, cxx: str | None = None) -> Path:
    """Compile ``qc_gpu.cu`` of a built library as host C++ (templates/emu/cuda_emu.h) into qc_gpu_emu.so, with
    ``qc_emu_launch(name, grid, block, params)``: cuLaunchKernel's arguments, run on the CPU."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    names = [k for layer in manifest["layers"] for k in layer["kernels"].values()]
    cases = "".join(f'    if (!std::strcmp(name, "{n}")) {{ qc_emu::launch([&] {{ {n}(a); }}, grid, block); '
                    f"return 0; }}\n" for n in names)
    main = out / "qc_gpu_emu.cpp"
    main.write_text(
        "// generated: the GPU kernels as host C++, launched by name like cuLaunchKernel\n"
        '#include "emu/cuda_emu.h"\n'
        f'#include "{manifest["source"]}"\n\n'
        'extern "C" int qc_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,\n'
        "                             unsigned by, unsigned bz, void** params) {\n"
        "    const QcArgs a = *static_cast<const QcArgs*>(params[0]);\n"
        "    const dim3 grid(gx, gy, gz), block(bx, by, bz);\n"
        f"{cases}    return 1;\n}}\n")
    digest = hashlib.sha256(main.read_bytes() + (out / manifest["source"]).read_bytes())
    for header in sorted(TEMPLATES.rglob("*.*h")):
        digest.update(header.read_bytes())
    so = out / "qc_gpu_emu.so"
    stamp = out / "qc_gpu_emu.sha256"
    if so.is_file() and stamp.is_file() and stamp.read_text() == digest.hexdigest():
        return so
    compiler = shlex.split(cxx or os.environ.get("CXX") or "g++")
    if not shutil.which(compiler[0]):
        raise ToolchainError(f"C++ compiler {compiler[0]!r} not found; install g++ (apt-get install g++) or set CXX")
    _run([*compiler, "-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-Wno-unknown-pragmas",
          "-DQC_EMU=1", f"-I{TEMPLATES}", f"-I{out}", "-o", str(so), str(main)], f"g++ {main.name}")
    stamp.write_text(digest.hexdigest())
    return so
