#!/usr/bin/env python3
"""GPU benchmark of the bit kernels (issue 15): bit-exact check on the device, b1 MMA peak, GEMMs and a conv
against cuBLAS fp16 and int8, in one run. Writes gpu_results.md (+ .json) to --out ($OUT, or bench/).

    python bench/gpu_bench.py --out DIR [--quick] [--skip-check]
    python bench/gpu_bench.py --dry-run --out DIR     # no GPU: the same cases and table, with no numbers

Timing: CUDA events around back-to-back launches from Python (ctypes); for kernels of a few microseconds the
launch rate (~5-10 us per ctypes launch) bounds the result, for ours and cuBLAS's alike. cuBLAS comes from
libcublas through ctypes (cublasGemmEx, C = A B^T as "TN"); torch is not needed. MAC/s below are M*N*K per second;
"binary MAC/s" multiplies by bits_a*bits_w (what the tensor cores do).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BITS = {"W1A1": (1, 1), "W1A2": (2, 1), "W2A2": (2, 2)}     # name -> (bits_a, bits_w)
BIG = (8192, 8192, 8192)
SMALL_M = (1, 2, 4, 8, 16, 32, 64)
SMALL_KN = 4096
CONV = dict(batch=32, c=256, hw=28, n=256, k=3)            # ResNet-style 3x3, pad 1: GEMM 25088 x 256 x 2304


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench"), help="folder for the table")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: list the cases, write the table without numbers")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (M = 1, 16, 64) and repetitions")
    ap.add_argument("--skip-check", action="store_true", help="skip the bit-exact check on the device")
    ap.add_argument("--min-ms", type=float, default=30.0, help="time each case for at least this long")
    return ap.parse_args(argv)


def gemm_cases(quick: bool) -> list[dict]:
    cases = []
    for name in BITS:
        cases.append({"kind": "gemm", "bits": name, "M": BIG[0], "N": BIG[1], "K": BIG[2]})
        for m in ((1, 16, 64) if quick else SMALL_M):
            cases.append({"kind": "gemm", "bits": name, "M": m, "N": SMALL_KN, "K": SMALL_KN})
    for name in ("W1A1", "W1A2"):
        c = CONV
        cases.append({"kind": "conv", "bits": name, "M": c["batch"] * c["hw"] ** 2, "N": c["n"],
                      "K": c["c"] * c["k"] ** 2, "shape": f"{c['batch']}x{c['c']}x{c['hw']}x{c['hw']} -> "
                                                           f"{c['n']}, {c['k']}x{c['k']} pad 1"})
    return cases


# ---------------------------------------------------------------------------------------------------- table
def _fmt(v, unit=""):
    return "-" if v is None else (f"{v:,.1f}{unit}" if isinstance(v, float) else str(v))


def write_table(results: dict, out: str | Path) -> Path:
    """Markdown (gpu_results.md) and JSON (gpu_results.json) of a run; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# GPU bit kernels: {results.get('device', '?')}", "",
             f"Measured {results.get('when', '?')}; {results.get('note', '')}".rstrip("; "), ""]
    chk = results.get("check")
    if chk:
        lines += [f"Bit-exact check on the device: {chk['passed']}/{chk['total']} cases equal qcompile.reference"
                  + (f"; FAILED: {', '.join(chk['failed'][:10])}" if chk["failed"] else ""), ""]
    peak = results.get("peak") or {}
    lines += ["| peak (register-only loop) | T binary MAC/s |", "|---|---:|",
              f"| b1 MMA m16n8k256 AND+popc | {_fmt(peak.get('b1_mma_tmacs'))} |",
              f"| CUDA-core AND+__popc (with operand updates) | {_fmt(peak.get('popc_tmacs'))} |", ""]
    lines += ["| case | M | N | K | ours GEMM ms | ours pack+GEMM ms | ours T MAC/s | ours T binary MAC/s | "
              "% of b1 peak | cuBLAS fp16 ms | cuBLAS fp16 T MAC/s | cuBLAS int8 ms | cuBLAS int8 T MAC/s | "
              "x fp16 | x int8 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.get("cases", []):
        name = f"{r['kind']} {r['bits']}" + (f" ({r['shape']})" if r.get("shape") else "")
        macs = r["M"] * r["N"] * r["K"]

        def tmacs(ms):
            return None if ms is None else macs / (ms * 1e-3) / 1e12
        ours, f16, i8 = r.get("gemm_ms"), r.get("fp16_ms"), r.get("int8_ms")
        ba, bw = BITS[r["bits"]]
        binary = None if ours is None else tmacs(ours) * ba * bw
        pct = None if binary is None or not peak.get("b1_mma_tmacs") else 100 * binary / peak["b1_mma_tmacs"]
        lines.append(" | ".join([f"| {name}", str(r["M"]), str(r["N"]), str(r["K"]),
                                 _fmt(ours if ours is None else float(f"{ours:.4f}")),
                                 _fmt(r.get("pack_gemm_ms") if r.get("pack_gemm_ms") is None else
                                      float(f"{r['pack_gemm_ms']:.4f}")),
                                 _fmt(tmacs(ours)), _fmt(binary), _fmt(pct, "%"),
                                 _fmt(f16 if f16 is None else float(f"{f16:.4f}")), _fmt(tmacs(f16)),
                                 _fmt(i8 if i8 is None else float(f"{i8:.4f}")), _fmt(tmacs(i8)),
                                 _fmt(None if ours is None or f16 is None else f16 / ours),
                                 _fmt(None if ours is None or i8 is None else i8 / ours)]) + " |")
    if results.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in results["errors"]]]
    md = out / "gpu_results.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    return md


