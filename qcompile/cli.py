"""The `qcompile` command line: compile, inspect, eval, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qcompile.errors import QcompileError

QUANTIZER_CHOICES = click.Choice(["balanced", "balanced-mean", "dorefa", "rnn-balanced", "uniform", "uniform-percentile",
                                  "xnor"])


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


def _progress():
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                    transient=True, disable=not sys.stderr.isatty())


class _Group(click.Group):
    """Any exception that is not a QcompileError is a bug: one line saying so, not a traceback (--debug shows it)."""

    def invoke(self, ctx):
        # click >= 8.2 keeps the subcommand and its arguments in _protected_args (protected_args is deprecated)
        head = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
        argv = [*head, *ctx.args]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit, KeyboardInterrupt):
            raise
        except QcompileError as exc:  # a command that let one through: still one line
            if ctx.params.get("debug"):
                raise
            _fail(exc)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            if ctx.params.get("debug"):
                raise
            command = ctx.invoked_subcommand or (argv[0] if argv else "")
            where = next((a for a in argv[1:] if not a.startswith("-")), "")
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            click.echo(f"error: internal error in `qcompile {command}`{f' on {where}' if where else ''}: "
                       f"{type(exc).__name__}: {first} (rerun with --debug for the traceback, and please report it)",
                       err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcompile", prog_name="qcompile")
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def main(debug):
    """qcompile: quantize ONNX models to 1-4 bits and compile them to bitwise kernels."""


def quant_options(f):
    f = click.option("--config", "preset", default="w2a2", show_default=True,
                     help="Preset w1a1|w1a2|w2a2|w2a4|w4a4|w2a8|w4a8|w8a4|w8a8, or a .toml file.")(f)
    f = click.option("--quantizer", type=QUANTIZER_CHOICES, help="Weight quantizer (default: the preset's).")(f)
    f = click.option("--keep-float", multiple=True, metavar="GLOB", help="Node names kept in float.")(f)
    f = click.option("--quantize", "force", multiple=True, metavar="GLOB",
                     help="Node names quantized even if first/last.")(f)
    f = click.option("--per-tensor", is_flag=True, help="One weight scale per layer instead of per channel.")(f)
    f = click.option("--rounding", type=click.Choice(["nearest", "gptq"]),
                     help="Weight rounding: nearest level, or GPTQ (levels chosen for the layer's output error on "
                          "the calibration data).")(f)
    return f


fix_input_option = click.option(
    "--fix-input", multiple=True, metavar="NAME=VALUE",
    help="Fix a model input to a constant (e.g. sr=16000): the If branches and shapes it selects are folded, so "
         "their layers can be quantized; the compiled model no longer takes that input.")


def _overrides(quantizer, keep_float, force, per_tensor, rounding=None) -> dict:
    return {"quantizer": quantizer, "keep_float": keep_float or None, "quantize": force or None,
            "per_channel": False if per_tensor else None, "weight_rounding": rounding}


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@quant_options
@click.option("--calib", type=click.Path(dir_okay=False), help="Calibration inputs (.npz with array x).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (atomic write).")
@click.option("--target", type=click.Choice(["cpu", "cpu:avx2", "cpu:generic", "gpu", "gpu:sm_80", "gpu:sm_90", "fpga"]),
              help="Also build a deployable artifact for this target (bitwise kernels; fpga: an HLS/RTL project).")
@click.option("--part", default="xc7z020", show_default=True, help="fpga: the FPGA part (its LUT/BRAM/DSP budget).")
@click.option("--fps", type=float, help="fpga: target frames per second (default: the cheapest folding).")
@click.option("--autotune", is_flag=True, help="Time each layer's kernel candidates and keep the fastest.")
@click.option("--kernel", type=click.Choice(["bitserial", "int8", "float"]),
              help="Use this kernel for every quantized layer instead of the planner's choice.")
@click.option("--plan-batch", default=64, show_default=True, help="Batch size the planner optimizes for.")
@fix_input_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--verify", is_flag=True, help="Check the model after every pass (debug).")
@click.option("--dump-dir", type=click.Path(file_okay=False), help="Save the model after every pass here.")
def compile_cmd(model, preset, quantizer, keep_float, force, per_tensor, rounding, calib, out, target, part, fps,
                autotune, kernel, plan_batch, fix_input, as_json, verify, dump_dir):
    """Quantize MODEL into OUT: fake-quant model.onnx, report.json/.md, weights.png; with --target, also a
    deployable artifact (manifest.json, kernels/, partitions/) that `qcompile run` and the runtime load."""
    from qcompile import api, report

    try:
        from qcompile.passes.load import parse_fixed_inputs

        fixed = parse_fixed_inputs(fix_input)
        options = None
        if target == "fpga":
            target, options = f"fpga:{part}", {"fps": fps}
        with _progress() as prog:
            task = prog.add_task("compiling", total=None)
            result = api.compile(model, config=preset, calib=calib, verify=verify, dump_dir=dump_dir, fix_inputs=fixed,
                                 target=target, target_options=options, autotune=autotune, kernel=kernel,
                                 plan_batch=plan_batch,
                                 progress=lambda name: prog.update(task, description=name),
                                 **_overrides(quantizer, keep_float, force, per_tensor, rounding))
            prog.update(task, description="writing")
            result.save(out)
    except QcompileError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result.report, indent=2))
    else:
        report.print_report(result.report)
        if result.manifest is not None:
            report.print_plan(result.manifest["plan"])
            if target.startswith("fpga"):
                click.echo(f"wrote FPGA project {Path(out) / 'fpga'} (report.md; hls/csim.sh, hls/run_hls.tcl)")
            else:
                click.echo(f"wrote artifact {out} (run it: qcompile run {out} --input x.npy)")
        else:
            click.echo(f"wrote {Path(out) / 'model.onnx'} and the report")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@quant_options
@fix_input_option
@click.option("--json", "as_json", is_flag=True)
def inspect(model, preset, quantizer, keep_float, force, per_tensor, rounding, fix_input, as_json):
    """Each op of MODEL: quantized or kept in float, and why."""
    from rich.console import Console
    from rich.table import Table

    from qcompile import api

    try:
        from qcompile.passes.load import parse_fixed_inputs

        rows = api.inspect(model, config=preset, fix_inputs=parse_fixed_inputs(fix_input),
                           **_overrides(quantizer, keep_float, force, per_tensor, rounding))
    except QcompileError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{Path(model).name}: plan")
    for col in ("node", "op", "status", "why"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["node"], r["op"], r["status"], r["why"])
    Console().print(table)


@main.command("eval")
@click.argument("float_model", type=click.Path(dir_okay=False))
@click.argument("quant_model", type=click.Path())
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help=".npz with x and y; for a language model an .npz with tokens, or kjv:test.")
@click.option("--seq-len", default=35, show_default=True, help="Language models: tokens per window.")
@click.option("--batch", default=10, show_default=True, help="Language models: stream columns.")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(float_model, quant_model, data, seq_len, batch, as_json):
    """Top-1 accuracy of FLOAT_MODEL and QUANT_MODEL on DATA, and how often they agree; for a recurrent language
    model, their perplexity on the token stream DATA (qcompile.lm.perplexity: --batch columns, windows of
    --seq-len, states carried).

    QUANT_MODEL is a fake-quant .onnx or a compiled artifact folder (then the deployed kernels are evaluated)."""
    from qcompile import evaluate
    from qcompile.lm import is_language_model

    if is_language_model(float_model):
        try:
            res = _eval_lm(float_model, quant_model, data, seq_len, batch)
        except QcompileError as exc:
            _fail(exc)
        if as_json:
            click.echo(json.dumps(res))
        else:
            click.echo(f"n={res['n_tokens']} tokens  float perplexity {res['float_ppl']:.2f}  quantized perplexity "
                       f"{res['quant_ppl']:.2f} ({res['quant_ppl'] / res['float_ppl'] - 1:+.1%})")
        return
    try:
        x, y = evaluate.load_labelled(data)
        res = evaluate.compare(float_model, quant_model, x, y)
    except QcompileError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(res))
    else:
        click.echo(f"n={res['n']}  float top-1 {res['float_top1']:.2%}  quantized top-1 {res['quant_top1']:.2%}  "
                   f"agreement {res['agreement']:.2%}")


def _eval_lm(float_model, quant_model, data, seq_len: int, batch: int) -> dict:
    """Perplexity of a language model and its quantized form (a fake-quant .onnx or an artifact folder)."""
    from qcompile import lm
    from qcompile.finetune.data import open_tokens

    tokens = open_tokens(data, name="eval").tokens
    session, quant = None, quant_model
    if Path(quant_model).is_dir():
        from qcompile.runtime import InferenceSession

        session, quant = InferenceSession(quant_model), str(Path(quant_model) / "fakequant.onnx")
    elif not Path(quant_model).is_file():
        raise QcompileError(f"{quant_model}: no such model file or artifact folder")
    return {"n_tokens": int(len(tokens)), "seq_len": seq_len, "batch": batch,
            "float_ppl": lm.perplexity(float_model, tokens, seq_len=seq_len, batch=batch),
            "quant_ppl": lm.perplexity(quant, tokens, seq_len=seq_len, batch=batch, session=session)}


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--input", "inputs", multiple=True, required=True, metavar="[NAME=]FILE.npy",
              help="Input array (.npy); NAME= is needed only for models with several inputs.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Save the outputs here (.npz).")
@click.option("--json", "as_json", is_flag=True)
def run(artifact, inputs, output, as_json):
    """Run a compiled ARTIFACT on inputs from .npy files."""
    import numpy as np

    from qcompile.runtime import InferenceSession

    try:
        sess = InferenceSession(artifact)
        from qcompile.fileio import read_input_files

        feeds = read_input_files(inputs, [i.name for i in sess.get_inputs()])
        outs = sess.run(None, feeds)
    except QcompileError as exc:
        _fail(exc)
    out_names = [o.name for o in sess.get_outputs()]
    if output:
        np.savez(output, **dict(zip(out_names, outs)))
    if as_json:
        click.echo(json.dumps({n: o.tolist() for n, o in zip(out_names, outs)}))
        return
    for n, o in zip(out_names, outs):
        summary = f"argmax {o.argmax(axis=-1).tolist()}" if o.ndim == 2 and o.shape[0] <= 16 else ""
        click.echo(f"{n}: {o.dtype} {list(o.shape)} {summary}")
    if output:
        click.echo(f"saved {output}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--batch", default=64, show_default=True, help="Batch size of the timed inputs.")
@click.option("--runs", default=30, show_default=True, help="Timed runs per engine.")
@click.option("--input", "inputs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Time on these inputs (.npy) instead of synthetic ones of --batch.")
@click.option("--json", "as_json", is_flag=True)
def bench(artifact, batch, runs, inputs, as_json):
    """Latency p50/p90 and throughput of ARTIFACT against its source model on onnxruntime fp32 and int8."""
    from qcompile import benchmark

    try:
        rows = benchmark.bench_artifact(artifact, batch=batch, runs=runs, input_files=inputs)
    except QcompileError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        benchmark.print_table(rows, f"{Path(artifact).name}, batch {rows[0]['batch']}")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Device folder (atomic write).")
@click.option("--no-strip", is_flag=True, help="Keep the kernel library's symbol table.")
def pack(artifact, out, no_strip):
    """Copy only what a device runs (manifest, deploy.onnx, kernel library) from ARTIFACT into OUT."""
    from qcompile import artifact as artifact_mod

    try:
        manifest = artifact_mod.pack(artifact, out, strip=not no_strip)
    except QcompileError as exc:
        _fail(exc)
    total = sum((Path(out) / rel).stat().st_size for rel in [*manifest["files"], "manifest.json"])
    click.echo(f"wrote {out}: {', '.join(manifest['files'])} and manifest.json, {total / 1024:.0f} KiB")


@main.command("export-qonnx")
@click.argument("model", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="QONNX .onnx file to write.")
def export_qonnx_cmd(model, out):
    """Write MODEL (a compile output folder or its fake-quant model.onnx) as QONNX (Quant / BipolarQuant) for FINN."""
    from qcompile.targets.fpga.qonnx_export import export_qonnx

    try:
        counts = export_qonnx(model, out)
    except QcompileError as exc:
        _fail(exc)
    click.echo(f"wrote {out}: " + ", ".join(f"{n} {op}" for op, n in counts.items() if n))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@quant_options
@click.option("--data", default="fashion-mnist", show_default=True, metavar="DATA",
              help="Training data: .npz (x, y), a folder of images by class, or fashion-mnist[:train|:test]; for a "
                   "recurrent language model a token stream: .npz with tokens, kjv (the bundled sample's train "
                   "tokens) or kjv:train (the whole split, needs the Debian bible-kjv corpus).")
@click.option("--val", metavar="DATA", help="Validation data (default: 10% of --data, at most 5,000, held out).")
@click.option("--epochs", type=int, help="Passes over the training data (default 2).")
@click.option("--steps", type=int, help="Optimizer steps in all (instead of --epochs).")
@click.option("--batch", default=64, show_default=True, help="Batch size (language models: stream columns).")
@click.option("--seq-len", type=int, help="Language models: tokens per truncated-BPTT window (default 35).")
@click.option("--lr", default=3e-4, show_default=True, help="Adam learning rate (cosine decay to 0).")
@click.option("--gbits", type=click.IntRange(1, 8), help="DoReFa stochastic gradient quantization to G bits.")
@click.option("--distill/--no-distill", default=None,
              help="Train against the float model's outputs (the default when the data has no labels).")
@click.option("--learn-clip", is_flag=True, help="Train the activation clips too (PACT/LSQ-style).")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in -o, exactly.")
@click.option("--checkpoint-every", type=int, metavar="N", help="Also checkpoint every N steps (always: each epoch).")
@click.option("--nproc", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Data-parallel processes on this machine (--batch is the global batch). Across machines, start "
                   "`torchrun ... -m qcompile finetune ...` on each instead.")
@click.option("--allreduce", type=click.Choice(["hfreduce", "ddp"]), default="hfreduce", show_default=True,
              help="Gradient allreduce with several processes: HFReduce (host shared memory + tree) or DDP's own.")
@click.option("--sim-nodes", type=int, metavar="K",
              help="Treat this machine's processes as K nodes (HFReduce's inter-node path on one machine).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: model.onnx, float.onnx, checkpoint.pt, report.json/.md, curves.png.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON at the end.")
def finetune(model, preset, quantizer, keep_float, force, per_tensor, rounding, data, val, epochs, steps, batch, seq_len,
             lr, gbits, distill, learn_clip, seed, resume, checkpoint_every, nproc, allreduce, sim_nodes, out, as_json):
    """Quantization-aware fine-tuning of MODEL at --config, starting from its post-training quantization.

    Writes a fake-quant model.onnx that `qcompile compile OUT/model.onnx --target cpu` compiles with the trained
    quantizer parameters as they are. Ctrl-C saves a checkpoint; --resume continues it."""
    import os

    if sim_nodes is not None:
        os.environ["QCOMPILE_SIM_NODES"] = str(sim_nodes)   # read by every rank's HFReduce topology
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from qcompile.finetune.distributed import launch

        try:
            sys.exit(launch(_without_option(sys.argv[1:], "--nproc"), nproc))
        except QcompileError as exc:
            _fail(exc)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    try:
        from qcompile.finetune.api import finetune as run_finetune

        with progress:
            result = run_finetune(model, config=preset, data=data, val=val, epochs=epochs, steps=steps, batch=batch,
                                  lr=lr, gbits=gbits, distill=distill, seed=seed, learn_clip=learn_clip,
                                  resume=resume, out=out, log=progress.console.print if progress.console else print,
                                  allreduce=allreduce, checkpoint_every=checkpoint_every, seq_len=seq_len,
                                  progress=progress, **_overrides(quantizer, keep_float, force, per_tensor, rounding))
        if result is None:  # a rank other than 0 of a data-parallel job: rank 0 writes and reports
            return
        result.save(out)
    except QcompileError as exc:
        from qcompile.finetune.distributed import PeerFailure
        from qcompile.finetune.loop import Interrupted

        click.echo(f"error: {exc}", err=True)
        if isinstance(exc, PeerFailure):  # a peer is gone: gloo's teardown could hang, so leave at once
            sys.stderr.flush()
            os._exit(1)
        sys.exit(130 if isinstance(exc, Interrupted) else 1)
    except KeyboardInterrupt:  # a second Ctrl-C while saving
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    r = result.report
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    if r.get("task") == "language-model":
        click.echo(f"validation perplexity: float {r['float_val_ppl']:.2f}, post-training {r['ptq_val_ppl']:.2f}, "
                   f"fine-tuned {r['finetuned_val_ppl']:.2f}" if r["float_val_ppl"] is not None else
                   "no validation tokens: perplexity not measured")
    else:
        click.echo(f"validation top-1: float {r['float_val_acc']:.2%}, post-training {r['ptq_val_acc']:.2%}, "
                   f"fine-tuned {r['finetuned_val_acc']:.2%}" if r["float_val_acc"] is not None else
                   "no labelled validation data: accuracy not measured")
    click.echo(f"wrote {out}/model.onnx (compile it: qcompile compile {out}/model.onnx --target cpu -o ART), "
               "float.onnx, checkpoint.pt, report.md, curves.png")


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the launcher's own option, which its ranks must not see)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


@main.command()
@click.option("-o", "--out", default="demo-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", "preset", default="w1a2", show_default=True)
@click.option("--quantizer", type=QUANTIZER_CHOICES, default="dorefa", show_default=True,
              help="Weight quantizer (DoReFa fine-tunes best at W1A2: bench/RESULTS.md, Fine-tuning).")
@click.option("--steps", default=600, show_default=True, help="Fine-tuning steps.")
def demo(out, preset, quantizer, steps):
    """The whole job on the bundled Fashion-MNIST CNN: post-training quantization, a short fine-tune, the CPU
    artifact, its accuracy against float and its speed against onnxruntime fp32 and int8."""
    from qcompile import demo as demo_mod

    try:
        demo_mod.run(out, preset, quantizer, steps=steps)
    except QcompileError as exc:
        _fail(exc)


@main.command()
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu", "cpu:avx2", "cpu:generic"]))
@click.option("--recalibrate", is_flag=True, help="Measure again (e.g. after the first run met a loaded machine).")
@click.option("--json", "as_json", is_flag=True)
def machine(target, recalibrate, as_json):
    """This CPU's measured kernel speeds, which the planner's cost model uses (measured once, cached)."""
    from rich.console import Console
    from rich.table import Table

    from qcompile.targets.cpu.caps import detect, model_name
    from qcompile.targets.cpu.profile import machine_profile, profile_path

    caps = detect(target)
    prof = machine_profile(caps, refresh=recalibrate)
    if prof is None:
        _fail(QcompileError("no profile: QCOMPILE_PLANNER=design, or the probe kernels could not be built here"))
    if as_json:
        click.echo(json.dumps(prof.to_json(), indent=2))
        return
    units = {"bit": "G binary MAC/s per plane pair", "int8": "G MAC/s", "float": "G MAC/s"}
    table = Table(title=f"{model_name()}, {caps.path} path, {caps.cores} cores ({profile_path(caps)})")
    for col in ("candidate", "per call", "rate", "unit"):
        table.add_column(col, justify="left" if col in ("candidate", "unit") else "right")
    for key in sorted(prof.rate):
        unit = "G lookups/s per weight plane" if key.endswith(":lut") else units[key.split(":")[0]]
        table.add_row(key, f"{prof.call_ms[key] * 1e3:.1f} us", f"{prof.rate[key] / 1e9:.1f}", unit)
    Console().print(table)


if __name__ == "__main__":
    main()
