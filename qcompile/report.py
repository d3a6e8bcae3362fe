"""The compile report: per-layer table (stdout), JSON, Markdown, and a PNG of weight histograms and bin occupancy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompile.passes.plan import op_table


def build_report(result, source_sha256: str) -> dict:
    ctx = result.ctx
    layers = []
    for name, q in ctx.layers.items():
        scale = np.asarray(q.qweight.scale, np.float64).ravel()
        layers.append({
            "node": name, "op": q.op, "bits_w": q.bits_w, "bits_a": q.bits_a, "quantizer": q.quantizer,
            "scale_min": float(scale.min()), "scale_max": float(scale.max()),
            "levels_used": q.levels_used, "levels": 2 ** q.bits_w, "entropy_bits": round(q.code_entropy, 3),
            "rel_error": round(q.rel_error, 5), "act_clip": q.clip, "act_clip_source": q.clip_source,
            "bytes_float": q.bytes_float, "bytes_packed": q.bytes_packed,
        })
    import onnx_ir as ir
    float_ir = ir.from_proto(result.float_model)
    ops = op_table(float_ir, ctx.plan)
    kept_float = [r for r in ops if r["status"] == "float" and r["op"] in ("Conv", "Gemm", "MatMul", "LSTM", "GRU")]
    weight_bytes = sum(4 * int(np.prod(v.const_value.shape)) for v in float_ir.graph.initializers.values()
                       if v.const_value is not None)
    quant_float = sum(x["bytes_float"] for x in layers)
    quant_packed = sum(x["bytes_packed"] for x in layers)
    after = weight_bytes - quant_float + quant_packed
    warnings = []
    if ctx.calib is None and any(q.clip_source.startswith("DoReFa default") for q in ctx.layers.values()):
        warnings.append("no calibration data: activations clipped to DoReFa's [0,1]; pass --calib for a "
                        "float-trained model")
    return {
        "source": result.source, "source_sha256": source_sha256, "config": result.config.to_dict(),
        "passes": [r.__dict__ for r in ctx.records],
        "layers": layers,
        "recurrent": list(getattr(ctx, "recurrent", [])),
        "ops": ops,
        "kept_float_weighted": kept_float,
        "totals": {
            "weight_bytes_float": weight_bytes, "weight_bytes_after": after,
            "compression": round(weight_bytes / max(after, 1), 2),
            "quantized_layers_compression": round(quant_float / max(quant_packed, 1), 2),
        },
        "warnings": warnings,
    }


LAYER_COLUMNS = [("node", "node"), ("op", "op"), ("bits", None), ("quantizer", "quantizer"),
                 ("scale", None), ("levels", None), ("entropy", "entropy_bits"), ("rel.err", "rel_error"),
                 ("act clip", "act_clip"), ("bytes fp32", "bytes_float"), ("bytes packed", "bytes_packed")]


TERMINAL_HIDDEN = ("op", "act clip", "scale")  # in report.md and --json; the terminal table stays readable


def _cells(row: dict) -> list[str]:
    out = []
    for title, key in LAYER_COLUMNS:
        if title == "bits":
            out.append(f"W{row['bits_w']}A{row['bits_a']}")
        elif title == "scale":
            out.append(f"{row['scale_min']:.3g}..{row['scale_max']:.3g}")
        elif title == "levels":
            out.append(f"{row['levels_used']}/{row['levels']}")
        elif isinstance(row[key], float):
            out.append(f"{row[key]:.4g}")
        else:
            out.append(str(row[key]))
    return out


def to_markdown(report: dict) -> str:
    lines = [f"# qcompile report: {Path(report['source']).name}", "",
             f"config `{report['config']['name']}`: W{report['config']['bits_w']}A{report['config']['bits_a']}, "
             f"quantizer `{report['config']['quantizer']}`", "", "## Quantized layers", "",
             "| " + " | ".join(t for t, _ in LAYER_COLUMNS) + " |",
             "|" + "---|" * len(LAYER_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in report["layers"]]
    if report.get("recurrent"):
        lines += ["", "## Recurrent layers", "", "| node | layer | bits | what is quantized | rel.err (W, R) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['node']} | {r['layer']} | W{r['bits_w']}A{r['bits_a']} | {r['quantized']} | "
                  f"{r['rel_error']} |" for r in report["recurrent"]]
    lines += ["", "## Kept in float", "", "| node | op | why |", "|---|---|---|"]
    lines += [f"| {r['node']} | {r['op']} | {r['why']} |" for r in report["kept_float_weighted"]]
    t = report["totals"]
    lines += ["", f"Weights: {t['weight_bytes_float']:,} B float -> {t['weight_bytes_after']:,} B "
              f"({t['compression']}x; quantized layers {t['quantized_layers_compression']}x).", ""]
    lines += [f"Warning: {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def short_name(name: str, width: int = 40) -> str:
    """A node name for a terminal table: exported names are long paths whose tail tells the layer apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"qcompile: {Path(report['source']).name}  "
                        f"(W{report['config']['bits_w']}A{report['config']['bits_a']}, {report['config']['quantizer']})")
    shown = [i for i, (title, _) in enumerate(LAYER_COLUMNS) if title not in TERMINAL_HIDDEN]
    for i in shown:
        title = LAYER_COLUMNS[i][0]
        table.add_column(title, justify="left" if title in ("node", "op", "quantizer") else "right",
                         no_wrap=title == "node", min_width=8 if title == "node" else None)
    for row in report["layers"]:
        cells = _cells(row)
        cells[0] = short_name(cells[0])
        table.add_row(*[escape(str(cells[i])) for i in shown])  # node names and reasons hold [..]: not markup
    console.print(table)
    for r in report["kept_float_weighted"]:
        console.print(escape(f"  float: {r['node']} ({r['op']}): {r['why']}"))
    t = report["totals"]
    console.print(f"  weights {t['weight_bytes_float']:,} B -> {t['weight_bytes_after']:,} B: "
                  f"{t['compression']}x smaller (quantized layers {t['quantized_layers_compression']}x)")
    for w in report["warnings"]:
        console.print(f"  [yellow]warning:[/yellow] {escape(w)}")