# ---------------------------------------------------------------------------------------------------- device
class Events:
    """CUDA events of the driver API: time back-to-back launches of ``fn`` for at least ``min_ms``."""

    def __init__(self, cu):
        self.cu = cu
        # CUDA 12.8+ headers map cuEventElapsedTime to _v2; older drivers only have the first
        self.elapsed = getattr(cu, "cuEventElapsedTime_v2", None) or cu.cuEventElapsedTime
        self.e0, self.e1 = ctypes.c_void_p(), ctypes.c_void_p()
        cu.cuEventCreate(ctypes.byref(self.e0), 0)
        cu.cuEventCreate(ctypes.byref(self.e1), 0)

    def time_ms(self, fn, min_ms: float) -> float:
        for _ in range(3):
            fn()
        self.cu.cuCtxSynchronize()
        reps = 1
        while True:
            self.cu.cuEventRecord(self.e0, None)
            for _ in range(reps):
                fn()
            self.cu.cuEventRecord(self.e1, None)
            self.cu.cuEventSynchronize(self.e1)
            ms = ctypes.c_float(0)
            self.elapsed(ctypes.byref(ms), self.e0, self.e1)
            if ms.value >= min_ms or reps >= 1 << 14:
                return ms.value / reps
            reps *= max(2, min(16, int(min_ms / max(ms.value, 1e-3))))


class Cublas:
    """cublasGemmEx through ctypes: fp16 (fp32 accumulate) and int8 (int32) GEMMs, C[M,N] = A[M,K] B[N,K]^T."""

    def __init__(self):
        path = os.environ.get("QCOMPILE_CUBLAS") or self._find()
        if not path:
            raise OSError("libcublas not found (set QCOMPILE_CUBLAS=/path/to/libcublas.so)")
        lt = sorted(glob.glob(str(Path(path).parent / "libcublasLt.so*")))
        if lt:
            ctypes.CDLL(lt[0], mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.handle = ctypes.c_void_p()
        rc = self.lib.cublasCreate_v2(ctypes.byref(self.handle))
        if rc:
            raise OSError(f"cublasCreate failed ({rc})")
        self.lib.cublasGemmEx.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int]
        self.path = path

    @staticmethod
    def _find() -> str | None:
        pats = ["/usr/local/cuda*/lib64/libcublas.so*", "/usr/local/cuda*/targets/*/lib/libcublas.so*",
                "/usr/lib/x86_64-linux-gnu/libcublas.so*", "/usr/lib/aarch64-linux-gnu/libcublas.so*"]
        pats += [str(Path(p) / "nvidia/cublas/lib/libcublas.so*") for p in sys.path if p]
        for d in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
            if d:
                pats.append(str(Path(d) / "libcublas.so*"))
        for pat in pats:
            hits = sorted(h for h in glob.glob(pat) if "Lt" not in Path(h).name)
            if hits:
                return hits[0]
        return ctypes.util.find_library("cublas")

    def gemm(self, kind: str, m: int, n: int, k: int, a: int, b: int, c: int) -> None:
        """``a``: [M, K], ``b``: [N, K] device pointers (row-major); ``c``: [M, N]."""
        if kind == "fp16":
            one, zero = ctypes.c_float(1), ctypes.c_float(0)
            types, compute = (2, 2, 2), 68          # CUDA_R_16F, CUBLAS_COMPUTE_32F
        else:
            one, zero = ctypes.c_int32(1), ctypes.c_int32(0)
            types, compute = (3, 3, 10), 72         # CUDA_R_8I x2 -> CUDA_R_32I, CUBLAS_COMPUTE_32I
        # column-major C^T [N, M] = B [N, K] . A^T: op(B) = T (lda = K), op(A) = N (ldb = K), ldc = N
        rc = self.lib.cublasGemmEx(self.handle, 1, 0, n, m, k, ctypes.addressof(one), b, types[0], k, a, types[1],
                                   k, ctypes.addressof(zero), c, types[2], n, compute, -1)
        if rc:
            raise OSError(f"cublasGemmEx {kind} {m}x{n}x{k} failed (status {rc})")


