"""`qcompile.finetune(model, config=..., data=...)`: quantization-aware fine-tuning of an ONNX model.

    model.onnx --compile (post-training: plan, calibrate, quantize)--> initial quantizer state
               --to_torch + QuantLayer--> student (the fake-quant model, trainable)   teacher = the float model
               --Trainer (STE, optional DoReFa gradients, distillation)--> trained student
               --export (quantize pass with the trained weights, biases and clips)--> fake-quant model.onnx

The exported model.onnx is in the integer-exact form `compile` writes (with its metadata), so
`qcompile compile OUT/model.onnx --target cpu` keeps the trained parameters as they are.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx import numpy_helper

from qcompile.config import Config, resolve_config
from qcompile.errors import QcompileError
from qcompile.finetune.data import Dataset, check_against_model, open_data
from qcompile.finetune.loop import CHECKPOINT_FORMAT, Interrupted, Trainer, TrainOptions, atomic_torch_save
from qcompile.finetune.qat import QuantLayer, quant_layers, replace_module
from qcompile.finetune.report import percent
from qcompile.targets.cpu.caps import model_name, usable_cpus

CHECKPOINT = "checkpoint.pt"
CALIB_SAMPLES = 512


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _input_shape(proto: onnx.ModelProto) -> tuple:
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise QcompileError(f"fine-tuning takes models with one input; this one has {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])


def _num_classes(proto: onnx.ModelProto) -> int | None:
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value"):
        return int(dims[1].dim_value)
    return None


def _ends_in_softmax(proto: onnx.ModelProto) -> bool:
    out = proto.graph.output[0].name
    return any(n.op_type == "Softmax" and out in n.output for n in proto.graph.node)


# --------------------------------------------------------------------------------------------- building
def build_student(float_proto: onnx.ModelProto, ptq, cfg: Config, *, learn_clip: bool, gbits: int | None):
    """The converted float model with a QuantLayer around every layer the post-training compile quantized,
    initialised from it (codes, clips, bias-corrected biases): step 0 computes the post-training model."""
    from qcompile.finetune.convert import to_torch, weighted_layers

    student = to_torch(float_proto)
    found = weighted_layers(student)
    for name, q in ptq.ctx.layers.items():
        inner = found.get(name)
        if inner is None:
            raise QcompileError(f"layer '{name}': not found in the converted model; cannot fine-tune it")
        plan = ptq.ctx.plan[name]
        layer = QuantLayer(inner, name=name, bits_w=q.bits_w, bits_a=q.bits_a, quantizer=q.quantizer,
                           weight_axis=plan.weight_axis, per_channel=cfg.per_channel, clip=q.clip, bias=q.bias,
                           learn_clip=learn_clip, gbits=gbits, zero=q.act_zero)
        if q.act_zero:  # the post-training bias already holds the zero-point term: train the plain bias
            with torch.no_grad():
                layer.bias.copy_(torch.from_numpy(_plain_bias(q)))
        replace_module(student, inner, layer)
    # what training changes: weights and biases of Conv/Gemm/MatMul (and clips); anything else stays as exported
    trainable = {id(p) for m in weighted_layers(student).values() for p in m.parameters()}
    trainable |= {id(p) for m in quant_layers(student).values() for p in m.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    return student


def _plain_bias(q) -> np.ndarray:
    """The bias before quantize.signed_bias folded the zero-point term in: the same formula with -z (inverse up to
    float32 rounding: the forward recomputes the folded value, so step 0 can differ from post-training by that)."""
    from qcompile.passes.quantize import signed_bias

    return signed_bias(q.bias, q.mult, -q.act_zero, q.qweight.int_values())


def trained_float_model(float_proto: onnx.ModelProto, student) -> onnx.ModelProto:
    """float.onnx: the canonical float model with the fine-tuned latent weights and biases written in."""
    from qcompile.finetune.convert import weighted_layers

    proto = copy.deepcopy(float_proto)
    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    qls = quant_layers(student)
    for name, module in weighted_layers(student).items():
        node = nodes[name]
        w = module.weight.detach().cpu().numpy().astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        bias = qls[name].bias if name in qls else module.bias
        if bias is None:
            continue
        b = bias.detach().cpu().numpy().astype(np.float32).reshape(-1)
        if len(node.input) > 2 and node.input[2] in inits:
            inits[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
        elif node.op_type in ("Conv", "Gemm"):
            bname = f"{node.input[1]}_trained_bias"
            proto.graph.initializer.append(numpy_helper.from_array(b, bname))
            while len(node.input) < 2:
                node.input.append("")
            node.input.append(bname)
    from qcompile.finetune.recurrent import write_back

    write_back(proto, student)   # LSTM/GRU weights and trained embedding tables (language models)
    return proto


def export(float_proto: onnx.ModelProto, student, cfg: Config, source: str, source_sha: str):
    """The fake-quant model of the trained student: the quantize pass on the trained weights, with the trained
    biases and clips as they are (no calibration, no bias correction). Returns (CompileResult, float proto)."""
    from qcompile.api import quantized_result
    from qcompile.passes.pipeline import CompileContext, run_pipeline
    from qcompile.passes.plan import PlanBits
    from qcompile.passes.quantize import QuantizeLayers

    trained = trained_float_model(float_proto, student)
    irm = ir.from_proto(trained)
    ctx = CompileContext(config=cfg, source=source)
    for name, layer in quant_layers(student).items():
        clip = float(layer.clip.detach())
        ctx.trained_clips[name] = (clip, layer.zero) if layer.zero else clip
        ctx.trained_biases[name] = layer.bias.detach().cpu().numpy().astype(np.float32)
    run_pipeline(irm, [PlanBits()], ctx)
    ctx.float_model = ir.to_proto(irm)
    run_pipeline(irm, [QuantizeLayers()], ctx)
    missing = set(ctx.trained_clips) - set(ctx.layers)
    if missing:
        raise QcompileError(f"export: layers {sorted(missing)} were trained quantized but the quantize pass kept "
                            "them float")
    irm = _export_recurrent(irm, ctx, student)
    return quantized_result(source, cfg, irm, ctx, source_sha), trained


def _export_recurrent(irm, ctx, student):
    """The trained LSTM/GRU layers in their quantized Scan form: passes/rnn.quantize_recurrent on the trained
    weights, with each layer's trained x_t grid in place of calibration."""
    from qcompile.finetune.recurrent import recurrent_layers, trained_x_ranges
    from qcompile.passes.plan import RECURRENT_OPS

    trained = {n: m for n, m in recurrent_layers(student).items() if m.quantized}
    planned = {n for n, p in ctx.plan.items() if p.quantize and p.op in RECURRENT_OPS}
    if set(trained) != planned:
        raise QcompileError(f"export: recurrent layers trained quantized {sorted(trained)} but planned "
                            f"{sorted(planned)}")
    if not trained:
        return irm
    from qcompile.passes.rnn import quantize_recurrent

    ctx.act_ranges = trained_x_ranges(trained)
    proto, ctx.recurrent = quantize_recurrent(ir.to_proto(irm), ctx)
    return ir.from_proto(proto)