def weights_png(layers: dict, max_layers: int = 4) -> bytes:
    """Per layer: the weight histogram with each quantizer's bin edges, and level occupancy, uniform vs balanced.
    Uses matplotlib's Figure without pyplot (no global state), so it may run on a background thread."""
    import io

    from matplotlib.figure import Figure

    from qcompile.quant import registry

    chosen = list(layers.values())[:max_layers]
    fig = Figure(figsize=(11, 3.2 * max(len(chosen), 1)))
    axes = fig.subplots(max(len(chosen), 1), 2, squeeze=False)
    for row, q in zip(axes, chosen):
        w = q.float_weight.ravel()
        counts, edges = np.histogram(w, bins=120)
        row[0].stairs(counts, edges, fill=True, color="0.6")  # one artist, not 120 bars: the plot's cost is artists
        row[0].set_title(f"{q.node}: weight histogram; lines = channel 0's levels "
                         "(blue uniform, orange balanced)", fontsize=9)
        width = 0.38
        levels = np.arange(2 ** q.bits_w)
        for i, name in enumerate(("uniform", "balanced")):
            qt = registry.get(name).weights(q.float_weight, q.bits_w, 0, q.node)
            occ = np.bincount(qt.codes.ravel(), minlength=2 ** q.bits_w) / qt.codes.size
            row[1].bar(levels + (i - 0.5) * width, occ, width, label=name)
            for v in np.unique(qt.dequantize()[:1].ravel()):
                row[0].axvline(v, color=f"C{i}", lw=0.8, alpha=0.8)
        row[1].axhline(1 / 2 ** q.bits_w, color="k", lw=0.8, ls="--", label="equal share")
        row[1].set_xticks(levels)
        row[1].set_title("fraction of weights per level (uniform vs balanced)", fontsize=9)
        row[1].legend(fontsize=8, loc="upper right")  # loc="best" searches for a free spot: slow
    # fixed margins: tight_layout re-measures every label several times (seconds for a 4-layer figure)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.35 / fig.get_figheight(), bottom=0.3 / fig.get_figheight(),
                        hspace=0.45, wspace=0.18)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def plot_weights(layers: dict, path: str | Path, max_layers: int = 4) -> Path:
    """weights_png() written to ``path``."""
    Path(path).write_bytes(weights_png(layers, max_layers))
    return Path(path)


def print_plan(plan: list[dict], console=None) -> None:
    """The kernel each layer got on the target, and why."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title="kernel plan")
    for col in ("node", "op", "bits", "kernel", "why"):
        table.add_column(col, no_wrap=col in ("op", "bits"))
    for p in plan:
        table.add_row(*(escape(v) for v in (short_name(p["node"], 32), p["op"], p["bits"], p["kernel"], p["why"])))
    console.print(table)
    timed = [p for p in plan if p.get("measured_ms")]
    if timed:  # --autotune: how far the cost model was from the clock, per layer and candidate
        table = Table(title="predicted / measured ms per layer (--autotune)")
        table.add_column("node")
        for kern in PLAN_KERNELS:
            table.add_column(kern, justify="right")
        for p in timed:
            table.add_row(escape(short_name(p["node"], 32)), *(_pred_meas(p, k) for k in PLAN_KERNELS))
        console.print(table)


PLAN_KERNELS = ("bitserial", "int8", "float")


def _pred_meas(p: dict, kern: str) -> str:
    est, meas = p.get("estimate_ms", {}).get(kern), p.get("measured_ms", {}).get(kern)
    if est is None:
        return "-"
    return f"{est:.3f}" if meas is None else f"{est:.3f} / {meas:.3f}"


def plan_markdown(plan: list[dict]) -> str:
    """The kernel plan for report.md: each layer's kernel, the cost model's prediction for every candidate and,
    after --autotune, the measured time beside it."""
    lines = ["## Kernel plan", "", "Milliseconds per candidate: predicted, or predicted / measured after --autotune.",
             "", "| node | bits | kernel | " + " | ".join(PLAN_KERNELS) + " | why |",
             "|---|---|---|" + "---:|" * len(PLAN_KERNELS) + "---|"]
    for p in plan:
        cells = [_pred_meas(p, k) for k in PLAN_KERNELS]
        why = p["why"].replace("|", "\\|")
        lines.append(f"| {p['node']} | {p['bits']} | {p['kernel']} | " + " | ".join(cells) + f" | {why} |")
    return "\n".join(lines) + "\n"
