"""A node's shared-memory segment: one named file in /dev/shm, mapped by every local rank.

Life cycle (HFReduce's use):
1. the local leader sweeps stale segments (:func:`sweep_stale`), then creates ``qcompile_hfr_<job>_n<node>_p<pid>``
   (``O_CREAT | O_EXCL``, mode 0600) and maps it;
2. the other local ranks open and map it by name;
3. once every local rank has it mapped, the leader removes the name (:meth:`NodeSegment.unlink`). From then on
   the memory lives exactly as long as some process maps it: a crash, even SIGKILL, cannot leak it.

Before step 3 the name is removed on every exit path this process can see: :meth:`NodeSegment.close`, the context
manager (exceptions), ``atexit``, and SIGTERM/SIGINT handlers that remove the names and then hand the signal to the
handler that was there before (the default one ends the process by that signal). Only SIGKILL or a power cut
inside the short window of steps 1-2 can leave a name behind; :func:`sweep_stale` removes those, by job id or
because the creator's pid is gone.

No torch here: the mapping is an ``mmap``; callers make tensor or numpy views of :attr:`NodeSegment.buf`.
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import signal
import threading
import time
from pathlib import Path

PREFIX = "qcompile_hfr_"
SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(rf"^{PREFIX}(?P<job>[A-Za-z0-9]+)_n(?P<node>\d+)_p(?P<pid>\d+)$")


def segment_name(job: str, node: int, pid: int | None = None) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", job):
        raise ValueError(f"job id {job!r}: letters and digits only")
    return f"{PREFIX}{job}_n{node}_p{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped by its parent) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except OSError:  # no /proc: ask the kernel (a zombie then counts as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in (b"Z", b"X", b"x")


def sweep_stale(job: str | None = None, shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove HFReduce segment names left behind: every name of `job`, or (job None) those whose creator is dead.

    Returns the names removed. Names of live creators of other jobs are left alone."""
    removed = []
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in entries:
        m = _NAME_RE.match(name)
        if not m:
            continue
        if (job is not None and m["job"] == job) or (job is None and not pid_alive(int(m["pid"]))):
            try:
                os.unlink(shm_dir / name)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


class NodeSegment:
    """One mapped shared-memory segment. Create with :meth:`create` (leader) or :meth:`open` (other ranks)."""

    def __init__(self, name: str, path: Path, buf: mmap.mmap, creator: bool):
        self.name, self.path, self.buf, self.creator = name, path, buf, creator
        self.size = len(buf)
        self._named = True  # our view of it: the name may still exist
        _register(self)

    @classmethod
    def create(cls, name: str, size: int, shm_dir: Path = SHM_DIR) -> "NodeSegment":
        path = Path(shm_dir) / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            _unlink_path(path)
            raise
        os.close(fd)
        return cls(name, path, buf, creator=True)

    @classmethod
    def open(cls, name: str, size: int | None = None, timeout_s: float = 10.0,
             shm_dir: Path = SHM_DIR) -> "NodeSegment":
        """Map an existing segment, waiting up to timeout_s for its creator to make it (and size it)."""
        path = Path(shm_dir) / name
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    actual = os.fstat(fd).st_size
                    if actual and (size is None or actual == size):
                        buf = mmap.mmap(fd, actual)
                        return cls(name, path, buf, creator=False)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"shared-memory segment {path} did not appear (size {size}) within {timeout_s:g} s")
            time.sleep(0.005)

    def unlink(self) -> None:
        """Remove the name (idempotent). Mappings stay valid; the memory goes with the last one."""
        if self._named:
            self._named = False
            _unlink_path(self.path)
            _LIVE.pop(id(self), None)

    def close(self) -> None:
        """Remove the name and drop this process's mapping (left to process exit while views still use it)."""
        self.unlink()
        try:
            self.buf.close()
        except BufferError:  # numpy/torch views still export the buffer: it unmaps when they go
            pass

    def __enter__(self) -> "NodeSegment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NodeSegment({self.name!r}, {self.size} bytes, {'creator' if self.creator else 'opened'})"


# ---- exit paths -----------------------------------------------------------------------------------------------------
_LIVE: dict[int, NodeSegment] = {}
_LOCK = threading.Lock()
_INSTALLED = False
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _unlink_path(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unlink_all() -> None:
    """Remove the name of every segment this process still holds a name for (atexit and signal handlers)."""
    for seg in list(_LIVE.values()):
        seg._named = False
        _unlink_path(seg.path)
    _LIVE.clear()


def _register(seg: NodeSegment) -> None:
    global _INSTALLED
    with _LOCK:
        _LIVE[id(seg)] = seg
        if _INSTALLED:
            return
        _INSTALLED = True
        atexit.register(unlink_all)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still covers normal exits
        for sig in _SIGNALS:
            try:
                previous = signal.getsignal(sig)
                signal.signal(sig, _make_handler(sig, previous))
            except (ValueError, OSError):
                pass


def _make_handler(sig: int, previous):
    def handler(signum, frame):
        unlink_all()
        if callable(previous):
            return previous(signum, frame)
        if previous == signal.SIG_IGN:
            return None
        signal.signal(signum, signal.SIG_DFL)  # the default action: end the process by this signal
        os.kill(os.getpid(), signum)
        return None

    return handler