def check_export(model: onnx.ModelProto, student, x: np.ndarray) -> dict:
    """The exported fake-quant model in onnxruntime against the trained student in torch, on real inputs."""
    from qcompile.evaluate import predict

    ort_out = predict(model, x)
    student.eval()
    with torch.no_grad():
        out = student(torch.from_numpy(x))
        out = (out[0] if isinstance(out, (tuple, list)) else out).numpy()
    diff = np.abs(ort_out - out)
    return {"n": int(len(x)), "max_abs_diff": float(diff.max()), "argmax_agreement":
            float((ort_out.argmax(-1) == out.argmax(-1)).mean()) if out.ndim == 2 else None}


# --------------------------------------------------------------------------------------------- result
@dataclass
class FinetuneResult:
    source: str
    config: Config
    options: TrainOptions
    compiled: Any                      # qcompile.api.CompileResult of the fine-tuned fake-quant model
    float_model: onnx.ModelProto       # the canonical float model with the fine-tuned latent weights
    checkpoint: dict                   # what checkpoint.pt holds
    report: dict = field(default_factory=dict)

    @property
    def model(self) -> onnx.ModelProto:
        return self.compiled.model

    def save(self, out_dir: str | Path) -> Path:
        """Write model.onnx (fake-quant), float.onnx, checkpoint.pt, report.json/.md and curves.png into out_dir.
        Each file is written to a temporary name and renamed, so a reader never sees half a file."""
        from qcompile.finetune import recurrent, report

        ft_report = recurrent if self.report.get("task") == "language-model" else report  # perplexity or accuracy
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if Path(self.source).resolve().parent == out.resolve() and Path(self.source).name in (
                "model.onnx", "float.onnx"):
            raise QcompileError(f"{out}: would overwrite the input model {self.source}; choose another -o")

        def write(name: str, data: bytes) -> None:
            tmp = out / f".{name}.tmp-{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)

        write("model.onnx", self.compiled.model.SerializeToString())
        write("float.onnx", self.float_model.SerializeToString())
        atomic_torch_save(self.checkpoint, out / CHECKPOINT)
        write("report.json", json.dumps(self.report, indent=2).encode())
        write("report.md", ft_report.to_markdown(self.report).encode())
        write("curves.png", ft_report.curves_png(self.report))
        return out


