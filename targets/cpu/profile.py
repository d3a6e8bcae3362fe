"""This machine's measured speeds, for the planner's cost model: one micro-benchmark per CPU, cached.

The planner's design constants (popcount bits per cycle, int8 and fp32 MACs per cycle, an efficiency guess) are
right to a factor of two or three across CPUs; a choice between kernels that are within that factor of each other
needs the machine's own numbers. :func:`machine_profile` times a few probe layers once, on every candidate kernel
(the built bit kernel, onnxruntime int8, onnxruntime fp32, as ``planner.measure`` times a real layer), at two
batch sizes, and fits each candidate as ``time = per-call cost + work / rate``:

    work = M*N*K * bits_a * bits_w     popcount bit kernels (one AND+popcount bit per plane pair)
    work = M*N*K * bits_w              lookup-table bit kernels (one lookup per 4 channels covers any code width)
    work = M*N*K                       onnxruntime int8 and fp32

The result is cached under ``$QCOMPILE_CACHE_DIR/machine/`` (default ``~/.cache/qcompile``), keyed by the CPU's
name, the kernel path, the usable cores, onnxruntime's version and a hash of the kernel sources, so it is measured
once per machine (a few seconds) and again only when one of those changes. ``QCOMPILE_PLANNER=design`` makes the
planner use the design constants instead (plans that do not depend on the machine's load when it was measured).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .caps import CpuCaps, model_name
from .spec import LayerSpec

__all__ = ["MachineProfile", "machine_profile", "cpu_path", "measure_profile", "probe_specs", "rate_key", "profile_path"]

PROFILE_VERSION = 1
PROBE_BATCHES = (1, 16)


def rate_key(spec, kind: str, sums: str) -> str:
    """The profile entry a layer's candidate is costed by: e.g. "bit:conv:lut", "int8:gemm", "float:conv"."""
    return f"bit:{spec.op}:{sums}" if kind == "bitserial" else f"{kind}:{spec.op}"


def work_units(spec, kind: str, sums: str, macs: int) -> float:
    if kind != "bitserial":
        return float(macs)
    return float(macs) * spec.bits_w * (1 if sums == "lut" else spec.bits_a)


@dataclass
class MachineProfile:
    """Fitted per-call cost (ms) and rate (work units per second) of each candidate kind on this machine."""

    key: dict
    call_ms: dict[str, float] = field(default_factory=dict)
    rate: dict[str, float] = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)   # the raw timings the fit came from (shown by `qcompile machine`)

    def predict_ms(self, key: str, work: float) -> float | None:
        if key not in self.rate:
            return None
        return self.call_ms[key] + work / self.rate[key] * 1e3

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MachineProfile":
        return cls(d["key"], dict(d["call_ms"]), dict(d["rate"]), list(d.get("probes", [])))


