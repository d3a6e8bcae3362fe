"""Compile generated kernels into a shared library with the system C compiler.

``build_library(specs, out_dir) -> Path`` writes ``<name>.c`` (the layers), ``<name>_core.c`` (the kernel core),
the weight blobs and ``<name>.json`` (the manifest) into ``out_dir`` and runs ``$CC`` (default ``cc``)::

    cc -O3 -fPIC -ffp-contract=off -pthread -fvisibility=hidden -c <name>_core.c   (cached, see below)
    cc -O3 -fPIC -ffp-contract=off -pthread -fvisibility=hidden -c <name>.c
    cc -shared -pthread -o <name>.so <name>_core.o <name>.o

The core is the same for every library (it takes a few seconds to compile: all paths x modes x tile shapes), so its
object is cached under ``$QCOMPILE_CACHE_DIR`` (default ``~/.cache/qcompile``), keyed by a hash of its source, the
compiler's identity and the flags. ``-ffp-contract=off`` is part of the contract: the float epilogue must not become
a fused multiply-add.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from pathlib import Path

from qcompile.errors import ToolchainError

from .caps import usable_cpus
from .codegen import core_source, generate
from .spec import LayerSpec

__all__ = ["CFLAGS", "compiler_command", "build_library", "prebuild_core", "simde_include_dir"]

CFLAGS = ("-O3", "-fPIC", "-ffp-contract=off", "-pthread", "-fvisibility=hidden", "-std=gnu11",
          "-Werror=implicit-function-declaration")
LDFLAGS = ("-shared", "-pthread")


def compiler_command() -> list[str]:
    """``$CC`` split like a shell would (``CC="ccache gcc"`` works), default ``cc``; ToolchainError if missing."""
    cc = os.environ.get("CC") or "cc"
    argv = shlex.split(cc)
    if not argv or shutil.which(argv[0]) is None:
        raise ToolchainError(f"C compiler {cc!r} not found; install gcc (apt-get install gcc) or set CC")
    return argv


def simde_include_dir() -> Path | None:
    """Where SIMDe's headers are (Debian: libsimde-dev), for ``emulate_avx512`` test builds; None if absent."""
    candidates = [p for p in os.environ.get("CPATH", "").split(":") if p]
    candidates += ["/usr/include", "/usr/local/include"]
    for d in candidates:
        if (Path(d) / "simde" / "x86" / "avx512.h").is_file():
            return Path(d)
    return None


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln
    return lines[0] if lines else "(no message)"


