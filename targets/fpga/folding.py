"""Choose PE x SIMD per layer for a frame rate on a device budget, FINN-style: the slowest stage sets the frame rate,
so every layer gets the cheapest folding that keeps up with the target, and the target relaxes only when the cheapest
balanced design does not fit the budget.

The MVAU's cycles and resources are targets/fpga/estimate.py's (the RTL MVAU's, calibrated on Verilator and yosys);
the other stages of a layer (input quantizer, sliding window, pool, width converter, float epilogue) add the
uncalibrated estimates below. Each stage moves one word per cycle, so a layer's initiation interval is its slowest
stage's words per frame; its latency is counted as the sum of its stages' cycles (an upper bound: stages overlap).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from qcompile.errors import ConfigError

from . import estimate
from .parts import Part, get_part

__all__ = ["FoldingError", "LayerFold", "FoldingPlan", "choose_folding", "evaluate_folding", "candidates",
           "DEFAULT_UTILIZATION"]

# Share of the part the accelerator may use (the rest: the AXI DMA / host interface, routing slack).
DEFAULT_UTILIZATION = 0.7
RESOURCES = ("lut", "ff", "bram18", "dsp")
# Uncalibrated per-stage costs (Vivado-typical for 7-series; the HLS csynth report is authoritative):
_LUT_PER_FLOAT_COMPARE = 24       # the input quantizer: a 32-bit float compare
_LUT_PER_FLOAT_EPILOGUE, _DSP_PER_FLOAT_EPILOGUE = 400, 5  # int->float, fmul (3 DSP), fadd (2 DSP) per PE
_LUT_STAGE_CONTROL = 40           # counters and stream handshakes of a non-MVAU stage
_LUTRAM_DEPTH = 64                # one LUT6 holds 64 x 1 bit of distributed RAM


class FoldingError(ConfigError):
    """A layer (or the chain) cannot fit the device budget at any folding."""


@dataclass
class LayerFold:
    name: str
    op: str
    K: int
    N: int
    rows: int
    pe: int
    simd: int
    cycles: int          # initiation interval of the layer (its slowest stage), cycles per frame
    latency: int         # cycles from its first input to its last output for one frame (upper bound)
    mvau_cycles: int     # estimate.mvau_cycles (with the pipeline fill)
    res: dict = field(default_factory=dict)   # lut, ff, bram18, dsp: MVAU + the layer's other stages
    mvau_res: dict = field(default_factory=dict)


@dataclass
class FoldingPlan:
    part: Part
    clock_mhz: float
    target_fps: float | None
    utilization: float
    layers: list
    notes: list = field(default_factory=list)

    @property
    def foldings(self) -> dict:
        return {lay.name: (lay.pe, lay.simd) for lay in self.layers if lay.op != "maxpool"}

    @property
    def budget(self) -> dict:
        return self.part.budget(self.utilization)

    @property
    def cycles_per_frame(self) -> int:
        return max(lay.cycles for lay in self.layers)

    @property
    def bottleneck(self) -> str:
        return max(self.layers, key=lambda lay: lay.cycles).name

    @property
    def fps(self) -> float:
        return self.clock_mhz * 1e6 / self.cycles_per_frame

    @property
    def latency_cycles(self) -> int:
        return sum(lay.latency for lay in self.layers)

    @property
    def latency_us(self) -> float:
        return self.latency_cycles / self.clock_mhz

    @property
    def totals(self) -> dict:
        return {r: sum(lay.res[r] for lay in self.layers) for r in RESOURCES}

    @property
    def meets_target(self) -> bool:
        return self.target_fps is None or self.fps >= self.target_fps * (1 - 1e-9)

    def markdown(self) -> str:
        b, t = self.budget, self.totals
        target = f"{self.target_fps:,.0f} frames/s" if self.target_fps else "none (cheapest folding)"
        lines = [
            "## FPGA folding",
            "",
            f"Part **{self.part.name}** ({self.part.board}, `{self.part.full}`) at {self.clock_mhz:g} MHz; budget "
            f"{self.utilization:.0%} of the part: {b['lut']:,} LUT, {b['ff']:,} FF, {b['bram18']:,} BRAM18, "
            f"{b['dsp']:,} DSP. Target: {target}.",
            "",
            f"**{self.cycles_per_frame:,} cycles per frame** (slowest layer: `{self.bottleneck}`) -> "
            f"**{self.fps:,.0f} frames/s**; latency {self.latency_cycles:,} cycles = {self.latency_us:,.2f} us "
            "(sum of the layers' stages, an upper bound).",
            "",
            "| layer | op | K | N | rows | PE | SIMD | cycles/frame | MVAU cycles (estimate.mvau_cycles) | LUT | FF "
            "| BRAM18 | DSP |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lay in self.layers:
            r = lay.res
            lines.append(f"| `{lay.name}` | {lay.op} | {lay.K} | {lay.N} | {lay.rows} | {lay.pe} | {lay.simd} | "
                         f"{lay.cycles:,} | {lay.mvau_cycles:,} | {r['lut']:,} | {r['ff']:,} | {r['bram18']} | "
                         f"{r['dsp']} |")
        lines.append(f"| **total** | | | | | | | {self.cycles_per_frame:,} (max) | | {t['lut']:,} | {t['ff']:,} | "
                     f"{t['bram18']} | {t['dsp']} |")
        lines += ["", "Per layer: the MVAU from targets/fpga/estimate.py (calibrated on yosys synth_xilinx of the RTL "
                  "MVAU) plus uncalibrated estimates of its input quantizer, sliding window, pool, width converter and "
                  "float epilogue. Vitis HLS's csynth report of hls/ is the authority where Vitis is installed."]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _mem(width: int, depth: int) -> tuple[int, int]:
    """(LUTs, BRAM18) of a ``width`` x ``depth`` buffer: distributed RAM when shallow, else 18 Kb blocks."""
    if depth < estimate.BRAM_MIN_DEPTH:
        return width * math.ceil(depth / _LUTRAM_DEPTH), 0
    per_width = max(1, min(36, 18 * 1024 // depth))
    return 0, math.ceil(width / per_width) * math.ceil(depth / (18 * 1024 // per_width))


def _add(res: dict, lut: int = 0, ff: int = 0, bram18: int = 0, dsp: int = 0) -> None:
    res["lut"] += lut
    res["ff"] += ff
    res["bram18"] += bram18
    res["dsp"] += dsp


def _rows(spec) -> int:
    return 1 if spec.op == "gemm" else spec.out_hw[0] * spec.out_hw[1]


def _simd_divides(spec) -> int:
    return spec.in_shape[0] if spec.op == "conv" else spec.K


def _layer(spec, pe: int, simd: int, in_lanes: int | None) -> LayerFold:
    """A layer's cycles and resources at one folding (``in_lanes``: the lanes of the stream feeding it)."""
    rows, ba = _rows(spec), spec.bits_a
    if spec.op == "maxpool":
        c, h, w = spec.in_shape
        lanes = in_lanes or 1
        cf = c // lanes
        ho, wo = spec.out_shape[1:]
        taps = spec.kernel[0] * spec.kernel[1]
        words = max(h * w * cf, ho * wo * taps * cf)
        lut, bram = _mem(lanes * ba, ((spec.kernel[0] - 1) * spec.dilations[0] + 1) * w * cf)
        res = {"lut": lut + lanes * ba + _LUT_STAGE_CONTROL, "ff": 2 * lanes * ba, "bram18": bram, "dsp": 0}
        return LayerFold(spec.name, "maxpool", taps, c, ho * wo, lanes, lanes, words, words, 0, res, {})
    mv_cycles = estimate.mvau_cycles(rows, spec.K, spec.N, pe, simd)
    mv_res = estimate.mvau_resources(spec.K, spec.N, pe, simd, ba, spec.bits_w, spec.L, xor=spec.xor_mode)
    res = {"lut": mv_res["lut"], "ff": mv_res["ff"], "bram18": mv_res["bram"], "dsp": mv_res["dsp"]}
    stage_cycles = [mv_cycles - estimate.PIPELINE_LATENCY]
    in_elems = int(math.prod(spec.in_shape))
    if spec.in_thresholds is not None:
        stage_cycles.append(in_elems // simd)
        _add(res, lut=simd * spec.in_thresholds.size * _LUT_PER_FLOAT_COMPARE + _LUT_STAGE_CONTROL,
             ff=simd * (32 + ba))
    elif in_lanes is not None and in_lanes != simd:
        stage_cycles.append(in_elems // math.gcd(in_lanes, simd))
        _add(res, lut=(in_lanes + simd) * ba + _LUT_STAGE_CONTROL, ff=(in_lanes + simd) * ba)
    if spec.op == "conv":
        c, h, w = spec.in_shape
        cf = c // simd
        kh, kw = spec.kernel
        stage_cycles.append(max(h * w * cf, rows * kh * kw * cf))
        lut, bram = _mem(simd * ba, ((kh - 1) * spec.dilations[0] + 1) * w * cf)
        _add(res, lut=lut + _LUT_STAGE_CONTROL, ff=2 * simd * ba, bram18=bram)
    if spec.epilogue == "float":
        _add(res, lut=pe * _LUT_PER_FLOAT_EPILOGUE, ff=pe * 64, dsp=pe * _DSP_PER_FLOAT_EPILOGUE)
    if spec.pool is not None:
        nf = spec.N // pe
        ob = max(1, spec.L.bit_length())
        stage_cycles.append(rows * nf)
        lut, bram = _mem(pe * ob, (spec.out_hw[1] // spec.pool[1]) * nf)
        _add(res, lut=lut + pe * ob + _LUT_STAGE_CONTROL, ff=pe * ob, bram18=bram)
    latency = mv_cycles + sum(stage_cycles[1:])
    return LayerFold(spec.name, spec.op, spec.K, spec.N, rows, pe, simd, max(stage_cycles), latency, mv_cycles,
                     res, mv_res)


def candidates(spec, in_lanes: int | None = None) -> list[LayerFold]:
    """Every folding of a layer: PE dividing N, SIMD dividing K (a conv: its input channels)."""
    if spec.op == "maxpool":
        return [_layer(spec, 0, 0, in_lanes)]
    return [_layer(spec, pe, simd, in_lanes) for pe in _divisors(spec.N) for simd in _divisors(_simd_divides(spec))]


def _cost(res: dict, budget: dict) -> float:
    return sum(res[r] / max(1, budget[r]) for r in ("lut", "bram18", "dsp"))


def _fits(res: dict, budget: dict) -> bool:
    return all(res[r] <= budget[r] for r in RESOURCES)


def _need(res: dict, every: bool = False) -> str:
    return ", ".join(f"{res[r]:,} {r.upper()}" for r in ("lut", "ff", "bram18", "dsp") if res[r] or every)


def _chain(specs, pick) -> list[LayerFold]:
    """Layers in order, each given the lanes of the stream before it (a pool or maxpool keeps its producer's)."""
    out, lanes = [], None
    for spec in specs:
        lay = pick(spec, lanes)
        out.append(lay)
        lanes = lay.pe if spec.op != "maxpool" else lanes
    return out


def evaluate_folding(specs, foldings: dict, part: str | Part, *, clock_mhz: float | None = None,
                     target_fps: float | None = None, utilization: float = DEFAULT_UTILIZATION) -> FoldingPlan:
    """The plan of given foldings {name: (pe, simd)} (checked to divide the layers; not checked against the budget)."""
    from .hls import check_folding

    part = get_part(part) if isinstance(part, str) else part

    def pick(spec, lanes):
        if spec.op == "maxpool":
            return _layer(spec, 0, 0, lanes)
        if spec.name not in foldings:
            raise ConfigError(f"layer {spec.name!r}: no folding given (PE, SIMD)")
        pe, simd = foldings[spec.name]
        check_folding(spec, pe, simd)
        return _layer(spec, pe, simd, lanes)

    return FoldingPlan(part, clock_mhz or part.clock_mhz, target_fps, utilization, _chain(specs, pick))


def choose_folding(specs, part: str | Part, fps: float | None, *, clock_mhz: float | None = None,
                   utilization: float = DEFAULT_UTILIZATION) -> FoldingPlan:
    """PE/SIMD per layer: the cheapest foldings whose slowest stage reaches ``fps`` (None: the cheapest design), or
    if that does not fit the budget the fastest balanced design that does (a note says the target was missed).

    Raises FoldingError naming the layer when a layer does not fit at any folding, or the chain at its cheapest."""
    part = get_part(part) if isinstance(part, str) else part
    clock = clock_mhz or part.clock_mhz
    if fps is not None and fps <= 0:
        raise ConfigError(f"target frame rate must be positive, got {fps}")
    budget = part.budget(utilization)
    where = f"{part.name} ({utilization * 100:.3g}% of the part: {_need(budget, every=True)})"
    # candidates are costed without a width converter (it depends on the producer's choice); _chain adds it
    options = {}
    for spec in specs:
        every = candidates(spec)
        cands = [lay for lay in every if _fits(lay.res, budget)]  # a folding over the budget alone is never used
        if not cands:
            cheapest = min(every, key=lambda lay: (_cost(lay.res, budget), lay.cycles))
            raise FoldingError(f"layer {spec.name!r} does not fit {where}: its cheapest folding (PE={cheapest.pe}, "
                               f"SIMD={cheapest.simd}) needs {_need(cheapest.res)}")
        by_cycles = sorted(cands, key=lambda lay: (lay.cycles, _cost(lay.res, budget)))
        best, prefix = None, []   # prefix[i]: the cheapest of the i+1 fastest foldings
        for lay in by_cycles:
            if best is None or _cost(lay.res, budget) < _cost(best.res, budget):
                best = lay
            prefix.append(best)
        options[spec.name] = ([lay.cycles for lay in by_cycles], prefix, by_cycles[0])

    def design(limit: int) -> list[LayerFold]:
        def pick(spec, lanes):
            cycles, prefix, fastest = options[spec.name]
            i = bisect.bisect_right(cycles, limit) - 1
            chosen = prefix[i] if i >= 0 else fastest
            return _layer(spec, chosen.pe, chosen.simd, lanes)
        return _chain(specs, pick)

    def total(layers):
        return {r: sum(lay.res[r] for lay in layers) for r in RESOURCES}

    limits = sorted({c for cycles, _, _ in options.values() for c in cycles})
    start = limits[-1] if fps is None else max(1, int(clock * 1e6 // fps))
    cheapest_all = design(limits[-1])
    if not _fits(total(cheapest_all), budget):
        biggest = max(cheapest_all, key=lambda lay: _cost(lay.res, budget))
        raise FoldingError(f"the layers do not fit {where} together: at their smallest foldings they need "
                           f"{_need(total(cheapest_all))} (largest: layer {biggest.name!r}, {_need(biggest.res)})")
    notes = []
    layers = design(start)
    if not _fits(total(layers), budget):
        later = [c for c in limits if c > start]
        lo, hi = 0, len(later) - 1   # the smallest limit that fits (resources shrink as the limit grows)
        while lo < hi:
            mid = (lo + hi) // 2
            if _fits(total(design(later[mid])), budget):
                hi = mid
            else:
                lo = mid + 1
        layers = design(later[lo])
        notes.append(f"the target of {fps:,.0f} frames/s does not fit the budget; this is the fastest balanced "
                     "design that does")
    plan = FoldingPlan(part, clock, fps, utilization, layers, notes)
    if fps is not None and not plan.meets_target and not notes:
        plan.notes.append(f"the target of {fps:,.0f} frames/s is beyond the fully parallel design "
                          f"(slowest layer {plan.bottleneck!r})")
    return plan
