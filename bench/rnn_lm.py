"""Quantized recurrent language models: post-training and fine-tuned perplexity of the bundled KJV LSTM and GRU.

    python bench/rnn_lm.py --float-reference [--epochs 2] [--write]  # the whole table (RESULTS.md gives the time)
    python bench/rnn_lm.py --only gru:w2a2:balanced --steps 300   # one case (rows accumulate in rnn_lm_results.json)
    python bench/rnn_lm.py --write --table-only                   # the section from the stored rows

Fine-tunes with `qcompile.finetune` (truncated BPTT, windows of --seq-len, --batch columns, Adam, cosine decay) on
the whole KJV train split (`kjv:train`: read from the Debian bible-kjv corpus exactly as models/train_lm.py does,
801,903 tokens; the bundled sample's 16k calibration tokens are only enough for the tests), validating on the
first 5,000 tokens of the valid split, and scores every model with onnxruntime (`qcompile.lm.perplexity`: 10
columns, windows of 35, states carried) on the shipped held-out test sample (models/kjv_lm_sample.npz `tokens`,
29,929 tokens): float, the post-training fake-quant model of `compile` (calibrated on the train split), and the
fine-tuned model.onnx. Goals (issue 13): fine-tuned W4A4 within 3 % of float perplexity, W2A2 within 10 %.
--write replaces the "## Quantized recurrent language models" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

from _common import cpu_name, load_average, publish

HEADING = "## Quantized recurrent language models"
ROWS = Path(__file__).parent / "rnn_lm_results.json"
GOALS = {"w4a4": 0.03, "w2a2": 0.10}
CELLS, CONFIGS, QUANTIZERS = ("lstm", "gru"), ("w4a4", "w2a2"), ("balanced", "uniform")


def _load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_case(cell: str, config: str, quantizer: str, args, train, valid, test) -> dict:
    from qcompile import api, datasets, lm
    from qcompile.finetune.api import finetune
    from qcompile.finetune.recurrent import StreamReader

    path = datasets.bundled_lm(cell)
    sig = lm.lm_signature(path)
    ptq = api.compile(path, config=config, quantizer=quantizer, calib=StreamReader(train, sig))
    start = time.perf_counter()
    ft = finetune(path, config=config, quantizer=quantizer, data=train, val=valid, epochs=args.epochs,
                  steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, distill=args.distill, learn_clip=args.learn_clip,
                  log=lambda s: print("   ", s, flush=True))
    seconds = time.perf_counter() - start
    row = {"cell": cell, "config": config, "quantizer": quantizer,
           "float": lm.perplexity(ptq.float_model, test), "ptq": lm.perplexity(ptq.model, test),
           "finetuned": lm.perplexity(ft.model, test), "steps": ft.report["steps"], "batch": args.batch,
           "seq_len": args.seq_len, "lr": args.lr, "distill": bool(args.distill), "learn_clip": bool(args.learn_clip), "train_tokens": len(train),
           "valid_finetuned": ft.report["finetuned_val_ppl"], "seconds": round(seconds, 1),
           "tokens_per_s": ft.report["steps"] * args.batch * args.seq_len / max(seconds, 1e-9),
           "export_rel_diff": ft.report["export_check"].get("rel_diff"), "threads": args.threads,
           "date": datetime.date.today().isoformat(), "cpu": cpu_name()}
    print(f"{cell} {config} {quantizer:9s}: float {row['float']:.2f} post {row['ptq']:.2f} fine-tuned "
          f"{row['finetuned']:.2f} ({row['finetuned'] / row['float'] - 1:+.1%})  {seconds:.0f} s", flush=True)
    return row


def float_reference(cell: str, args, train, valid, test) -> dict:
    """The float model trained with the same loop and budget (nothing quantized): how much of the fine-tuned
    models' gain is extra training rather than recovered quantization loss. Scored in torch (equal to onnxruntime
    in float to ~1e-7)."""
    import torch

    from qcompile import datasets, lm
    from qcompile.finetune.convert import to_torch
    from qcompile.finetune.data import TokenStream
    from qcompile.finetune.loop import TrainOptions
    from qcompile.finetune.recurrent import LMTrainer
    from qcompile.passes.load import load_model

    path = datasets.bundled_lm(cell)
    sig = lm.lm_signature(path)
    torch.manual_seed(0)
    student = to_torch(load_model(path))
    opts = TrainOptions(epochs=args.epochs or 2, steps=args.steps, batch=args.batch, lr=args.lr, seq_len=args.seq_len)
    trainer = LMTrainer(student, None, train, valid, opts, sig=sig, log=lambda s: print("   ", s, flush=True))
    start = time.perf_counter()
    trainer.fit(lambda tr, rec: print(f"    epoch {rec.epoch}: val perplexity {rec.val_acc:.2f}", flush=True))
    seconds = time.perf_counter() - start
    stream = TokenStream(test, name="test")
    row = {"cell": cell, "config": "float", "quantizer": "trained", "float": lm.perplexity(path, test),
           "ptq": lm.perplexity(path, test), "finetuned": trainer.evaluate(stream), "steps": trainer.step,
           "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "distill": False, "learn_clip": False,
           "train_tokens": len(train), "valid_finetuned": trainer.evaluate(valid), "seconds": round(seconds, 1),
           "tokens_per_s": trainer.step * args.batch * args.seq_len / max(seconds, 1e-9), "export_rel_diff": 0.0,
           "threads": args.threads, "date": datetime.date.today().isoformat(), "cpu": cpu_name()}
    print(f"{cell} float trained: {row['float']:.2f} -> {row['finetuned']:.2f}", flush=True)
    return row


def table(rows: dict) -> str:
    if not rows:
        return f"{HEADING}\n\n(no runs yet)\n"
    any_row = next(iter(rows.values()))
    lines = [HEADING, "",
             f"{any_row['date']}, {any_row['cpu']}, {any_row['threads']} training thread(s) on the shared 2-core "
             f"machine, load at the end {load_average()}; `python bench/rnn_lm.py --write`. Perplexity of the "
             "bundled KJV LMs (Embedding 128 -> LSTM/GRU 200 -> Linear 5000) with onnxruntime on the shipped test "
             "sample (29,929 tokens; `qcompile.lm.perplexity`, 10 columns, windows of 35, states carried). Only the "
             "recurrent layer is quantized (W and R per gate row; x_t on the calibrated affine grid; h, and the "
             "GRU's candidate, on the [-1, 1] grid; LSTM cell state float); the embedding and the output layer stay "
             "float (the only Conv/Gemm/MatMul is both first and last). `post` = compile's post-training model "
             "(calibrated on 8 windows of 35 x 8 train tokens), `tuned` = finetune's model.onnx (truncated BPTT on "
             "the 801,903-token train split, the embedding, LSTM/GRU and output layer all trained, Adam, cosine "
             "decay, gradient norm clipped to 1; budget per row below; the two cells ran as two processes side by side, "
             "about 35 minutes in all). Goals: tuned W4A4 within 3 % of float "
             "perplexity, W2A2 within 10 %.", "",
             "| model | config | float | balanced post / tuned | uniform post / tuned |", "|---|---|---:|---:|---:|"]
    for cell in CELLS:
        for config in CONFIGS:
            cells, flt = [], None
            for q in QUANTIZERS:
                r = rows.get(f"{cell}:{config}:{q}")
                if r is None:
                    cells.append("-")
                    continue
                flt = r["float"]
                cells.append(f"{r['ptq']:.2f} / **{r['finetuned']:.2f}** ({r['finetuned'] / r['float'] - 1:+.1%})")
            if flt is not None:
                lines.append(f"| {cell} | {config} | {flt:.2f} | " + " | ".join(cells) + " |")
        ref = rows.get(f"{cell}:float:trained")
        if ref:
            lines.append(f"| {cell} | float, trained with the same budget | {ref['float']:.2f} | "
                         f"**{ref['finetuned']:.2f}** ({ref['finetuned'] / ref['float'] - 1:+.1%}) | |")
    lines += ["", "Goals (best quantizer of the row against float):", ""]
    for cell in CELLS:
        for config in CONFIGS:
            cand = [r for k, r in rows.items() if k.startswith(f"{cell}:{config}:")]
            if not cand:
                continue
            best = min(cand, key=lambda r: r["finetuned"])
            gap = best["finetuned"] / best["float"] - 1
            goal = GOALS[config]
            ref = rows.get(f"{cell}:float:trained")
            also = (f"; against the float model trained with the same budget ({ref['finetuned']:.2f}): "
                    f"{best['finetuned'] / ref['finetuned'] - 1:+.1%}" if ref else "")
            lines.append(f"- {cell} {config}: best {best['quantizer']} {best['finetuned']:.2f} vs float "
                         f"{best['float']:.2f}: {gap:+.1%} (goal: within {goal:.0%}) -> "
                         f"**{'met' if gap <= goal else 'not met'}**{also}")
    if any(k.endswith(":float:trained") for k in rows):
        lines += ["", "Read the goals with the budget-matched rows: the shipped float models were trained with dropout and "
                  "kept at their best validation epoch, and the same fine-tuning loop run on the float model alone "
                  "lowers its test perplexity too (rows 'float, trained with the same budget'). The goals as the "
                  "issue states them (against the shipped float model) are met, but much of the gain is extra "
                  "training. Against the float model trained with the same budget, W4A4 is within about 1 % and W2A2 "
                  "is 12-16 % above: the 10 % W2A2 goal is not met on that fairer baseline."]
    lines += ["", "| run | steps x (seq x batch) | tokens seen | lr | minutes | tokens/s | valid ppl (tuned, torch) | "
              "export: onnxruntime vs torch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['steps']} x ({r['seq_len']} x {r['batch']}) | "
                     f"{r['steps'] * r['seq_len'] * r['batch']:,} | {r['lr']:g}{' +KD' if r.get('distill') else ''}{' +clip' if r.get('learn_clip') else ''} | "
                     f"{r['seconds'] / 60:.1f} | {r['tokens_per_s']:,.0f} | {r['valid_finetuned']:.2f} | "
                     f"{r['export_rel_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", metavar="CELL:CONFIG:QUANTIZER")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=35)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the per-step ops are small, and a second thread fights a shared core)")
    ap.add_argument("--rows", type=Path, default=ROWS, help="where the rows accumulate (pilots: another file)")
    ap.add_argument("--learn-clip", action="store_true", help="train the x_t grid's scale too")
    ap.add_argument("--float-reference", action="store_true",
                    help="also train each --only cell's float model with the same budget (a row cell:float:trained)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.epochs is None and args.steps is None:
        args.epochs = 2
    rows = _load_rows(args.rows)
    if not args.table_only:
        import torch

        import qcompile.targets.cpu.caps as caps
        from qcompile import datasets
        from qcompile.finetune.data import open_tokens

        caps.usable_cpus = lambda: args.threads   # finetune sets torch's threads from it
        torch.set_num_threads(args.threads)
        train = open_tokens("kjv:train", seq_len=args.seq_len)
        valid = open_tokens(open_tokens("kjv:valid").tokens[:5000], name="val", seq_len=args.seq_len)
        test, _ = datasets.load_lm_sample()
        cases = [c.split(":") for c in args.only] if args.only else \
            [(c, p, q) for c in CELLS for p in CONFIGS for q in QUANTIZERS]
        if args.float_reference:
            for cell in dict.fromkeys(c[0] for c in cases):
                rows[f"{cell}:float:trained"] = float_reference(cell, args, train, valid, test)
                args.rows.write_text(json.dumps(rows, indent=1))
        for cell, config, quantizer in cases:
            rows[f"{cell}:{config}:{quantizer}"] = run_case(cell, config, quantizer, args, train, valid, test)
            args.rows.write_text(json.dumps(rows, indent=1))
    publish(HEADING, table(rows), args.write)


if __name__ == "__main__":
    main()
