"""What this CPU has for bit kernels, as plain data the planner reads and the report prints.

``detect()`` reads /proc/cpuinfo (flags, MHz) and sysfs (L1d size); ``variant("cpu:avx2")`` etc. give the named
targets: "cpu" (everything detected), "cpu:avx2" (AVX-512 masked off), "cpu:generic" (portable popcount only).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuCaps", "VARIANTS", "detect", "variant", "parse_cpuinfo", "model_name", "usable_cpus"]

VARIANTS = ("cpu", "cpu:avx2", "cpu:generic")


@dataclass(frozen=True)
class CpuCaps:
    name: str                 # "cpu", "cpu:avx2" or "cpu:generic"
    path: str                 # kernel path the generated code takes here: "avx512", "avx2" or "generic"
    popcount_bits: int        # 512 with AVX-512 VPOPCNTDQ, 256 with AVX2 (vpshufb LUT), 64 scalar
    avx512_vpopcntdq: bool
    avx2: bool
    int8_dot: str | None      # "amx", "vnni" or None: what an int8 GEMM (e.g. onnxruntime) gets here
    cores: int
    l1d_bytes: int
    ghz: float
    float_peak_gflops: float  # rough fp32 FMA peak, all cores (an estimate, for the planner only)

    @property
    def env_path(self) -> str:
        """The QCOMPILE_CPU_PATH value that forces this variant's path."""
        return self.path


def parse_cpuinfo(text: str) -> tuple[set[str], float]:
    flags: set[str] = set()
    mhz = 0.0
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(val.split())
        elif key == "cpu MHz" and not mhz:
            try:
                mhz = float(val)
            except ValueError:
                pass
    return flags, mhz


def _l1d_bytes() -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() == "1" and (idx / "type").read_text().strip() == "Data":
                size = (idx / "size").read_text().strip().upper()
                mult = {"K": 1024, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 32 * 1024


def _caps(name: str, flags: set[str], mhz: float, cores: int, l1d: int) -> CpuCaps:
    avx512 = {"avx512f", "avx512bw", "avx512_vpopcntdq"} <= flags and name == "cpu"
    avx2 = "avx2" in flags and "popcnt" in flags and name != "cpu:generic"
    path = "avx512" if avx512 else "avx2" if avx2 else "generic"
    int8 = "amx" if {"amx_int8", "amx_tile"} <= flags else "vnni" if flags & {"avx512_vnni", "avx_vnni"} else None
    ghz = mhz / 1000 if mhz else 2.0
    fma_flops = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # fp32 flop/cycle/core, 2 FMA pipes
    return CpuCaps(name=name, path=path, popcount_bits={"avx512": 512, "avx2": 256, "generic": 64}[path],
                   avx512_vpopcntdq=avx512, avx2=avx2, int8_dot=int8, cores=cores, l1d_bytes=l1d, ghz=ghz,
                   float_peak_gflops=fma_flops * ghz * cores)


def detect(name: str = "cpu", cpuinfo: str | None = None) -> CpuCaps:
    """Capabilities of this machine (or of the given /proc/cpuinfo text) under variant ``name``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU target {name!r}; choose one of {', '.join(VARIANTS)}")
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags, mhz = parse_cpuinfo(cpuinfo)
    return _caps(name, flags, mhz, usable_cpus(), _l1d_bytes())


def variant(name: str) -> CpuCaps:
    """The named target on this machine: "cpu", "cpu:avx2" or "cpu:generic"."""
    return detect(name)


def model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (recorded next to every measured figure)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def usable_cpus() -> int:
    """The CPUs this process may run on (a ``taskset`` counts, unlike ``os.cpu_count``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def with_cores(caps: CpuCaps, cores: int) -> CpuCaps:
    return dataclasses.replace(caps, cores=cores, float_peak_gflops=caps.float_peak_gflops / caps.cores * cores)
