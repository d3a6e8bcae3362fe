"""The Python API: qcompile.compile(model, config=..., calib=...) -> CompileResult, with .save(out_dir)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import onnx
import onnx_ir as ir

from qcompile.calibration import WithoutInputs, as_reader
from qcompile.config import Config, resolve_config
from qcompile.fileio import atomic_dir, sha256_file
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.canonicalize import canonicalize_passes
from qcompile.passes.import_fakequant import (CONFIG_KEY, ImportFakeQuant, is_fake_quant, layer_metadata, metadata,
                                              set_metadata)
from qcompile.passes.load import check_weights_finite, load_model
from qcompile.passes.pipeline import CompileContext, run_pipeline
from qcompile.passes.plan import RECURRENT_OPS, PlanBits
from qcompile.passes.quantize import QuantizeLayers


def front_passes() -> list:
    """Canonicalize and plan: what `inspect` runs."""
    return [*canonicalize_passes(), PlanBits()]


def quantize_passes() -> list:
    return [Calibrate(), QuantizeLayers()]


@dataclass
class CompileResult:
    source: str
    config: Config
    float_model: onnx.ModelProto          # canonical float model (BN folded): the accuracy baseline
    model: onnx.ModelProto                # fake-quant model, runs in onnxruntime
    ctx: CompileContext
    report: dict = field(default_factory=dict)
    lowered: Any = None                   # qcompile.artifact.Lowered when a target was given
    _weights_png: Any = field(default=None, repr=False)  # a Future of weights.png drawn while the kernels build

    @property
    def manifest(self) -> dict | None:
        return None if self.lowered is None else self.lowered.manifest

    def save(self, out_dir: str | Path, *, plots: bool = True) -> Path:
        """Write the result atomically into out_dir: model.onnx (fake-quant), float.onnx, report.json/.md and
        weights.png; with a target, also the artifact (manifest.json, graph.onnx, partitions/, kernels/)."""
        from qcompile import artifact
        from qcompile import report as report_mod

        protect = (self.source,) if Path(self.source).exists() else ()
        with atomic_dir(out_dir, protect) as tmp:
            if self.lowered is not None:
                self.lowered.copy_into(tmp)
                artifact.write_manifest(tmp, self.lowered.manifest)
            onnx.save(self.model, tmp / "model.onnx")
            onnx.save(self.float_model, tmp / "float.onnx")
            (tmp / "report.json").write_text(json.dumps(self.report, indent=2))
            md = report_mod.to_markdown(self.report)
            if self.manifest is not None:
                md += "\n" + report_mod.plan_markdown(self.manifest["plan"])
                if self.manifest.get("report_markdown"):  # the fpga target's folding table
                    md += "\n" + self.manifest["report_markdown"]
            (tmp / "report.md").write_text(md)
            if plots and self.ctx.layers:
                png = self._weights_png.result() if self._weights_png is not None else None
                if png is not None:
                    (tmp / "weights.png").write_bytes(png)
                else:
                    report_mod.plot_weights(self.ctx.layers, tmp / "weights.png")
        return Path(out_dir)


def _background(fn, *args) -> Future:
    """fn(*args) on a background thread; the Future holds its result, or None if it failed (the caller redoes it).
    Not a daemon: Python kills daemon threads at exit by unwinding them, which aborts the process ("terminate
    called without an active exception") when the thread is inside C++ (matplotlib's Agg); exit waits instead."""
    fut: Future = Future()

    def work():
        try:
            fut.set_result(fn(*args))
        except Exception:  # noqa: BLE001 - a figure must never fail a compile; save() draws it again and reports
            fut.set_result(None)

    threading.Thread(target=work, name="qcompile-plot", daemon=False).start()
    return fut


def compile(model: str | Path, *, config: str | Config | None = "w2a2", calib: Any = None,
            target: str | None = None, autotune: bool = False, kernel: str | None = None,
            plan_batch: int = 64, verify: bool = False, fix_inputs: dict | None = None,
            dump_dir: str | Path | None = None, progress: Callable[[str], None] | None = None,
            target_options: dict | None = None, **overrides) -> CompileResult:
    """Quantize an ONNX model (path) to a fake-quant ONNX model.

    config: a preset (w1a1, w1a2, w2a2, w4a4), a .toml file, or a Config; keyword overrides such as
    quantizer="uniform", bits_w=4 or keep_float=["conv3"] replace single fields. calib: a .npz path, an array,
    or a CalibrationDataReader (get_next() -> {input: batch} or None). fix_inputs: {input name: value(s)} turns
    those inputs into constants (e.g. {"sr": 16000}), so the If branches they select are folded and quantized.
    target_options: passed to the target's lowering (target "fpga:<part>": {"fps": frames per second})."""
    from qcompile import report as report_mod

    cfg = resolve_config(config, **overrides)
    proto = load_model(model)
    irm = ir.from_proto(proto)
    fixed = _fix_inputs(irm, fix_inputs, model)
    check_weights_finite(irm)
    if target is not None and target.split(":")[0] == "cpu":
        from qcompile.targets.cpu.build import prebuild_core

        prebuild_core()  # the kernel core does not depend on the model: its C build overlaps the passes below
    reader = as_reader(calib)
    if fixed and reader is not None:
        reader = WithoutInputs(reader, fixed)
    ctx = CompileContext(config=cfg, source=str(model), calib=reader, target=target, progress=progress,
                         fixed_inputs=fixed)
    if is_fake_quant(proto):
        # qcompile's own fake-quant model (a compile or a fine-tune): keep its quantizer parameters as they are
        cfg = ctx.config = _imported_config(proto, cfg)
        float_proto = _sibling_float(model)
        run_pipeline(irm, [ImportFakeQuant(proto, _initializers(float_proto))], ctx, verify_each=verify,
                     dump_dir=dump_dir)
        ctx.float_model = float_proto if float_proto is not None else proto
    else:
        run_pipeline(irm, front_passes(), ctx, verify_each=verify, dump_dir=dump_dir)
        ctx.float_model = ir.to_proto(irm)
        run_pipeline(irm, quantize_passes(), ctx, verify_each=verify, dump_dir=dump_dir)
        if any(p.quantize and p.op in RECURRENT_OPS for p in ctx.plan.values()):
            from qcompile.passes.rnn import quantize_recurrent

            quantized_rnn, ctx.recurrent = quantize_recurrent(ir.to_proto(irm), ctx)
            irm = ir.from_proto(quantized_rnn)
    result = quantized_result(str(model), cfg, irm, ctx, sha256_file(model))
    if target is not None:
        from qcompile import artifact

        if progress:
            progress(f"lower to {target}")
        if ctx.layers and not autotune:  # draw the figure while the C compiler runs (not while timing kernels)
            result._weights_png = _background(report_mod.weights_png, ctx.layers)
        result.lowered = artifact.lower(result, target, autotune=autotune, batch=plan_batch, kernel=kernel,
                                        options=target_options)
        result.report["plan"] = result.lowered.manifest["plan"]
    return result


def _fix_inputs(irm: ir.Model, values: dict | None, source) -> dict:
    from qcompile.passes.load import fix_inputs

    return fix_inputs(irm, values, str(source)) if values else {}


def quantized_result(source: str, cfg: Config, irm: ir.Model, ctx: CompileContext, source_sha: str) -> CompileResult:
    """The fake-quant model with the metadata that lets a later compile import it as it is, and its report."""
    from qcompile import report as report_mod

    quantized = ir.to_proto(irm)
    set_metadata(quantized, {**layer_metadata(ctx.layers), CONFIG_KEY: json.dumps(cfg.to_dict())})
    result = CompileResult(source, cfg, ctx.float_model, quantized, ctx)
    result.report = report_mod.build_report(result, source_sha)
    return result


def _imported_config(proto: onnx.ModelProto, fallback: Config) -> Config:
    """The Config a fake-quant model was written with (its metadata), else the caller's."""
    data = metadata(proto, CONFIG_KEY)
    if not data:
        return fallback
    data = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in data.items()}
    return Config(**data)


def _sibling_float(model) -> onnx.ModelProto | None:
    """float.onnx next to a fake-quant model.onnx (compile and finetune write both): the float reference."""
    if not isinstance(model, (str, Path)):
        return None
    path = Path(model).with_name("float.onnx")
    if path == Path(model) or not path.is_file():
        return None
    try:
        return load_model(path)
    except Exception:  # noqa: BLE001 - the float reference is optional; the compile proceeds without it
        return None


def _initializers(proto: onnx.ModelProto | None) -> dict:
    from onnx import numpy_helper

    if proto is None:
        return {}
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def inspect(model: str | Path, *, config: str | Config | None = "w2a2", fix_inputs: dict | None = None,
            **overrides) -> list[dict]:
    """Each op of the canonical model: quantized or float, and why (no calibration needed)."""
    from qcompile.passes.plan import op_table

    cfg = resolve_config(config, **overrides)
    irm = ir.from_proto(load_model(model))
    _fix_inputs(irm, fix_inputs, model)
    check_weights_finite(irm)
    ctx = CompileContext(config=cfg, source=str(model))
    run_pipeline(irm, front_passes(), ctx)
    return op_table(irm, ctx.plan)