def device_check(arch: str, work: Path, log) -> dict:
    """The GPU target's test cases (tests/targets/gpu/gpu_cases.py) on this GPU, both paths, against the reference;
    then a compiled artifact of a small CNN through InferenceSession against the fake-quant model."""
    from qcompile.runtime.gpu import GpuLibrary
    from qcompile.targets.gpu.build import build_gpu_library
    from tests.targets.gpu.gpu_cases import gpu_specs, random_input, reference_output

    specs = gpu_specs()
    t0 = time.time()
    lib = GpuLibrary(build_gpu_library(specs, work / "check", archs=(arch,)))
    log(f"check library built in {time.time() - t0:.0f} s on {lib.device.name}")
    paths = ["mma", "popc"] if lib.device.cc >= (8, 0) else ["popc"]
    passed, failed = 0, []
    rng = np.random.default_rng(15)
    for path in paths:
        os.environ["QCOMPILE_GPU_PATH"] = path
        for spec in specs:
            for batch in (1, 3, 300 if spec.op == "gemm" else 4):
                x = random_input(spec, batch, rng)
                y, r = lib.run(spec.name, x), reference_output(spec, x)
                same = y.dtype == r.dtype and y.shape == r.shape and \
                    np.array_equal(y.view(np.uint32) if y.dtype == np.float32 else y,
                                   r.view(np.uint32) if r.dtype == np.float32 else r)
                passed += same
                if not same:
                    failed.append(f"{path}:{spec.name}:b{batch}")
    os.environ.pop("QCOMPILE_GPU_PATH", None)
    total = passed + len(failed)
    try:  # the whole flow: compile --target gpu:sm_XY, InferenceSession on the GPU == fake-quant onnxruntime
        import onnx
        from graphs import tiny_cnn, tiny_inputs
        from qcompile import api
        from qcompile.evaluate import predict
        from qcompile.runtime import InferenceSession

        onnx.save(tiny_cnn(), work / "tiny.onnx")
        for config in ("w1a1", "w1a2", "w2a2"):
            result = api.compile(work / "tiny.onnx", config=config, calib=tiny_inputs(64, 3), target=f"gpu:sm_{arch}")
            result.save(work / f"art_{config}")
            sess = InferenceSession(work / f"art_{config}")
            for batch in (1, 7, 256):
                x = tiny_inputs(batch, seed=batch)
                total += 1
                if np.array_equal(sess.run(None, {"input": x})[0], predict(result.model, x)):
                    passed += 1
                else:
                    failed.append(f"artifact:{config}:b{batch}")
    except Exception as exc:  # noqa: BLE001 - report, keep measuring
        total += 1
        failed.append(f"artifact flow: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    try:  # chains of bit layers: each threshold epilogue writes the next layer's packed planes (no pack kernel)
        import onnx
        sys.path.insert(0, str(REPO / "tests" / "targets" / "gpu"))
        from test_packed_chain import chain_cnn
        from qcompile import api
        from qcompile.evaluate import predict
        from qcompile.runtime import InferenceSession

        onnx.save(chain_cnn(), work / "chain.onnx")
        calib = np.random.default_rng(1).uniform(0, 1, (32, 3, 10, 10)).astype(np.float32)
        for config in ("w1a2", "w2a2"):
            result = api.compile(work / "chain.onnx", config=config, calib=calib, target=f"gpu:sm_{arch}")
            result.save(work / f"chain_{config}")
            for path in paths:
                os.environ["QCOMPILE_GPU_PATH"] = path
                sess = InferenceSession(work / f"chain_{config}")
                for batch in (1, 5, 256):
                    x = np.random.default_rng(batch).uniform(0, 1, (batch, 3, 10, 10)).astype(np.float32)
                    total += 1
                    if np.array_equal(sess.run(None, {"input": x})[0], predict(result.model, x)):
                        passed += 1
                    else:
                        failed.append(f"chain:{config}:{path}:b{batch}")
        os.environ.pop("QCOMPILE_GPU_PATH", None)
    except Exception as exc:  # noqa: BLE001 - report, keep measuring
        total += 1
        failed.append(f"chain flow: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    log(f"bit-exact check: {passed}/{total} passed" + (f"; failed: {failed[:10]}" if failed else ""))
    return {"passed": passed, "total": total, "failed": failed}


def measure_peak(mod, ev: Events, min_ms: float) -> dict:
    """Binary MAC/s of the register-only loops in templates/peak.cu (``mod``: a CudaDevice holding them)."""
    sms = ctypes.c_int(0)
    mod._cu.cuDeviceGetAttribute(ctypes.byref(sms), 16, mod._dev)   # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    out_ptr = mod.alloc(4 * 65536)
    res = {"sms": sms.value}
    for name, threads, per_iter in (("qc_peak_b1_mma", 128, 8 * 16 * 8 * 256 / 32),   # per thread
                                    ("qc_peak_popc", 256, 8 * 32)):
        if name == "qc_peak_b1_mma" and mod.cc < (8, 0):
            continue
        iters, blocks = (256 if "mma" in name else 4096), sms.value * 8   # ~50 ms and ~2 ms per launch on an H200
        arg_iters, arg_out = ctypes.c_int(iters), ctypes.c_uint64(out_ptr)
        params = (ctypes.c_void_p * 2)(ctypes.addressof(arg_iters), ctypes.addressof(arg_out))
        f = ctypes.c_void_p()
        mod._cu.cuModuleGetFunction(ctypes.byref(f), mod._module, name.encode())

        def launch():
            mod._cu.cuLaunchKernel(f, blocks, 1, 1, threads, 1, 1, 0, None, params, None)
        ms = ev.time_ms(launch, min_ms)
        macs = blocks * threads * iters * per_iter
        res["b1_mma_tmacs" if "mma" in name else "popc_tmacs"] = macs / (ms * 1e-3) / 1e12
    mod.free(out_ptr)
    return res


def run_cases(cases: list[dict], arch: str, work: Path, ev: Events, min_ms: float, log) -> tuple[list, list]:
    from qcompile.runtime.gpu import GpuLibrary
    from qcompile.targets.cpu import LayerSpec
    from qcompile.targets.gpu.build import build_gpu_library

    rng = np.random.default_rng(0)
    specs, seen = [], set()
    for case in cases:   # one layer per (kind, bits, N, K): the M sweep reuses it
        key = (case["kind"], case["bits"], case["N"], case["K"])
        case["layer"] = "_".join(map(str, key))
        if key in seen:
            continue
        seen.add(key)
        ba, bw = BITS[case["bits"]]
        if case["kind"] == "gemm":
            w = rng.integers(0, 1 << bw, (case["N"], case["K"]), dtype=np.uint8)
            specs.append(LayerSpec(case["layer"], "gemm", ba, bw, w, np.full(case["N"], (1 << bw) - 1, np.int32)))
        else:
            c = CONV
            w = rng.integers(0, 1 << bw, (c["n"], c["c"], c["k"], c["k"]), dtype=np.uint8)
            specs.append(LayerSpec(case["layer"], "conv", ba, bw, w, np.full(c["n"], (1 << bw) - 1, np.int32),
                                   in_shape=(c["c"], c["hw"], c["hw"]), pads=(1, 1, 1, 1)))
    t0 = time.time()
    lib = GpuLibrary(build_gpu_library(specs, work / "bench", archs=(arch,)))
    log(f"bench library ({len(specs)} layers) built in {time.time() - t0:.0f} s")
    errors = []
    try:
        blas = Cublas()
        log(f"cuBLAS: {blas.path}")
    except OSError as exc:
        blas = None
        errors.append(f"cuBLAS unavailable: {exc}")
    for case in cases:
        ba, _ = BITS[case["bits"]]
        spec_in = next(s for s in specs if s.name == case["layer"]).in_shape
        batch = case["M"] if case["kind"] == "gemm" else CONV["batch"]
        x = rng.integers(0, 1 << ba, (batch, *spec_in), dtype=np.uint8)
        xp = lib.upload(x)
        steps, _ = lib.launches(case["layer"], xp, batch)

        def run_all():
            for name, grid, block, args in steps:
                lib.device.launch(name, grid, block, args)
        gemm_step = steps[1]

        def run_gemm():
            lib.device.launch(*gemm_step)
        run_all()
        case["pack_gemm_ms"] = ev.time_ms(run_all, min_ms)
        case["gemm_ms"] = ev.time_ms(run_gemm, min_ms)
        lib.device.free(xp)
        if blas is not None:
            m, n, k = case["M"], case["N"], case["K"]
            for kind, size in (("fp16", 2), ("int8", 1)):
                bufs = [lib.device.alloc(size * m * k), lib.device.alloc(size * n * k), lib.device.alloc(4 * m * n)]
                for ptr, nbytes in zip(bufs[:2], (size * m * k, size * n * k)):
                    lib.device._cu.cuMemsetD8_v2(ptr, 0x3C, nbytes)
                try:
                    case[f"{kind}_ms"] = ev.time_ms(lambda: blas.gemm(kind, m, n, k, *bufs), min_ms)
                except OSError as exc:
                    errors.append(str(exc))
                for ptr in bufs:
                    lib.device.free(ptr)
        log(f"{case['kind']} {case['bits']} M={case['M']} N={case['N']} K={case['K']}: ours {case['gemm_ms']:.4f} ms"
            f" (with pack {case['pack_gemm_ms']:.4f}), fp16 {case.get('fp16_ms')}, int8 {case.get('int8_ms')}")
    return cases, errors


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = gemm_cases(args.quick)

    def log(msg):
        print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    results = {"when": time.strftime("%Y-%m-%d %H:%M"), "cases": cases, "errors": []}
    if args.dry_run:
        results.update(device="dry run (no GPU)", note="not measured: --dry-run lists the cases and writes the table")
        log(f"dry run: {len(cases)} cases")
        print(write_table(results, args.out))
        return 0
    work = Path(tempfile.mkdtemp(prefix="qc_gpu_bench_"))
    probe = _probe_device()
    arch = f"{probe[0]}{probe[1]}"
    results["device"] = f"{probe[2]} (sm_{arch})"
    results["note"] = ("CUDA events around back-to-back ctypes launches; small-M rows are launch-bound; "
                       "the conv is compared with cuBLAS on its im2col GEMM shape")
    log(f"device: {results['device']}")
    ok = True
    if not args.skip_check:
        results["check"] = device_check(arch, work, log)
        ok = not results["check"]["failed"]
    peak_dev = _open_for_events(arch, work)      # primary context + the peak kernels' module
    ev = Events(peak_dev._cu)
    try:
        results["peak"] = measure_peak(peak_dev, ev, args.min_ms)
        log(f"peak: {results['peak']}")
    except Exception as exc:  # noqa: BLE001
        results["errors"].append(f"peak: {type(exc).__name__}: {exc}")
    try:
        results["cases"], errs = run_cases(cases, arch, work, ev, args.min_ms, log)
        results["errors"] += errs
    except Exception as exc:  # noqa: BLE001
        results["errors"].append(f"cases: {type(exc).__name__}: {str(exc)[:300]}")
        ok = False
    md = write_table(results, args.out)
    print(md.read_text())
    return 0 if ok else 1


def _probe_device() -> tuple[int, int, str]:
    """(major, minor, name) of device 0 through the driver API, or GpuUnavailableError."""
    from qcompile.runtime.gpu import GpuUnavailableError

    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise GpuUnavailableError("no CUDA driver (libcuda.so.1 not found)") from None
    if cu.cuInit(0) != 0:
        raise GpuUnavailableError("cuInit failed: no CUDA device")
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    cu.cuDeviceGet(ctypes.byref(dev), 0)
    cu.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    name = ctypes.create_string_buffer(256)
    cu.cuDeviceGetName(name, 256, dev)
    return major.value, minor.value, name.value.decode(errors="replace")


def _open_for_events(arch: str, work: Path):
    """A CudaDevice (primary context) holding the peak kernels' module: its driver handle times everything."""
    from qcompile.runtime.gpu import CudaDevice
    from qcompile.targets.gpu.build import NVCC_FLAGS, TEMPLATES, nvcc_command

    cubin = work / "peak.cubin"
    subprocess.run([*nvcc_command(), *NVCC_FLAGS, "-cubin", f"-arch=sm_{arch}", f"-I{TEMPLATES}", "-o",
                    str(cubin), str(TEMPLATES / "peak.cu")], check=True, capture_output=True)
    return CudaDevice(cubin.read_bytes())


if __name__ == "__main__":
    sys.exit(main())
