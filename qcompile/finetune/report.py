"""The fine-tuning report: Markdown and a PNG of the loss and accuracy curves."""

from __future__ import annotations

import io


def percent(v) -> str:
    """An accuracy as a percentage, '-' when there is none (no labels)."""
    return "-" if v is None else f"{v:.2%}"



def to_markdown(report: dict) -> str:
    cfg = report["config"]
    opts = report["options"]
    lines = [
        f"# Fine-tuning report: {report['source']}", "",
        f"W{cfg['bits_w']}A{cfg['bits_a']}, quantizer `{cfg['quantizer']}`, {report['steps']} steps "
        f"({report['epochs']} epochs) of batch {opts['batch']}, lr {opts['lr']:g}"
        + (f", {opts['gbits']}-bit gradients" if opts.get("gbits") else "")
        + (", distillation" if opts.get("distill") else "") + f"; CPU: {report.get('cpu', '?')}", "",
        f"Training data: {report['train_data']} ({report['train_n']} samples); validation: "
        f"{report['val_data'] or 'none'} ({report['val_n']} samples).", "",
        "| model | validation top-1 |", "|---|---:|",
        f"| float | {percent(report['float_val_acc'])} |",
        f"| post-training quantized | {percent(report['ptq_val_acc'])} |",
        f"| fine-tuned quantized | {percent(report['finetuned_val_acc'])} |", "",
        "## Epochs", "", "| epoch | steps | loss | train top-1 | val top-1 | images/s | seconds | lr |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["history"]["epochs"]:
        lines.append(f"| {e['epoch']} | {e['steps']} | {e['loss']:.4f} | {percent(e['train_acc'])} | "
                     f"{percent(e['val_acc'])} | {e['images_per_s']:,.0f} | {e['seconds']:.1f} | {e['lr']:.2e} |")
    chk = report["export_check"]
    lines += ["", "## Export", "",
              f"model.onnx (fake-quant) against the trained torch model on {chk['n']} inputs: max |difference| "
              f"{chk['max_abs_diff']:.3g}, same top-1 class {percent(chk['argmax_agreement'])}. "
              "Compile it with `qcompile compile model.onnx --target cpu`: the trained parameters are kept.", "",
              "| layer | op | bits | entropy (bits) | act clip |", "|---|---|---|---:|---:|"]
    for r in report["layers"]:
        lines.append(f"| {r['node']} | {r['op']} | W{r['bits_w']}A{r['bits_a']} | {r['entropy_bits']} | "
                     f"{r['act_clip']:.4g} |")
    return "\n".join(lines) + "\n"


def curves_png(report: dict) -> bytes:
    """Loss per step (and its running mean) and validation accuracy per epoch against float and post-training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    hist = report["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = np.asarray(hist["step_loss"], float)
    if loss.size:
        ax1.plot(np.arange(1, loss.size + 1), loss, lw=0.6, alpha=0.4, label="step")
        k = max(1, loss.size // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax1.plot(np.arange(k, loss.size + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    points = hist.get("val_points") or [[e["steps"], e["val_acc"]] for e in hist["epochs"]]
    points = [p for p in points if p[1] is not None]
    if points and report["ptq_val_acc"] is not None:
        steps, acc = zip(*([[0, report["ptq_val_acc"]]] + points))
        ax2.plot(steps, acc, "o-", label="quantized (step 0: post-training)")
        for e in hist["epochs"][:-1]:
            ax2.axvline(e["steps"], color="0.8", lw=0.8)
        if report["float_val_acc"] is not None:
            ax2.axhline(report["float_val_acc"], color="k", ls="--", lw=1, label="float")
        ax2.set_ylabel("validation top-1")
        ax2.legend(loc="lower right")
    ax2.set_xlabel("step (grey lines: epoch ends)")
    cfg = report["config"]
    fig.suptitle(f"{report['source']}: W{cfg['bits_w']}A{cfg['bits_a']} {cfg['quantizer']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