# --------------------------------------------------------------------------------------------- entry point
def finetune(model: str | Path, *, config: str | Config | None = "w1a2", data: Any = "fashion-mnist",
             val: Any = None, epochs: int | None = None, steps: int | None = None, batch: int = 64,
             lr: float = 3e-4, gbits: int | None = None, distill: bool | None = None, seed: int = 0,
             learn_clip: bool = False, resume: bool = False, out: str | Path | None = None,
             log: Callable[[str], None] = print, progress=None, _stop_after_steps: int | None = None,
             allreduce: str = "hfreduce", checkpoint_every: int | None = None, seq_len: int | None = None,
             **overrides) -> FinetuneResult | None:
    """Quantization-aware fine-tuning (see the module docstring). `data`/`val`: an .npz (x, y), an image folder,
    "fashion-mnist[:train|:test]", arrays (x, y) or an iterable of (x, y) batches. Without labels (or with
    distill=True) the float model's outputs are the targets. With `out`, a checkpoint is written there after every
    epoch and on Ctrl-C, and `resume=True` continues from it exactly; the result's .save(out) writes the rest.

    Started by torchrun (RANK/WORLD_SIZE set), it is one rank of a data-parallel job (qcompile.finetune.distributed):
    `batch` is the global batch, `allreduce` "hfreduce" or "ddp"; rank 0 logs, checkpoints and returns the
    result, the other ranks return None. `checkpoint_every`: also checkpoint every N steps.

    A recurrent language model (qcompile.lm.is_language_model) trains on a token stream instead (`data`/`val`: an
    .npz with `tokens`, "kjv[:test|:train|:valid]", or an id array) in windows of `seq_len` tokens (default 35) with
    the states carried (truncated BPTT), `batch` columns; the report gives perplexities
    (qcompile.finetune.recurrent)."""
    from qcompile.passes.import_fakequant import is_fake_quant
    from qcompile.passes.load import load_model

    cfg = resolve_config(config, **overrides)
    if epochs is not None and steps is not None:
        raise QcompileError("give --epochs or --steps, not both")
    for what, v in (("epochs", epochs), ("steps", steps), ("batch", batch), ("checkpoint-every", checkpoint_every)):
        if v is not None and v < 1:
            raise QcompileError(f"--{what} must be at least 1, got {v}")
    if not (lr > 0 and np.isfinite(lr)):
        raise QcompileError(f"--lr must be a positive number, got {lr}")
    if gbits is not None and not 1 <= gbits <= 8:
        raise QcompileError(f"--gbits must be between 1 and 8, got {gbits}")
    source = str(model)
    proto = load_model(model)
    if is_fake_quant(proto):
        raise QcompileError(f"{model}: is already a quantized (fake-quant) model; fine-tune its float model "
                            "(float.onnx next to it) instead")
    if seq_len is not None and seq_len < 1:
        raise QcompileError(f"--seq-len must be at least 1, got {seq_len}")
    from qcompile.lm import is_language_model

    if is_language_model(proto):
        from qcompile.finetune.recurrent import finetune_lm

        opts = TrainOptions(epochs=epochs or 2, steps=steps, batch=batch, lr=lr, seed=seed, distill=bool(distill),
                            gbits=gbits, learn_clip=learn_clip, seq_len=seq_len or 35)
        return finetune_lm(model, cfg=cfg, proto=proto, source=source, data=data, val=val, opts=opts, out=out,
                           resume=resume, log=log, progress=progress, stop_after_steps=_stop_after_steps,
                           checkpoint_every=checkpoint_every)
    input_name, input_shape = _input_shape(proto)
    num_classes = _num_classes(proto)

    train_ds = open_data(data, input_shape=input_shape, name="train")
    check_against_model(train_ds, input_shape=input_shape, num_classes=num_classes)
    if val is not None:
        val_ds = open_data(val, input_shape=input_shape, name="val")
        check_against_model(val_ds, input_shape=input_shape, num_classes=num_classes)
    elif len(train_ds) >= 20:
        train_ds, val_ds = train_ds.split(min(0.1, 5000 / len(train_ds)), seed=seed)
    else:
        val_ds = None
    if train_ds.num_batches(batch, drop_last=True) == 0:
        raise QcompileError(f"{train_ds.describe}: {len(train_ds)} samples are fewer than one batch of {batch}; "
                            "lower --batch")
    opts = TrainOptions(epochs=epochs or 2, steps=steps, batch=batch, lr=lr, seed=seed,
                        distill=bool(distill) or train_ds.y is None, gbits=gbits, learn_clip=learn_clip)

    from qcompile.finetune.distributed import from_env

    dist = from_env(allreduce, batch)
    try:
        return _finetune(model, dist, cfg, proto, source, train_ds, val_ds, opts, input_shape, out, resume, log,
                         progress, _stop_after_steps, checkpoint_every)
    finally:
        dist.close()