def _kernel_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((Path(__file__).parent / "templates").glob("*")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def profile_key(caps: CpuCaps) -> dict:
    import onnxruntime

    return {"version": PROFILE_VERSION, "cpu": model_name(), "path": caps.path, "cores": caps.cores,
            "onnxruntime": onnxruntime.__version__, "kernels": _kernel_hash()}


def profile_path(caps: CpuCaps) -> Path:
    key = profile_key(caps)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get("QCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "qcompile") / "machine"
    return root / f"{caps.path}-{caps.cores}c-{digest}.json"


def probe_specs() -> list[LayerSpec]:
    """Layers of the sizes the bundled and typical small models have: a W1A1 BitGemm, a W1A2 3x3 conv (a lookup
    conv on x86), a W1A1 XOR conv (popcounts on every path)."""
    rng = np.random.default_rng(0)

    def conv(name, c, n, bits_a, xor):
        return LayerSpec(name, "conv", bits_a, 1, rng.integers(0, 2, (n, c, 3, 3), dtype=np.uint8),
                         np.ones(n, np.int32), in_shape=(c, 14, 14), pads=(1, 1, 1, 1), xor_mode=xor)

    return [LayerSpec("probe_gemm", "gemm", 1, 1, rng.integers(0, 2, (512, 512), dtype=np.uint8), np.ones(512, np.int32)),
            conv("probe_conv_lut", 64, 64, 2, False),
            conv("probe_conv_popcount", 64, 64, 1, True)]


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(per-call ms, units/s) through (work, ms) points, a least-squares line with both terms >= 0."""
    w = np.array([p[0] for p in points])
    t = np.array([p[1] for p in points])
    slope, icpt = np.polyfit(w, t, 1) if len(set(w)) > 1 else (t.mean() / w.mean(), 0.0)
    if slope <= 0:                       # noise: the larger probe was not slower; all of it is rate
        slope, icpt = float(t.max() / w.max()), 0.0
    if icpt < 0:
        icpt = 0.0
        slope = float((w * t).sum() / (w * w).sum())
    return float(icpt), float(1e3 / slope)


def measure_profile(caps: CpuCaps, log=None) -> MachineProfile:
    """Time the probe layers on every candidate at PROBE_BATCHES and fit the profile (a few seconds)."""
    from qcompile import planner
    from qcompile.runtime.kernels import Library

    from .build import build_library

    specs = probe_specs()
    points: dict[str, list[tuple[float, float]]] = {}
    probes = []
    with cpu_path(caps.path), tempfile.TemporaryDirectory(prefix="qcompile-profile-") as tmp:
        lib = Library(build_library(specs, tmp, layer_avx512=caps.avx512_vpopcntdq))
        for batch in PROBE_BATCHES:
            if log:
                log(f"timing probe layers at batch {batch}")
            times = planner.measure(specs, lib, batch)
            for spec in specs:
                sums = "lut" if planner.lut_kernel(spec, caps) else "popcount"
                macs = int(np.prod(planner.layer_macs(spec, batch), dtype=np.int64))
                for kind, ms in times[spec.name].items():
                    key = rate_key(spec, kind, sums)
                    points.setdefault(key, []).append((work_units(spec, kind, sums, macs), ms))
                    probes.append({"layer": spec.name, "batch": batch, "candidate": key, "ms": round(ms, 5)})
    prof = MachineProfile(profile_key(caps), probes=probes)
    for key, pts in points.items():
        prof.call_ms[key], prof.rate[key] = _fit(pts)
    return prof


@contextlib.contextmanager
def cpu_path(path: str):
    """Kernel calls inside take ``path`` (QCOMPILE_CPU_PATH, read by the library at every call): a cpu:avx2 target
    is timed on its own path on an AVX-512 machine."""
    old = os.environ.get("QCOMPILE_CPU_PATH")
    os.environ["QCOMPILE_CPU_PATH"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QCOMPILE_CPU_PATH", None)
        else:
            os.environ["QCOMPILE_CPU_PATH"] = old


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


_memo: dict[str, MachineProfile] = {}


def machine_profile(caps: CpuCaps, *, refresh: bool = False, log=None) -> MachineProfile | None:
    """This machine's profile for ``caps``: from the cache, else measured now and cached. None with
    QCOMPILE_PLANNER=design, or when the probe cannot be built here (no C compiler: the planner then uses its
    design constants, and the compile fails later with the compiler's own message)."""
    if os.environ.get("QCOMPILE_PLANNER", "").lower() == "design":
        return None
    path = profile_path(caps)
    if not refresh and str(path) in _memo:
        return _memo[str(path)]
    prof = None
    if not refresh and path.is_file():
        try:
            prof = MachineProfile.from_json(json.loads(path.read_text()))
            if prof.key != profile_key(caps):
                prof = None
        except (OSError, ValueError, KeyError, TypeError):
            prof = None                    # a damaged cache file is measured again
    if prof is None:
        from qcompile.errors import QcompileError

        say = log or (lambda m: print(f"qcompile: {m}", file=sys.stderr))
        say(f"calibrating the planner for this CPU ({model_name()}, {caps.path}, {caps.cores} cores); "
            f"one time, cached in {path.parent}")
        try:
            prof = measure_profile(caps)
        except (QcompileError, OSError) as e:
            say(f"planner calibration skipped ({str(e).splitlines()[0]}); using the design constants")
            return None
        _atomic_write_json(path, prof.to_json())
    _memo[str(path)] = prof
    return prof
