"""Atomic output: build everything in a temporary sibling folder, then rename it into place."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qcompile.errors import QcompileError


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_dir(out: str | Path, protect: tuple[str | Path, ...] = ()):
    """Yield a temporary folder; on success it replaces `out` in one rename, on error nothing is left behind.

    `protect` lists input files that must never be overwritten or deleted (the input model)."""
    out = Path(out).resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == out or out in p.parents:
            raise QcompileError(f"{out}: output folder would overwrite the input {p}; choose another -o")
    if out.exists() and not out.is_dir():
        raise QcompileError(f"{out}: exists and is not a folder; choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