def _finetune(model, dist, cfg, proto, source, train_ds, val_ds, opts, input_shape, out, resume, log, progress,
              _stop_after_steps, checkpoint_every):
    from qcompile import api

    seed, learn_clip, gbits = opts.seed, opts.learn_clip, opts.gbits
    if not dist.is_main:  # one voice: rank 0 logs and writes
        log, progress = (lambda *a, **k: None), None
    ckpt_path, saved = output_folder(out, resume)
    torch.manual_seed(seed)
    # the ranks on this machine share its cores
    torch.set_num_threads(max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    source_sha = _sha256(model)
    fingerprint = {"source_sha256": source_sha, "config": cfg.to_dict(), "options": opts.fingerprint(),
                   "train": train_ds.describe, "train_n": len(train_ds)}
    if saved is not None:
        _check_resume(saved, fingerprint, ckpt_path)

    # post-training quantization gives the plan and the starting point (calibrated clips, corrected biases)
    calib = train_ds.x[:CALIB_SAMPLES]
    ptq = api.compile(model, config=cfg, calib=calib)
    if not ptq.ctx.layers:
        raise QcompileError(f"{model}: no layer is quantized under config {cfg.name} (see `qcompile inspect`); "
                            "nothing to fine-tune")
    from qcompile.finetune.convert import to_torch

    teacher = to_torch(ptq.float_model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_student(ptq.float_model, ptq, cfg, learn_clip=learn_clip, gbits=gbits)
    generators = []
    if gbits:
        for i, layer in enumerate(quant_layers(student).values()):
            layer.grad_generator = torch.Generator().manual_seed(seed * 1000 + i)
            generators.append(layer.grad_generator)

    trainer = Trainer(student, teacher, train_ds, val_ds, opts, probabilities=_ends_in_softmax(proto),
                      grad_generators=generators, log=log, progress=progress, dist=dist)
    float_acc = trainer.evaluate(val_ds, teacher)
    if saved is not None:
        trainer.load_state(saved["state"])
        ptq_acc = saved["ptq_val_acc"]
        log(f"resumed from {ckpt_path} at step {trainer.step} (epoch {trainer.epoch + 1}, batch "
            f"{trainer.batch_in_epoch})")
    else:
        ptq_acc = trainer.evaluate(val_ds)
    _log_start(log, cfg, train_ds, val_ds, opts, trainer, float_acc, ptq_acc)

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, **fingerprint, "ptq_val_acc": ptq_acc, "float_val_acc": float_acc,
                "state": trainer.state()}

    def save_checkpoint() -> None:
        if ckpt_path is not None and dist.is_main:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(checkpoint(), ckpt_path)

    def on_epoch_end(tr: Trainer, rec) -> None:
        log(_epoch_line(rec, tr.epochs, float_acc))
        save_checkpoint()

    def on_step(tr: Trainer) -> None:
        if checkpoint_every and tr.step % checkpoint_every == 0:
            save_checkpoint()

    train_seconds = fit_with_checkpoints(trainer, on_epoch_end, on_step, _stop_after_steps, save_checkpoint,
                                         ckpt_path, dist)
    if not dist.is_main:
        return None

    compiled, trained_float = export(ptq.float_model, student, cfg, source, source_sha)
    check_x = (val_ds or train_ds).x[:256]
    agreement = check_export(compiled.model, student, check_x)
    last = trainer.history.epochs[-1] if trainer.history.epochs else None
    final_acc = last.val_acc if last is not None and last.steps == trainer.step else trainer.evaluate(val_ds)
    report = {
        "source": source, "source_sha256": source_sha, "config": cfg.to_dict(),
        "options": opts.fingerprint(), "train_data": train_ds.describe, "train_n": len(train_ds),
        "val_data": val_ds.describe if val_ds is not None else None, "val_n": len(val_ds) if val_ds else 0,
        "float_val_acc": float_acc, "ptq_val_acc": ptq_acc, "finetuned_val_acc": final_acc,
        "steps": trainer.step, "epochs": trainer.epochs, "train_seconds_this_run": round(train_seconds, 2),
        "history": trainer.history.to_dict(), "export_check": agreement,
        "layers": compiled.report["layers"], "kept_float_weighted": compiled.report["kept_float_weighted"],
        "totals": compiled.report["totals"], "cpu": model_name(),
    }
    return FinetuneResult(source, cfg, opts, compiled, trained_float, checkpoint(), report)


def output_folder(out, resume: bool):
    """(checkpoint path or None, the saved checkpoint to resume or None): -o must be a new or empty folder, or
    hold a checkpoint when resuming."""
    ckpt_path = Path(out) / CHECKPOINT if out is not None else None
    saved = None
    if out is not None:
        out_p = Path(out)
        if out_p.exists() and not out_p.is_dir():
            raise QcompileError(f"{out_p}: exists and is not a folder; choose another -o")
        if resume:
            if not ckpt_path.is_file():
                raise QcompileError(f"{ckpt_path}: no checkpoint to resume from; run without --resume first")
            saved = _load_checkpoint(ckpt_path)
        elif ckpt_path.is_file():
            raise QcompileError(f"{out_p}: holds a fine-tuning checkpoint; pass --resume to continue it or choose "
                                "another -o")
        elif out_p.is_dir() and any(out_p.iterdir()):
            raise QcompileError(f"{out_p}: exists and is not empty; choose another -o")
    elif resume:
        raise QcompileError("--resume needs the output folder (-o) that holds the checkpoint")
    return ckpt_path, saved


def fit_with_checkpoints(trainer, on_epoch_end, on_step, stop_after_steps, save_checkpoint, ckpt_path,
                         dist=None) -> float:
    """trainer.fit, where Ctrl-C or SIGTERM saves a checkpoint and raises Interrupted, and (with several ranks) a
    failed peer becomes PeerFailure's one line. Returns the seconds it trained."""
    start = time.perf_counter()
    try:
        with _interrupt_as_keyboard():
            trainer.fit(on_epoch_end, stop_after_steps=stop_after_steps, on_step=on_step)
    except KeyboardInterrupt:
        if ckpt_path is None:
            raise Interrupted(f"interrupted at step {trainer.step}; nothing saved (no output folder)") from None
        save_checkpoint()
        raise Interrupted(f"interrupted at step {trainer.step} of {trainer.total_steps}; checkpoint saved to "
                          f"{ckpt_path}; continue with --resume") from None
    except Exception as exc:  # noqa: BLE001 - only a failed peer is turned into one line; the rest propagates
        why = dist.failure(exc) if dist is not None else None
        if why is None:
            raise
        from qcompile.finetune.distributed import PeerFailure

        raise PeerFailure(why) from None
    return time.perf_counter() - start


def _load_checkpoint(path: Path) -> dict:
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file
        raise QcompileError(f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0][:100]})") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise QcompileError(f"{path}: not a qcompile fine-tuning checkpoint")
    return saved


