"""What every benchmark script shares: the machine's name and load, and writing its own section of RESULTS.md."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def cpu_name() -> str:
    from qcompile.targets.cpu.caps import model_name

    return model_name()


def best_ms(fn, reps: int, settle_s: float = 0.0) -> float:
    """Best of ``reps`` timed calls of ``fn`` in ms, after one untimed call (and ``settle_s`` seconds of sleep first,
    so the previous engine's worker threads stop spinning)."""
    if settle_s:
        time.sleep(settle_s)
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def write_section(heading: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with `heading` (up to the next '## ') by `text`, or append it.

    Other scripts' sections are left as they are."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def publish(heading: str, text: str, write: bool, path: Path = RESULTS) -> None:
    """Print a script's section and, with --write, put it into RESULTS.md."""
    print()
    print(text)
    if write:
        write_section(heading, text, path)
        print(f"wrote {path}")
