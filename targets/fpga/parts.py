"""Device budgets of the FPGA parts the folding chooser knows: logic and memory from Xilinx's product tables, a default
clock that streaming dataflow designs of this kind usually close timing at on that family, and the full part name
the Vitis HLS Tcl script sets.

Sources: Zynq-7000 SoC product selection guide / DS190 (xc7z020: 53,200 LUT6, 106,400 FF, 140 BRAM36, 220 DSP48E1;
xc7z045: 218,600 LUT6, 437,200 FF, 545 BRAM36, 900 DSP48E1), Zynq UltraScale+ MPSoC product table / DS891 (xczu3eg,
xczu7ev), Alveo U250 data sheet DS962 (xcu250: 1,728k LUT6, 3,456k FF, 2,688 BRAM36, 1,280 UltraRAM, 12,288 DSP48E2).
Clocks: FINN's published builds (100 MHz on the PYNQ-Z1's xc7z020, 200 MHz on the ZC706 and ZCU104, 200 MHz on
Alveo shells); they are what the report's frames per second assume, not a timing result.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.errors import ConfigError

__all__ = ["Part", "PARTS", "get_part"]


@dataclass(frozen=True)
class Part:
    name: str          # short name: xc7z020
    full: str          # part string for set_part
    board: str
    lut: int
    ff: int
    bram18: int        # 18 Kb block RAMs (a BRAM36 is two)
    dsp: int
    clock_mhz: float

    def budget(self, utilization: float) -> dict:
        """The share of the part the accelerator may take (the rest: AXI/DMA infrastructure, routing slack)."""
        return {k: int(getattr(self, k) * utilization) for k in ("lut", "ff", "bram18", "dsp")}


PARTS = {p.name: p for p in (
    Part("xc7z020", "xc7z020clg400-1", "PYNQ-Z1 / Z2", 53_200, 106_400, 2 * 140, 220, 100.0),
    Part("xc7z045", "xc7z045ffg900-2", "ZC706", 218_600, 437_200, 2 * 545, 900, 200.0),
    Part("xczu3eg", "xczu3eg-sbva484-1-e", "Ultra96", 70_560, 141_120, 2 * 216, 360, 200.0),
    Part("xczu7ev", "xczu7ev-ffvc1156-2-e", "ZCU104", 230_400, 460_800, 2 * 312, 1_728, 200.0),
    Part("xcu250", "xcu250-figd2104-2L-e", "Alveo U250", 1_728_000, 3_456_000, 2 * 2_688, 12_288, 200.0),
)}


def get_part(name: str) -> Part:
    """A known part by its short name or a full part string that starts with it (xc7z020clg400-1)."""
    key = name.lower()
    for short, part in PARTS.items():
        if key == short or key == part.full.lower() or key.startswith(short):
            return part
    raise ConfigError(f"unknown FPGA part '{name}'; known: {', '.join(PARTS)}")