def _check_resume(saved: dict, now: dict, path: Path) -> None:
    """--resume only continues the same run: the model, config and options must be those it was trained with."""
    if saved["source_sha256"] != now["source_sha256"]:
        raise QcompileError(f"{path}: was trained from a different model file; resume with the same model")
    for section in ("config", "options"):
        for key, value in now[section].items():
            was = saved[section].get(key)
            if json.dumps(was) != json.dumps(value):  # tuples and lists alike
                raise QcompileError(f"{path}: was trained with {key}={was!r}, this run asks {key}={value!r}; "
                                    "resume with the same settings")
    for key in ("train", "train_n"):
        if saved[key] != now[key]:
            raise QcompileError(f"{path}: was trained on {saved['train']} ({saved['train_n']} samples), this run "
                                f"reads {now['train']} ({now['train_n']}); resume with the same data")


class _interrupt_as_keyboard:
    """SIGTERM (a scheduler's stop) behaves like Ctrl-C: checkpoint, then stop."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _log_start(log, cfg, train_ds: Dataset, val_ds, opts, trainer, float_acc, ptq_acc) -> None:
    log(f"fine-tuning W{cfg.bits_w}A{cfg.bits_a} {cfg.quantizer}: {len(train_ds)} training samples "
        f"({train_ds.describe}), {trainer.steps_per_epoch} steps/epoch x {trainer.epochs} epochs "
        f"= {trainer.total_steps} steps, batch {opts.batch}, lr {opts.lr:g}"
        + (f", {opts.gbits}-bit gradients" if opts.gbits else "")
        + (", distillation from the float model" if trainer.use_teacher else ""))
    if val_ds is not None:
        log(f"validation ({len(val_ds)} samples): float {percent(float_acc)}, post-training {percent(ptq_acc)}")


def _epoch_line(rec, epochs: int, float_acc) -> str:
    return (f"epoch {rec.epoch}/{epochs}  loss {rec.loss:.4f}  train {percent(rec.train_acc)}  "
            f"val {percent(rec.val_acc)}  (float {percent(float_acc)})  {rec.images_per_s:,.0f} img/s  {rec.seconds:.1f} s")
