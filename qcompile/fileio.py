"""Files: atomic output (build everything in a temporary sibling folder, then rename it into place), digests, and
the .npy inputs the CLI's --input options name."""

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


def read_input_files(items, names: list[str]) -> dict:
    """--input [NAME=]FILE.npy items -> feeds for a model whose inputs are `names`; NAME may be left out when the
    model has one input."""
    import numpy as np

    feeds = {}
    for item in items:
        name, _, path = item.rpartition("=")
        name = name or (names[0] if len(names) == 1 else "")
        if not name:
            raise QcompileError(f"--input {item}: this model has inputs {names}; write NAME=FILE.npy")
        try:
            feeds[name] = np.load(path)
        except (OSError, ValueError) as exc:
            raise QcompileError(f"{path}: cannot read the .npy file ({exc})") from None
    return feeds
