"""CPU target: bit-plane GEMM/conv kernels generated as C (AVX-512 VPOPCNTDQ, AVX2, portable) and built with cc.

    from qcompile.targets.cpu import LayerSpec, build_library
    so = build_library([LayerSpec(...), ...], "build/")
    qcompile.runtime.kernels.Library(so).run("fc1", x)
"""

from .build import build_library
from .caps import VARIANTS, CpuCaps, detect, variant
from .codegen import generate
from .spec import LayerSpec

__all__ = ["LayerSpec", "build_library", "generate", "CpuCaps", "detect", "variant", "VARIANTS"]
