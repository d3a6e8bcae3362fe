"""What every target offers the compiler: its capabilities (plain data) and a way to build kernels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Caps(Protocol):
    """A target's capabilities: the planner reads them, the report prints them (e.g. targets.cpu.caps.CpuCaps)."""

    name: str


@runtime_checkable
class Target(Protocol):
    name: str
    caps: Caps

    def build(self, specs: Sequence[Any], out_dir: str | Path) -> Path:
        """Generate and compile kernels for ``specs`` into ``out_dir``; return the built library."""
        ...
