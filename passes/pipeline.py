"""A tiny pass manager: a pipeline is a list of named passes run in order over one onnx_ir.Model.

Each pass is a callable `(model, ctx) -> bool` (True when it changed the model), with a `name`. The manager times
every pass, counts nodes, optionally verifies the model (onnx checker + strict shape inference) after each pass and
dumps it as NN_<name>.onnx, like a compiler's -print-after-all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import onnx
import onnx_ir as ir

from qcompile.config import Config
from qcompile.errors import QcompileError


class Pass(Protocol):
    name: str

    def __call__(self, model: ir.Model, ctx: "CompileContext") -> bool: ...


@dataclass
class PassRecord:
    name: str
    modified: bool
    ms: float
    nodes: int


@dataclass
class CompileContext:
    """What passes share: the config, the calibration reader, and what earlier passes decided."""

    config: Config
    source: str = "<memory>"
    calib: Any = None                                   # CalibrationDataReader-like: get_next() -> dict | None
    target: Any = None                                  # a target's capability record, or None (fake-quant only)
    plan: dict[str, Any] = field(default_factory=dict)  # node name -> passes.plan.LayerPlan
    act_ranges: dict[str, Any] = field(default_factory=dict)  # value name -> passes.calibrate.ActivationStats
    layers: dict[str, Any] = field(default_factory=dict)      # node name -> passes.quantize.QuantizedLayer
    fuse_notes: dict[str, str] = field(default_factory=dict)  # node name -> how it was lowered, or why not
    trained_clips: dict[str, float] = field(default_factory=dict)  # node name -> fine-tuned activation clip
    trained_biases: dict[str, Any] = field(default_factory=dict)   # node name -> fine-tuned bias [N]
    second_moments: dict[str, Any] = field(default_factory=dict)   # node name -> E[x x^T] of its input rows (GPTQ)
    float_model: onnx.ModelProto | None = None          # canonical float model (for calibration and eval)
    fixed_inputs: dict[str, Any] = field(default_factory=dict)  # input name -> the constant it was fixed to
    recurrent: list[dict] = field(default_factory=list)  # report rows of the quantized LSTM/GRU layers (passes/rnn)
    records: list[PassRecord] = field(default_factory=list)
    progress: Callable[[str], None] | None = None       # called with each pass name before it runs


def verify(model: ir.Model, where: str) -> None:
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as exc:  # an internal error: a pass produced an invalid graph
        raise QcompileError(f"internal error: model invalid after pass '{where}': "
                            f"{str(exc).splitlines()[0][:200]}") from None


def run_pipeline(model: ir.Model, passes: list[Pass], ctx: CompileContext, *, verify_each: bool = False,
                 dump_dir: str | Path | None = None) -> ir.Model:
    for index, p in enumerate(passes):
        if ctx.progress:
            ctx.progress(p.name)
        start = time.perf_counter()
        modified = bool(p(model, ctx))
        ms = (time.perf_counter() - start) * 1e3
        ctx.records.append(PassRecord(p.name, modified, ms, model.graph.num_nodes()))
        if verify_each:
            verify(model, p.name)
        if dump_dir is not None:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            ir.save(model, str(Path(dump_dir) / f"{index:02d}_{p.name}.onnx"))
    return model


def describe(passes: list[Pass]) -> str:
    return " -> ".join(p.name for p in passes)
