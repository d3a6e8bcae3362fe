"""What the GPU target offers: which architectures the fatbin carries, and the kernels it has."""

from __future__ import annotations

from dataclasses import dataclass, field

from qcompile.errors import ConfigError

TARGETS = ("gpu", "gpu:sm_80", "gpu:sm_90")


@dataclass
class GpuCaps:
    """``archs``: SASS in the fatbin (PTX of the newest rides along for later GPUs; sm_75 SASS for the CUDA-core
    path always does). b1 MMA m16n8k256 (AND + popc) on sm_80 and newer; __popc on CUDA cores below."""

    name: str = "gpu"
    archs: tuple[str, ...] = ("80", "90")
    b1_mma: str = "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc (sm_80+)"
    popcount: str = "__popc on CUDA cores (sm_75, or QCOMPILE_GPU_PATH=popc)"
    kernels: list = field(default_factory=lambda: ["bitserial"])
    path: str = "gpu"


def detect(name: str = "gpu") -> GpuCaps:
    """Caps for a target name: ``gpu`` (sm_80 + sm_90) or ``gpu:sm_XY`` (that arch only)."""
    if name == "gpu":
        return GpuCaps()
    if name.startswith("gpu:sm_") and name[7:].isdigit() and int(name[7:]) >= 75:
        return GpuCaps(name=name, archs=(name[7:],))
    raise ConfigError(f"unknown gpu target '{name}'; use gpu or gpu:sm_<arch> (e.g. gpu:sm_90)")
