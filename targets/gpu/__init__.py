"""GPU target: BitGemm / BitConv on tensor cores (b1 MMA m16n8k256, AND + popc) or CUDA cores (__popc), built with
nvcc into one fatbin, run through the CUDA driver API (qcompile.runtime.gpu); testable without a GPU through a host
emulation of the same CUDA source (templates/emu/cuda_emu.h). A threshold layer whose only reader is a bit layer
writes that reader's packed input from its epilogue (chain.py).

    from qcompile.targets.gpu import build_gpu_library
    manifest = build_gpu_library([LayerSpec(...), ...], "build/", archs=("80", "90"), chains={"fc1": "fc2"})
"""

from .build import build_emulation, build_gpu_library
from .caps import GpuCaps, detect

__all__ = ["build_gpu_library", "build_emulation", "GpuCaps", "detect"]
