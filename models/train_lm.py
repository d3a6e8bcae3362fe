#!/usr/bin/env python
"""Train the bundled word-level LSTM and GRU language models on the King James Bible and export them to ONNX.

    python models/train_lm.py --cell both --out models/

Offline; needs the torch extra and the Debian packages `bible-kjv` (the `bible` reader) and `bible-kjv-text`
(its data): apt-get install bible-kjv bible-kjv-text. The text is read with `bible -f Gen1:1-Rev22:21`
(pretty-printing off: one verse a line, "Ref text").

Tokens: the verse text lowercased, split into words ([a-z]+), the possessive "'s", and one token per other
non-space character (, . ; : ? ! ( ) ' -); every verse ends with <eos>. Vocab: <unk>, <eos>, then the most
frequent train-split tokens (ties alphabetical), --vocab in all.

Split by book (canonical order, Genesis = 1 ... Revelation = 66): book number % 10 == 0 -> test
(2 Samuel, Proverbs, Amos, Matthew, Philippians, 1 Peter); % 10 == 5 -> valid (Deuteronomy, Ezra,
Lamentations, Habakkuk, Romans, 2 Timothy, Jude); the other 53 books -> train. Each split is the verses of its
books in canonical order, one stream.

Writes, into --out:
  kjv_lstm_lm.onnx, kjv_gru_lm.onnx   Gather -> LSTM|GRU -> Linear (MatMul + Add); opset 17, one file each.
        inputs  tokens int64 [seq, batch], h0 float32 [1, batch, hidden] (+ c0 for the LSTM)
        outputs logits float32 [seq, batch, vocab] (no softmax), hn [1, batch, hidden] (+ cn)
  kjv_vocab.txt        one token per line, line i = id i
  kjv_lm_sample.npz    tokens int64 [~30k]: a held-out test sample; calib int64 [16384]: train tokens
  kjv_lm.json          vocab, dims, split, training settings, seconds, float perplexities

Training: truncated BPTT (windows of --bptt tokens, states carried and detached between windows) over the train
stream batchified into --batch columns, Adam, dropout on the embeddings and the RNN outputs, gradient-norm
clipping, a cosine learning-rate decay per step, the weights of the epoch with the best validation perplexity
kept.
Seed 0, deterministic algorithms, --threads CPU threads.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OPSET = 17
SEED = 0
APT_HINT = "apt-get install bible-kjv bible-kjv-text"
VERSE_RANGE = "Gen1:1-Rev22:21"
N_BOOKS, N_VERSES = 66, 31102
UNK, EOS = "<unk>", "<eos>"
TOKEN_RE = re.compile(r"[a-z]+|'s(?![a-z])|[^\sa-z]")
EVAL = {"seq_len": 35, "batch": 10, "carry_state": True}
SAMPLE_TOKENS = 30000
CALIB_PIECES, CALIB_PIECE_LEN = 16, 1024
DEFAULT_EPOCHS = {"lstm": 3, "gru": 3}
FILES = {"lstm": "kjv_lstm_lm.onnx", "gru": "kjv_gru_lm.onnx"}


def split_of(book: int) -> str:
    """Book number (1-based, canonical order) -> "train" / "valid" / "test"."""
    return "test" if book % 10 == 0 else "valid" if book % 10 == 5 else "train"


# ----------------------------------------------------------------------------------------------- corpus

def read_bible(bible: str = "bible") -> list[tuple[int, str, str]]:
    """Every verse through the `bible` reader: [(book number 1..66, reference, text)]."""
    exe = shutil.which(bible)
    if exe is None:
        sys.exit(f"train_lm.py: the `{bible}` reader was not found; install the Debian packages: {APT_HINT}")
    try:
        r = subprocess.run([exe, "-f", VERSE_RANGE], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        sys.exit(f"train_lm.py: `{bible} -f {VERSE_RANGE}` failed ({e}); install the Debian packages: {APT_HINT}")
    verses, books = [], {}
    line_re = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    for line in r.stdout.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        abbrev = m.group(1)
        book = books.setdefault(abbrev, len(books) + 1)
        verses.append((book, f"{abbrev}{m.group(2)}:{m.group(3)}", m.group(4)))
    if r.returncode != 0 or len(books) != N_BOOKS or len(verses) != N_VERSES:
        err = (r.stderr or "").strip().splitlines()[-1:] or [""]
        sys.exit(f"train_lm.py: `{bible} -f {VERSE_RANGE}` gave {len(verses)} verses in {len(books)} books "
                 f"(expected {N_VERSES} in {N_BOOKS}; exit {r.returncode} {err[0]}); install the Debian "
                 f"packages: {APT_HINT}")
    return verses


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def build(verses, vocab_size: int):
    """-> (vocab list, {split: int64 stream}, {split: [(book, abbrev, start, end)]}, book abbrevs)."""
    toks = {"train": [], "valid": [], "test": []}
    spans = {"train": [], "valid": [], "test": []}
    verse_starts = {"train": [], "valid": [], "test": []}
    abbrevs = {}
    for book, ref, text in verses:
        s = split_of(book)
        abbrevs.setdefault(book, re.match(r"\d?[A-Za-z]+", ref).group(0))
        if not spans[s] or spans[s][-1][0] != book:
            spans[s].append([book, abbrevs[book], len(toks[s]), len(toks[s])])
        verse_starts[s].append(len(toks[s]))
        toks[s].extend(tokenize(text))
        toks[s].append(EOS)
        spans[s][-1][3] = len(toks[s])
    counts = collections.Counter(toks["train"])
    counts.pop(EOS, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size - 2]
    vocab = [UNK, EOS, *words]
    ids = {w: i for i, w in enumerate(vocab)}
    streams = {s: np.array([ids.get(w, 0) for w in t], dtype=np.int64) for s, t in toks.items()}
    starts = {s: np.array(v, dtype=np.int64) for s, v in verse_starts.items()}
    return vocab, streams, spans, starts, counts


def make_sample(stream: np.ndarray, spans, starts: np.ndarray) -> tuple[np.ndarray, list]:
    """About SAMPLE_TOKENS test tokens: from each test book a prefix of whole verses, proportional to its size."""
    total = len(stream)
    pieces, desc = [], []
    for book, abbrev, a, b in spans:
        want = round(SAMPLE_TOKENS * (b - a) / total)
        ends = starts[(starts > a) & (starts <= a + want)]  # verse starts inside the book = previous verse ends
        end = int(ends.max()) if len(ends) else b
        if a + want >= b:
            end = b
        pieces.append(stream[a:end])
        desc.append({"book": int(book), "abbrev": abbrev, "tokens": int(end - a), "of": int(b - a)})
    return np.concatenate(pieces), desc


def make_calib(stream: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, list]:
    """CALIB_PIECES pieces of CALIB_PIECE_LEN train tokens, each starting at the verse start nearest an evenly
    spaced position of the train stream."""
    pos = np.linspace(0, len(stream) - CALIB_PIECE_LEN, CALIB_PIECES).astype(np.int64)
    first = [int(starts[np.abs(starts - p).argmin()]) for p in pos]
    first = [min(f, len(stream) - CALIB_PIECE_LEN) for f in first]
    return np.concatenate([stream[f:f + CALIB_PIECE_LEN] for f in first]), first


# ----------------------------------------------------------------------------------------------- model

class WordLM(nn.Module):
    """Embedding -> dropout -> one-layer LSTM/GRU -> dropout -> Linear. forward(tokens [seq, batch], h0[, c0])."""

    def __init__(self, cell: str, vocab: int, emb: int, hidden: int, dropout: float):
        super().__init__()
        self.cell = cell
        self.emb = nn.Embedding(vocab, emb)
        self.drop = nn.Dropout(dropout)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(emb, hidden, num_layers=1)
        self.out = nn.Linear(hidden, vocab)
        self.hidden = hidden
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        nn.init.uniform_(self.out.weight, -0.1, 0.1)
        nn.init.zeros_(self.out.bias)

    def zero_state(self, batch: int):
        h = torch.zeros(1, batch, self.hidden)
        return (h, h.clone()) if self.cell == "lstm" else (h,)

    def forward(self, tokens, h0, c0=None):
        x = self.drop(self.emb(tokens))
        if self.cell == "lstm":
            y, (hn, cn) = self.rnn(x, (h0, c0))
            return self.out(self.drop(y)), hn, cn
        y, hn = self.rnn(x, h0)
        return self.out(self.drop(y)), hn


def batchify(stream: np.ndarray, batch: int) -> torch.Tensor:
    """Same layout as qcompile.lm.batchify: [n, batch], column j = stream[j*n:(j+1)*n]."""
    n = len(stream) // batch
    return torch.from_numpy(np.ascontiguousarray(stream[:n * batch].reshape(batch, n).T))


@torch.no_grad()
def torch_perplexity(model: WordLM, stream: np.ndarray, seq_len: int, batch: int, carry_state: bool = True) -> float:
    model.eval()
    data = batchify(stream, batch)
    state = model.zero_state(batch)
    total, count = 0.0, 0
    for i in range(0, data.shape[0] - 1, seq_len):
        length = min(seq_len, data.shape[0] - 1 - i)
        x, y = data[i:i + length], data[i + 1:i + 1 + length]
        out = model(x, *(state if carry_state else model.zero_state(batch)))
        logits, state = out[0], out[1:]
        total += F.cross_entropy(logits.double().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    return math.exp(total / count)


def train(cell: str, args, streams) -> tuple[WordLM, list, float]:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)
    model = WordLM(cell, args.vocab, args.emb, args.hidden, args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    train_stream = streams["train"][:args.max_train_tokens] if args.max_train_tokens else streams["train"]
    data = batchify(train_stream, args.batch)
    windows = list(range(0, data.shape[0] - 1, args.bptt))
    best, best_state, history = float("inf"), None, []
    total_steps, t = args.epochs[cell] * len(windows), 0
    lr_min = args.lr * args.lr_final
    t0 = time.time()
    for epoch in range(1, args.epochs[cell] + 1):
        model.train()
        state = model.zero_state(args.batch)
        loss_sum, n_tok, t_ep = 0.0, 0, time.time()
        for step, i in enumerate(windows):
            length = min(args.bptt, data.shape[0] - 1 - i)
            x, y = data[i:i + length], data[i + 1:i + 1 + length]
            state = tuple(s.detach() for s in state)  # truncated BPTT: carry the values, cut the graph
            out = model(x, *state)
            logits, state = out[0], out[1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            lr = lr_min + 0.5 * (args.lr - lr_min) * (1 + math.cos(math.pi * t / total_steps))  # cosine
            for g in opt.param_groups:
                g["lr"] = lr
            t += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            loss_sum += loss.item() * y.numel()
            n_tok += y.numel()
            if args.log_every and (step + 1) % args.log_every == 0:
                print(f"[{cell}] epoch {epoch} step {step + 1}/{len(windows)}  train ppl "
                      f"{math.exp(loss_sum / n_tok):.1f}  {n_tok / (time.time() - t_ep):.0f} tok/s", flush=True)
        val = torch_perplexity(model, streams["valid"], EVAL["seq_len"], EVAL["batch"])
        history.append({"epoch": epoch, "lr_end": round(lr, 6), "train_ppl": round(math.exp(loss_sum / n_tok), 3),
                        "valid_ppl": round(val, 3), "elapsed_s": round(time.time() - t0, 1)})
        print(f"[{cell}] epoch {epoch}/{args.epochs[cell]}  lr now {lr:.2e}  "
              f"train ppl {math.exp(loss_sum / n_tok):.2f}  valid ppl {val:.2f}  elapsed {time.time() - t0:.0f}s",
              flush=True)
        if val < best:
            best = val
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    return model, history, time.time() - t0


# ----------------------------------------------------------------------------------------------- export

def export(model: WordLM, path: Path) -> None:
    import onnx

    model.eval()
    lstm = model.cell == "lstm"
    names = ["tokens", "h0", "c0"] if lstm else ["tokens", "h0"]
    outs = ["logits", "hn", "cn"] if lstm else ["logits", "hn"]
    dyn = {"tokens": {0: "seq", 1: "batch"}, "logits": {0: "seq", 1: "batch"}}
    for n in names[1:] + outs[1:]:
        dyn[n] = {1: "batch"}
    dummy = (torch.zeros(5, 2, dtype=torch.int64), *model.zero_state(2))
    tmp = path.with_suffix(".tmp.onnx")
    torch.onnx.export(model, dummy, str(tmp), dynamo=False, export_params=True, do_constant_folding=True,
                      training=torch.onnx.TrainingMode.EVAL, opset_version=OPSET,
                      input_names=names, output_names=outs, dynamic_axes=dyn)
    proto = onnx.load(str(tmp))
    tmp.unlink()
    # Readable initializer names instead of the exporter's onnx::LSTM_96 etc.
    g = proto.graph
    rename = {}
    for node in g.node:
        if node.op_type in ("LSTM", "GRU"):
            for idx, suffix in ((1, "W"), (2, "R"), (3, "B")):
                rename[node.input[idx]] = f"{model.cell}.{suffix}"
        if node.op_type == "MatMul":
            rename[node.input[1]] = "out.weight_T"
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for node in g.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    proto.producer_name = "qcompile models/train_lm.py"
    proto.doc_string = (f"word-level {model.cell.upper()} language model, KJV Bible (models/README_lm.md); "
                        "tokens int64 [seq, batch], logits [seq, batch, vocab]")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path), save_as_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    if model.cell.upper() not in ops:
        raise RuntimeError(f"{path}: no {model.cell.upper()} op in the exported graph ({ops})")
    print(f"exported {path} ({path.stat().st_size} bytes, opset {OPSET}, ops: {' '.join(ops)})", flush=True)


def check_ort(model: WordLM, path: Path, sample: np.ndarray) -> tuple[float, float]:
    """onnxruntime vs torch: one window's outputs, then the perplexity on the sample (1e-3 relative)."""
    import onnxruntime as ort

    from qcompile import lm

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batchify(sample, 4)[:35]
    state = tuple(torch.randn_like(s) * 0.5 for s in model.zero_state(4))
    feed = {"tokens": x.numpy(), **{n: s.numpy() for n, s in zip(["h0", "c0"], state)}}
    got = sess.run(None, feed)
    with torch.no_grad():
        want = [t.numpy() for t in model(x, *state)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    ppl_ort = lm.perplexity(str(path), sample, **EVAL, session=sess)
    ppl_torch = torch_perplexity(model, sample, EVAL["seq_len"], EVAL["batch"])
    rel = abs(ppl_ort - ppl_torch) / ppl_torch
    print(f"onnxruntime vs torch: max abs diff {diff:.2e} on one window; sample perplexity "
          f"ort {ppl_ort:.4f} torch {ppl_torch:.4f} (rel diff {rel:.1e})", flush=True)
    if diff > 1e-3 or rel > 1e-3:
        raise RuntimeError(f"{path}: onnxruntime differs from torch (max abs {diff}, perplexity rel {rel})")
    if not lm.is_language_model(str(path)):
        raise RuntimeError(f"{path}: qcompile.lm.is_language_model says no")
    return ppl_ort, ppl_torch


# ----------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", choices=["lstm", "gru", "both"], default="both")
    ap.add_argument("--out", type=Path, default=REPO / "models")
    ap.add_argument("--vocab", type=int, default=5000, help="vocab size including <unk> and <eos>")
    ap.add_argument("--emb", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay per step)")
    ap.add_argument("--lr-final", type=float, default=0.05, help="final learning rate, as a fraction of --lr")
    ap.add_argument("--clip", type=float, default=0.5, help="max gradient norm")
    ap.add_argument("--epochs", type=int, default=None, help=f"epochs per model (default {DEFAULT_EPOCHS})")
    ap.add_argument("--max-train-tokens", type=int, default=0,
                    help="train on the first N tokens of the train stream only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=0, help="print training progress every N steps")
    ap.add_argument("--bible", default="bible", help="the reader command (Debian package bible-kjv)")
    args = ap.parse_args(argv)
    args.epochs = {c: args.epochs or DEFAULT_EPOCHS[c] for c in FILES}

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    verses = read_bible(args.bible)
    vocab, streams, spans, starts, counts = build(verses, args.vocab)
    unk_rate = {s: round(float((v == 0).mean()), 5) for s, v in streams.items()}
    print(f"{len(verses)} verses; tokens train {len(streams['train'])} valid {len(streams['valid'])} "
          f"test {len(streams['test'])}; {len(counts) + 1} distinct train tokens, vocab {len(vocab)}; "
          f"<unk> rate {unk_rate}", flush=True)

    (args.out / "kjv_vocab.txt").write_text("\n".join(vocab) + "\n")
    sample, sample_desc = make_sample(streams["test"], spans["test"], starts["test"])
    calib, calib_starts = make_calib(streams["train"], starts["train"])
    np.savez_compressed(args.out / "kjv_lm_sample.npz", tokens=sample, calib=calib)
    print(f"wrote kjv_vocab.txt and kjv_lm_sample.npz (tokens {len(sample)}, calib {len(calib)})", flush=True)

    meta_path = args.out / "kjv_lm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({
        "corpus": {"source": f"Debian bible-kjv-text, read with `bible -f {VERSE_RANGE}` (bible-kjv)",
                   "verses": len(verses), "books": N_BOOKS},
        "tokenizer": {"lowercase": True, "regex": TOKEN_RE.pattern, "end_of_verse": EOS, "unknown": UNK},
        "vocab": {"size": len(vocab), "file": "kjv_vocab.txt", "unk_id": 0, "eos_id": 1,
                  "built_from": "train split, most frequent first, ties alphabetical",
                  "distinct_train_tokens": len(counts) + 1, "unk_rate": unk_rate},
        "split": {"rule": "by book, canonical order 1..66: book % 10 == 0 -> test, book % 10 == 5 -> valid, "
                          "else train",
                  **{s: {"books": [sp[1] for sp in spans[s]], "tokens": int(len(streams[s]))}
                     for s in ("train", "valid", "test")}},
        "sample": {"file": "kjv_lm_sample.npz",
                   "tokens": {"n": int(len(sample)), "what": "test split: from each test book a prefix of "
                              "whole verses proportional to its size, concatenated in book order",
                              "books": sample_desc},
                   "calib": {"n": int(len(calib)), "what": f"train split: {CALIB_PIECES} pieces of "
                             f"{CALIB_PIECE_LEN} tokens, each starting at the verse start nearest an evenly "
                             "spaced position", "starts": calib_starts}},
        "eval": {**EVAL, "how": "qcompile.lm.perplexity: stream batchified into `batch` columns, windows of "
                                "seq_len, final states carried; exp(mean NLL) over batch*(n-1) predictions"},
        "onnx": {"opset": OPSET, "layout": "seq-first",
                 "inputs": {"tokens": "int64 [seq, batch]", "h0": "float32 [1, batch, hidden]",
                            "c0": "float32 [1, batch, hidden] (LSTM only)"},
                 "outputs": {"logits": "float32 [seq, batch, vocab]", "hn": "float32 [1, batch, hidden]",
                             "cn": "float32 [1, batch, hidden] (LSTM only)"}},
    })
    meta.setdefault("models", {})

    cells = ["lstm", "gru"] if args.cell == "both" else [args.cell]
    for cell in cells:
        print(f"[{cell}] training: {args.epochs[cell]} epochs, train tokens "
              f"{min(len(streams['train']), args.max_train_tokens or 10**12)}", flush=True)
        model, history, train_s = train(cell, args, streams)
        path = args.out / FILES[cell]
        export(model, path)
        ppl_ort, ppl_torch = check_ort(model, path, sample)
        ppl = {s: torch_perplexity(model, streams[s], EVAL["seq_len"], EVAL["batch"]) for s in ("valid", "test")}
        ppl_nocarry = torch_perplexity(model, sample, EVAL["seq_len"], EVAL["batch"], carry_state=False)
        nparams = sum(p.numel() for p in model.parameters())
        meta["models"][cell] = {
            "file": FILES[cell], "bytes": path.stat().st_size, "parameters": nparams,
            "dims": {"vocab": len(vocab), "embedding": args.emb, "hidden": args.hidden, "layers": 1},
            "training": {"optimizer": "Adam", "lr": args.lr,
                         "lr_schedule": f"cosine per step from lr to {args.lr_final} * lr",
                         "batch": args.batch, "bptt": args.bptt, "dropout": args.dropout, "clip_norm": args.clip,
                         "epochs": args.epochs[cell], "seed": SEED, "threads": args.threads,
                         "train_tokens": int(min(len(streams["train"]), args.max_train_tokens or 10**12)),
                         "best_epoch": int(min(history, key=lambda h: h["valid_ppl"])["epoch"]),
                         "seconds": round(train_s, 1), "history": history,
                         "machine": f"{platform.machine()}, torch {torch.__version__}"},
            "perplexity": {"valid": round(ppl["valid"], 4), "test": round(ppl["test"], 4),
                           "sample_torch": round(ppl_torch, 6), "sample_onnxruntime": round(ppl_ort, 6),
                           "sample_no_carry": round(ppl_nocarry, 4)},
        }
        print(f"[{cell}] {train_s:.0f}s training; float perplexity valid {ppl['valid']:.2f} test {ppl['test']:.2f} "
              f"sample {ppl_ort:.3f} (no carried state {ppl_nocarry:.2f}); {nparams} parameters", flush=True)
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {meta_path}; total {time.time() - t_all:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