def _run(cmd: list[str], cwd: Path, timeout: float, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ToolchainError(f"C compiler {cmd[0]!r} not found; install gcc (apt-get install gcc) or set CC") from e
    except subprocess.TimeoutExpired as e:
        raise ToolchainError(f"C compiler timed out after {timeout:.0f} s on {what}") from e
    if proc.returncode != 0:
        raise ToolchainError(f"compiling {what} failed: {_first_error(proc.stderr)}")


def _cache_dir() -> Path | None:
    d = Path(os.environ.get("QCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "qcompile") / "cpu-core"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d if os.access(d, os.W_OK) else None


def _compiler_id(argv: list[str]) -> str:
    try:
        return subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


# core builds running now (cache key -> Future of the cached object), so a build that starts while prebuild_core()
# is compiling the same core waits for it instead of compiling it a second time
_inflight: dict[str, Future] = {}
_inflight_lock = threading.Lock()


def _core_key(argv: list[str], flags: list[str], source: str) -> str:
    return hashlib.sha256("\0".join([source, *argv, *flags, _compiler_id(argv)]).encode()).hexdigest()[:24]


def _core_cached(argv: list[str], flags: list[str], source: str) -> bool:
    cache = _cache_dir()
    return cache is not None and (cache / f"core-{_core_key(argv, flags, source)}.o").is_file()


def _core_object(argv: list[str], flags: list[str], source: str, out: Path, name: str, timeout: float,
                 wait_inflight: bool = True) -> Path:
    """The compiled kernel core: from the cache when an identical build exists (or is being built by
    prebuild_core), else compiled here (and cached)."""
    key = _core_key(argv, flags, source)
    cache = _cache_dir()
    cached = cache / f"core-{key}.o" if cache else None
    if cached is not None and cached.is_file():
        return cached
    with _inflight_lock:
        pending = _inflight.get(key) if wait_inflight else None
    if pending is not None:
        try:
            obj = pending.result()
            if obj.is_file():
                return obj
        except ToolchainError:
            pass  # compile it here: the error then belongs to this build
    c_file = out / f"{name}_core.c"
    if not c_file.is_file():
        c_file.write_text(source)
    obj = out / f"{name}_core.o"
    _run([*argv, *flags, "-c", "-o", obj.name, c_file.name], out, timeout, str(c_file))
    if cached is not None:
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".o")
        os.close(fd)
        shutil.copyfile(obj, tmp)
        os.replace(tmp, cached)  # atomic: concurrent builds never see half a file
        _prune(cache, keep=8)
        return cached
    return obj


def prebuild_core(*, timeout: float = 600.0) -> Future | None:
    """Start compiling the kernel core into the cache on a background thread, if it is not cached yet.

    The core does not depend on the model, so the compiler starts it before the quantization passes run and the
    ~6 s C build overlaps them. Returns the Future of the cached object, or None when there is nothing to do (no
    cache folder, no compiler: build_library reports that) or it is cached already."""
    cache = _cache_dir()
    try:
        argv = compiler_command()
    except ToolchainError:
        return None
    if cache is None:
        return None
    flags, source = list(CFLAGS), core_source()
    key = _core_key(argv, flags, source)
    if (cache / f"core-{key}.o").is_file():
        return None
    with _inflight_lock:
        if key in _inflight:
            return _inflight[key]
        fut: Future = Future()
        _inflight[key] = fut

    def work() -> None:
        # the scratch folder lives in the cache, so a process that exits mid-build leaves it where _prune finds it
        tmp = Path(tempfile.mkdtemp(prefix="prebuild-", dir=cache))
        try:
            fut.set_result(_core_object(argv, flags, source, tmp, "prebuild", timeout, wait_inflight=False))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Future
            fut.set_exception(exc)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with _inflight_lock:
                _inflight.pop(key, None)

    threading.Thread(target=work, name="qcompile-core-build", daemon=True).start()
    return fut


def _prune(cache: Path, keep: int) -> None:
    """Keep the ``keep`` most recently built core objects (other qcompile versions, compilers, flags)."""
    try:
        objs = sorted(cache.glob("core-*.o"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in objs[keep:]:
            old.unlink(missing_ok=True)
        for stale in cache.glob("prebuild-*"):  # left by a process that exited during prebuild_core
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    except OSError:
        pass


def build_library(
    specs: Sequence[LayerSpec],
    out_dir: str | os.PathLike,
    *,
    name: str = "qcompile_kernels",
    emulate_avx512: bool = False,
    layer_avx512: bool | None = None,
    extra_cflags: Sequence[str] = (),
    timeout: float = 600.0,
    lut: bool = True,
    recurrent: Sequence = (),
) -> Path:
    """Generate and compile one shared library with a ``qc_layer_*`` function per spec; returns the .so path.

    ``emulate_avx512`` (tests only) compiles the AVX-512 path on SIMDe's portable emulation so that its logic can be
    checked on a CPU without AVX-512; such a library reports the AVX-512 path as available everywhere.
    ``layer_avx512``: give BitGemm layers their own AVX-512 kernel too; default: when emulating, or when this CPU
    has AVX-512 VPOPCNTDQ (an artifact passes its target's capability).
    ``lut=False`` keeps every conv on popcounts (tests use it to check both kernels of the AVX2 path).
    ``recurrent``: quantized LSTM/GRU layers (targets.cpu.recurrent), each a ``qc_rnn_*`` time loop.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if layer_avx512 is None:
        from .caps import detect

        layer_avx512 = emulate_avx512 or detect().avx512_vpopcntdq
    lib = generate(list(specs), emulate_avx512=emulate_avx512, layer_avx512=layer_avx512, lut=lut,
                   recurrent=recurrent)
    argv = compiler_command()
    flags = list(CFLAGS) + list(extra_cflags)
    if emulate_avx512:
        inc = simde_include_dir()
        if inc is None:
            raise ToolchainError("emulate_avx512 needs SIMDe headers; install libsimde-dev (apt-get install libsimde-dev)")
        flags += [f"-I{inc}", "-Wno-psabi"]
    (out / f"{name}_core.c").write_text(lib.core_source)
    so_file = out / f"{name}.so"
    # one layer file per CPU when the core is cached; while the core compiles it takes a CPU, and splitting the
    # layers then cost more header parsing than it saved (bundled CNN, 2 CPUs: 7.7-8.1 s against 6.9 s cold)
    cpus = usable_cpus()
    sources = lib.sources(min(8, cpus if _core_cached(argv, flags, lib.core_source) else max(1, cpus - 1)))
    c_files = [out / (f"{name}.c" if i == 0 else f"{name}_{i}.c") for i in range(len(sources))]
    for c_file, text in zip(c_files, sources):
        c_file.write_text(text)
    for fname, data in lib.blobs.items():
        (out / fname).write_bytes(data)
    (out / f"{name}.json").write_text(json.dumps(lib.manifest, indent=1, sort_keys=True))
    objs = [c.with_suffix(".o") for c in c_files]
    # the core (when not cached) and the layer files compile side by side
    with ThreadPoolExecutor(max(2, min(len(c_files) + 1, cpus))) as pool:
        core = pool.submit(_core_object, argv, flags, lib.core_source, out, name, timeout)
        layers = [pool.submit(_run, [*argv, *flags, "-c", "-o", o.name, c.name], out, timeout, str(c))
                  for c, o in zip(c_files, objs)]
        core_obj = core.result()
        for job in layers:
            job.result()
    tmp = out / f".{name}.{os.getpid()}.so"
    try:
        _run([*argv, *LDFLAGS, "-o", tmp.name, str(core_obj), *(o.name for o in objs)], out, timeout,
             f"linking {so_file}")
    except ToolchainError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, so_file)  # atomic: a loaded older library is never overwritten in place
    return so_file
