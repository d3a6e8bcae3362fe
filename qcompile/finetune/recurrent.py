"""Quantized LSTM/GRU layers in torch, and fine-tuning of recurrent language models (issue 13).

`RecurrentLayer` is an ONNX ``LSTM``/``GRU`` node as a torch module: W [D, G*H, I], R [D, G*H, H] and B [D, 2*G*H]
are nn.Parameters in the ONNX layout (trained values are written back as they are), and `forward(x, seq_lens, h0,
c0)` returns ONNX's (Y, Y_h, Y_c). Its arithmetic is `passes/rnn.run`'s, step for step in float32 (gates in ONNX
order, lengths as a step mask, reverse directions walking each sequence from its own last step), so:

* in float it equals onnxruntime's LSTM/GRU op (the teacher of a language model);
* quantized (`enable_quant`), it is `run(..., quant=RecurrentQuant)` and the compiled fake-quant Scan form: W and R
  per gate row through the registry quantizer's torch twin (the same quantizer `passes/rnn.quantize_weights` calls
  in numpy, with its straight-through gradient), x_t on the calibrated affine grid of the post-training compile,
  h_{t-1} into R, the GRU's r*h (linear_before_reset=0) and candidate and the new h on the [-1, 1] grid of
  `tanh_grid`, all rounded with `round_ste`; the LSTM cell state stays float. The tests hold it to `run` and to
  onnxruntime on the compiled model.

Language-model fine-tuning (`finetune_lm`, which `qcompile.finetune` calls for a model `qcompile.lm` recognises):
the training data is a token stream batchified into `batch` columns and walked in windows of `seq_len` tokens
(truncated backpropagation through time: the final states of a window start the next, detached; they are zero at
an epoch's start, and every epoch starts the stream at an offset drawn from (seed, epoch)). Loss: cross entropy of
the next token (plus KL to the float model's next-token distribution with `distill`), Adam with the loop's cosine
schedule, gradient norm clipped to `CLIP_NORM`. It runs in `loop.Trainer` (`LMTrainer` replaces the step and the
evaluation, and checkpoints the carried states, so Ctrl-C and --resume continue exactly). The embedding table, the
recurrent weights and every weighted layer are trained. Export writes the trained weights into the float model
and quantizes it with the trained x grids (`passes/rnn.quantize_recurrent`, no re-calibration), so model.onnx
holds exactly the trained parameters.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.errors import QcompileError
from qcompile.finetune.loop import Trainer, TrainingError
from qcompile.quant.torch_ops import round_ste

GATES = {"LSTM": 4, "GRU": 3}
CLIP_NORM = 1.0             # gradient-norm clip of language-model fine-tuning (the bundled LMs trained at 0.5)
CALIB_WINDOWS = 8           # calibration batches read from the training stream for the post-training compile
CALIB_SEQ, CALIB_BATCH = 35, 8
MIN_X_SCALE = 1e-6          # a learned x_t step stays positive


# ---------------------------------------------------------------------------------------------- quantizers
def tanh_grid(v: torch.Tensor, bits: int) -> torch.Tensor:
    """passes/rnn.tanh_grid in torch with a straight-through round: u = v/2 + 1/2 clipped to [0, 1], codes
    round(n u), back as codes * float32(1/n) * 2 - 1 (zero gradient outside [-1, 1])."""
    n = (1 << bits) - 1
    u = torch.clamp(v * 0.5 + 0.5, 0.0, 1.0)
    codes = round_ste(u * float(n))
    return codes * torch.tensor(1.0 / n, dtype=torch.float32) * 2.0 - 1.0


def x_grid(v: torch.Tensor, bits: int, scale: torch.Tensor, zero: int) -> torch.Tensor:
    """RecurrentQuant.act("x"): codes clip(round(v / s) + z, 0, n), value (codes - z) * s. A learned s gets
    LSQ's gradient (through round_ste), the clamp PACT's."""
    n = (1 << bits) - 1
    q = torch.clamp(round_ste(v / scale) + float(zero), 0.0, float(n))
    return (q - float(zero)) * scale


# ---------------------------------------------------------------------------------------------- the layer
class RecurrentLayer(nn.Module):
    """An ONNX LSTM/GRU node (see the module docstring). forward(x, seq_lens=None, h0=None, c0=None) ->
    (Y [seq, D, batch, H], Y_h [D, batch, H], Y_c or None), or the layout=1 shapes."""

    def __init__(self, onnx_name: str, cell: str, direction: str, hidden: int, W: nn.Parameter, R: nn.Parameter,
                 B: nn.Parameter, *, linear_before_reset: bool = False, layout: int = 0, x_name: str = "",
                 bias_name: str = ""):
        super().__init__()
        self.onnx_name, self.cell, self.direction, self.hidden = onnx_name, cell, direction, int(hidden)
        self.linear_before_reset, self.layout, self.x_name, self.bias_name = bool(linear_before_reset), int(layout), \
            x_name, bias_name
        self.W, self.R, self.B = W, R, B
        self.bits_w = self.bits_a = 0
        self.quantizer = ""
        self.x_zero = 0
        self.register_buffer("x_scale", torch.tensor(1.0))
        self._twin = None

    @property
    def num_directions(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def quantized(self) -> bool:
        return self.bits_a > 0

    def extra_repr(self) -> str:
        q = f", W{self.bits_w}A{self.bits_a} {self.quantizer}" if self.quantized else ""
        return f"{self.onnx_name!r}, {self.cell} {self.direction}, hidden {self.hidden}{q}"

    # ------------------------------------------------------------------------------------------ quantization
    def enable_quant(self, bits_w: int, bits_a: int, quantizer: str, x_scale: float, x_zero: int,
                     learn_x: bool = False) -> "RecurrentLayer":
        """Quantize like passes/rnn.quantize_recurrent: W, R per gate row through `quantizer`'s torch twin,
        activations on bits_a-bit grids, x_t on the affine grid (x_scale, x_zero) of the post-training compile
        (a trainable scale with learn_x; the zero point stays)."""
        from qcompile.quant import get

        self.bits_w, self.bits_a, self.quantizer, self.x_zero = int(bits_w), int(bits_a), quantizer, int(x_zero)
        self._twin = get(quantizer).torch_fn()
        scale = torch.tensor(float(np.float32(x_scale)), dtype=torch.float32)
        del self.x_scale
        if learn_x:
            self.x_scale = nn.Parameter(scale)
        else:
            self.register_buffer("x_scale", scale)
        return self

    def quantized_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Wq, Rq): per direction, the twin's fake-quant values (straight-through gradients)."""
        if self._twin is None:
            from qcompile.quant import get

            self._twin = get(self.quantizer).torch_fn()
        Wq = [self._twin(self.W[d], self.bits_w, axis=0, name=f"{self.onnx_name}.W[{d}]")
              for d in range(self.num_directions)]
        Rq = [self._twin(self.R[d], self.bits_w, axis=0, name=f"{self.onnx_name}.R[{d}]")
              for d in range(self.num_directions)]
        return torch.stack(Wq), torch.stack(Rq)

    def x_grid_values(self) -> tuple[float, int]:
        """(scale, zero point) of the x_t grid as the exported QuantizeLinear takes them."""
        return float(np.float32(max(self.x_scale.detach().item(), MIN_X_SCALE))), int(self.x_zero)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x, seq_lens=None, h0=None, c0=None):
        if self.layout == 1:  # [batch, seq, I] and [batch, D, H] states: run in layout 0
            x = x.transpose(0, 1)
            h0 = None if h0 is None else h0.transpose(0, 1)
            c0 = None if c0 is None else c0.transpose(0, 1)
        x = x.to(torch.float32)
        seq, batch, _ = x.shape
        H, D, g = self.hidden, self.num_directions, GATES[self.cell]
        quant = self.quantized
        W, R = self.quantized_weights() if quant else (self.W, self.R)
        bits = self.bits_a
        lens = None
        if seq_lens is not None:
            lens = seq_lens.to(torch.int64)
            if bool((lens > seq).any()) or bool((lens < 0).any()):
                raise ValueError(f"{self.onnx_name}: sequence_lens {lens.tolist()} outside 0..{seq} "
                                 "(the padded length)")
        ys, yhs, ycs = [], [], []
        for d in range(D):
            reverse = self.direction == "reverse" or d == 1
            h = x.new_zeros(batch, H) if h0 is None else h0[d].to(torch.float32)
            c = x.new_zeros(batch, H) if c0 is None else c0[d].to(torch.float32)
            Wd, Rd = W[d], R[d]
            Wb, Rb = self.B[d, :g * H], self.B[d, g * H:]
            # step t reads position tt[t]: reverse runs each sequence from its own last valid step back to 0
            if lens is None:
                live = None
                xs = x.flip(0) if reverse else x
            else:
                t = torch.arange(seq)[:, None]
                live = t < lens[None, :]
                tt = torch.where(live, (lens[None, :] - 1 - t) if reverse else t.expand(seq, batch), 0)
                xs = x[tt, torch.arange(batch)[None, :]]
            if quant:
                xs = x_grid(xs, bits, self.x_scale.clamp_min(MIN_X_SCALE), self.x_zero)
            xw = xs @ Wd.t() + Wb                         # every step's q(x_t) @ W^T + Wb at once
            steps = []
            for t in range(seq):
                hq = tanh_grid(h, bits) if quant else h
                if self.cell == "LSTM":
                    gates = xw[t] + hq @ Rd.t() + Rb
                    i, o, f, cc = gates.split(H, dim=1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
                    h_new = torch.sigmoid(o) * torch.tanh(c_new)
                    c = c_new if live is None else torch.where(live[t][:, None], c_new, c)
                else:
                    xz, xr, xh = xw[t].split(H, dim=1)
                    if self.linear_before_reset:
                        hr = hq @ Rd.t()
                        hz, hrr, hh = hr.split(H, dim=1)
                        z = torch.sigmoid(xz + hz + Rb[:H])
                        r = torch.sigmoid(xr + hrr + Rb[H:2 * H])
                        cand = torch.tanh(xh + r * (hh + Rb[2 * H:]))
                    else:
                        hzr = hq @ Rd[:2 * H].t()
                        z = torch.sigmoid(xz + hzr[:, :H] + Rb[:H])
                        r = torch.sigmoid(xr + hzr[:, H:] + Rb[H:2 * H])
                        rh = r * h
                        if quant:
                            rh = tanh_grid(rh, bits)
                        cand = torch.tanh(xh + rh @ Rd[2 * H:].t() + Rb[2 * H:])
                    if quant:
                        cand = tanh_grid(cand, bits)
                    h_new = (1 - z) * cand + z * h
                if quant:
                    h_new = tanh_grid(h_new, bits)
                h = h_new if live is None else torch.where(live[t][:, None], h_new, h)
                steps.append(h)
            S = torch.stack(steps)                        # [step, batch, H]
            if lens is None:
                Yd = S.flip(0) if reverse else S
            else:                                         # position p of sequence b: its step, zero past its end
                p = torch.arange(seq)[:, None]
                valid = p < lens[None, :]
                idx = torch.where(valid, (lens[None, :] - 1 - p) if reverse else p.expand(seq, batch), 0)
                Yd = torch.where(valid[..., None], S.gather(0, idx[..., None].expand(seq, batch, H)),
                                 S.new_zeros(()))
            ys.append(Yd)
            yhs.append(h)
            ycs.append(c)
        Y, Yh = torch.stack(ys, 1), torch.stack(yhs)
        Yc = torch.stack(ycs) if self.cell == "LSTM" else None
        if self.layout == 1:
            Y, Yh = Y.permute(2, 0, 1, 3), Yh.transpose(0, 1)
            Yc = None if Yc is None else Yc.transpose(0, 1)
        return Y, Yh, Yc


def recurrent_layers(model: nn.Module) -> dict[str, RecurrentLayer]:
    """ONNX node name -> RecurrentLayer, in graph order."""
    return {m.onnx_name: m for m in model.modules() if isinstance(m, RecurrentLayer)}


def recurrent_quant(ptq, name: str, spec_x: str) -> tuple[int, int, str, float, int]:
    """(bits_w, bits_a, quantizer, x scale, x zero) the post-training compile `ptq` gave recurrent layer `name`:
    the same x_t grid passes/rnn.quantize_recurrent computed from calibration."""
    from qcompile.passes.rnn import x_grid as grid

    plan = ptq.ctx.plan[name]
    st = (getattr(ptq.ctx, "act_ranges", None) or {}).get(spec_x)
    lo, hi = (st.min, st.max) if st is not None and st.count else (-1.0, 1.0)
    xs, xz = grid(lo, hi, plan.bits_a)
    return plan.bits_w, plan.bits_a, plan.quantizer, xs, xz


def trained_x_ranges(layers: dict[str, RecurrentLayer]) -> dict:
    """ctx.act_ranges entries under which passes/rnn.quantize_recurrent rebuilds each layer's trained x_t grid
    exactly: [-z s, (n - z) s] gives back x_grid's (s, z) (s is a float32, so n*s and the quotient are exact)."""
    out = {}
    for layer in layers.values():
        s, z = layer.x_grid_values()
        n = (1 << layer.bits_a) - 1
        out[layer.x_name] = SimpleNamespace(min=-z * s, max=(n - z) * s, count=1)
    return out


def write_back(proto, student: nn.Module) -> None:
    """Write the trained recurrent weights (W, R, B) and embedding tables of `student` into the float ONNX model
    `proto` in place (a layer without a bias input gets one)."""
    from onnx import numpy_helper

    from qcompile.finetune.convert import GatherTable

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}

    def put(name: str, t: torch.Tensor) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(t.detach().cpu().numpy().astype(np.float32), name))

    for name, layer in recurrent_layers(student).items():
        node = nodes[name]
        put(node.input[1], layer.W)
        put(node.input[2], layer.R)
        if len(node.input) > 3 and node.input[3]:
            put(node.input[3], layer.B)
        else:
            bname = f"{node.input[1]}_trained_B"
            proto.graph.initializer.append(numpy_helper.from_array(layer.B.detach().cpu().numpy(), bname))
            inits[bname] = proto.graph.initializer[-1]
            while len(node.input) < 3:
                node.input.append("")
            if len(node.input) == 3:
                node.input.append(bname)
            else:
                node.input[3] = bname
    for m in student.modules():
        if isinstance(m, GatherTable) and m.weight.requires_grad:
            put(nodes[m.onnx_name].input[0], m.weight)


# ---------------------------------------------------------------------------------------------- training
def build_lm_student(ptq, cfg, *, learn_clip: bool, gbits: int | None):
    """finetune.api.build_student (QuantLayers for the quantized Conv/Gemm/MatMul), then every recurrent layer
    the post-training compile quantized set to its plan and x_t grid. Trained: weighted layers, recurrent layers
    and embedding tables."""
    from qcompile.finetune.api import build_student
    from qcompile.finetune.convert import GatherTable

    student = build_student(ptq.float_model, ptq, cfg, learn_clip=learn_clip, gbits=gbits)
    planned = {n for n, p in ptq.ctx.plan.items() if p.quantize and p.op in GATES}
    layers = recurrent_layers(student)
    missing = planned - set(layers)
    if missing:
        raise QcompileError(f"recurrent layers {sorted(missing)}: not found in the converted model")
    for name in planned:
        layer = layers[name]
        layer.enable_quant(*recurrent_quant(ptq, name, layer.x_name), learn_x=learn_clip)
    for m in student.modules():
        if isinstance(m, (RecurrentLayer, GatherTable)):
            for p in m.parameters():
                p.requires_grad_(True)
    return student


def zero_states(sig, batch: int) -> tuple[torch.Tensor, ...]:
    out = []
    for name, dims in zip(sig.states, sig.state_shapes):
        if not isinstance(dims[0], int) or not isinstance(dims[2], int):
            raise QcompileError(f"state input {name!r} has symbolic dims {dims}; need fixed [layers, batch, hidden]")
        out.append(torch.zeros(dims[0], batch, dims[2]))
    return tuple(out)


class StreamReader:
    """Calibration batches for the post-training compile: the first `windows` windows of a token stream cut into
    `batch` columns, with zero states (onnxruntime's CalibrationDataReader shape)."""

    def __init__(self, stream, sig, *, seq: int = CALIB_SEQ, batch: int = CALIB_BATCH, windows: int = CALIB_WINDOWS):
        self.sig, self.seq, self.batch = sig, seq, batch
        self.cols = stream.columns(batch)
        self.windows = max(1, min(windows, (self.cols.shape[0]) // seq))
        self.i = 0

    def get_next(self):
        if self.i >= self.windows:
            return None
        feed = {self.sig.tokens: self.cols[self.i * self.seq:(self.i + 1) * self.seq]}
        feed.update({k: v.numpy() for k, v in zip(self.sig.states, zero_states(self.sig, self.batch))})
        self.i += 1
        return feed

    def rewind(self):
        self.i = 0


class LMTrainer(Trainer):
    """loop.Trainer for a language model: a step is one window of the token stream (x, next tokens), the states
    carried from the previous window (detached; zero at an epoch's start) and checkpointed with the rest, so a
    resumed run continues exactly. `evaluate` is the validation perplexity (the history's val_acc field holds it),
    computed like qcompile.lm.perplexity (eval_batch columns, windows of eval_seq, states carried)."""

    def __init__(self, student, teacher, train, val, opts, *, sig, eval_batch: int = 10, eval_seq: int = 35, **kw):
        super().__init__(student, teacher, train, val, opts, **kw)
        self.sig, self.eval_batch, self.eval_seq = sig, eval_batch, eval_seq
        self.use_labels, self.use_teacher = True, teacher is not None and opts.distill
        self.eval_every = max(self.total_steps // 8, 25) if val is not None else 0
        self.carry: tuple | None = None
        self.teacher_carry: tuple | None = None
        self.params = [p for p in student.parameters() if p.requires_grad]

    def state(self) -> dict:
        st = super().state()
        st["carry"] = None if self.carry is None else [t.clone() for t in self.carry]
        st["teacher_carry"] = None if self.teacher_carry is None else [t.clone() for t in self.teacher_carry]
        return st

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.carry = None if state.get("carry") is None else tuple(state["carry"])
        self.teacher_carry = None if state.get("teacher_carry") is None else tuple(state["teacher_carry"])

    def train_step(self, xb: np.ndarray, yb: np.ndarray) -> float:
        self.student.train()
        batch = xb.shape[1]
        if self.batch_in_epoch == 0 or self.carry is None:
            self.carry = zero_states(self.sig, batch)
            self.teacher_carry = zero_states(self.sig, batch)
        x, y = torch.from_numpy(xb), torch.from_numpy(yb)
        out = self.student(x, *self.carry)
        logits = out[0]
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        if self.use_teacher:
            with torch.no_grad():
                t_out = self.teacher(x, *self.teacher_carry)
            self.teacher_carry = tuple(t.detach() for t in t_out[1:])
            kd = F.kl_div(F.log_softmax(logits.reshape(-1, vocab), 1), F.log_softmax(t_out[0].reshape(-1, vocab), 1),
                          reduction="batchmean", log_target=True)
            loss = (1 - self.opts.distill_weight) * loss + self.opts.distill_weight * kd
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"step {self.step + 1} (epoch {self.epoch + 1}): the loss is {value}; stopped, the "
                                "last good checkpoint is kept; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        self.carry = tuple(t.detach() for t in out[1:])   # truncated BPTT: the values go on, the graph is cut
        self._epoch_correct += int((logits.detach().argmax(-1) == y).sum())
        self._epoch_seen += int(y.numel())
        self._epoch_loss.append(value)
        self.history.step_loss.append(value)
        return value

    @torch.no_grad()
    def evaluate(self, ds, model: nn.Module | None = None) -> float | None:
        """Perplexity of `model` (the student) on token stream `ds` (None without one)."""
        if ds is None:
            return None
        model = model or self.student
        was_training = model.training
        model.eval()
        cols = ds.columns(self.eval_batch)
        states = zero_states(self.sig, self.eval_batch)
        total, count = 0.0, 0
        for i in range(0, cols.shape[0] - 1, self.eval_seq):
            n = min(self.eval_seq, cols.shape[0] - 1 - i)
            x, y = torch.from_numpy(cols[i:i + n]), torch.from_numpy(cols[i + 1:i + 1 + n])
            out = model(x, *states)
            states = tuple(out[1:])
            total += float(F.cross_entropy(out[0].reshape(-1, out[0].shape[-1]).double(), y.reshape(-1),
                                           reduction="sum"))
            count += y.numel()
        model.train(was_training)
        return math.exp(total / count) if count else None


# ---------------------------------------------------------------------------------------------- entry point
def finetune_lm(model, *, cfg, proto, source: str, data, val, opts, out, resume: bool, log, progress,
                stop_after_steps: int | None = None, checkpoint_every: int | None = None):
    """Fine-tune a recurrent language model (called by qcompile.finetune for a model qcompile.lm recognises):
    see the module docstring. Returns a FinetuneResult whose report gives float, post-training and fine-tuned
    validation perplexity (onnxruntime on the ONNX models)."""
    import os

    from qcompile import api, lm
    from qcompile.finetune import api as ft
    from qcompile.finetune.convert import to_torch
    from qcompile.finetune.data import DataError, open_tokens
    from qcompile.finetune.loop import CHECKPOINT_FORMAT, atomic_torch_save
    from qcompile.finetune.qat import quant_layers
    from qcompile.targets.cpu.caps import model_name, usable_cpus

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise QcompileError("fine-tuning a language model runs in one process for now; drop --nproc / torchrun")
    sig = lm.lm_signature(proto)
    seq_len = opts.seq_len or 35
    train = open_tokens(data, name="train", seq_len=seq_len)
    train.check_vocab(sig.vocab)
    if val is not None:
        val_s = open_tokens(val, name="val", seq_len=seq_len)
    elif len(train) >= 40 * opts.batch * seq_len:
        train, val_s = train.split(0.1)
    else:
        val_s = None
    if val_s is not None:
        val_s.check_vocab(sig.vocab)
        if len(val_s) < 2 * 10:
            raise DataError(f"{val_s.describe}: {len(val_s)} tokens are too few to measure perplexity")
    if train.num_batches(opts.batch) == 0:
        raise DataError(f"{train.describe}: {len(train)} tokens make no window of {seq_len} x {opts.batch}; lower "
                        "--batch or --seq-len")
    ckpt_path, saved = ft.output_folder(out, resume)
    torch.manual_seed(opts.seed)
    torch.set_num_threads(max(1, usable_cpus()))
    source_sha = ft._sha256(model)
    fingerprint = {"source_sha256": source_sha, "config": cfg.to_dict(), "options": opts.fingerprint(),
                   "train": train.describe, "train_n": len(train)}
    if saved is not None:
        ft._check_resume(saved, fingerprint, ckpt_path)

    ptq = api.compile(model, config=cfg, calib=StreamReader(train, sig))
    quantized = [n for n, p in ptq.ctx.plan.items() if p.quantize]
    if not quantized:
        raise QcompileError(f"{model}: no layer is quantized under config {cfg.name} (see `qcompile inspect`); "
                            "nothing to fine-tune")
    teacher = to_torch(ptq.float_model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_lm_student(ptq, cfg, learn_clip=opts.learn_clip, gbits=opts.gbits)
    generators = []
    if opts.gbits:
        for i, layer in enumerate(quant_layers(student).values()):
            layer.grad_generator = torch.Generator().manual_seed(opts.seed * 1000 + i)
            generators.append(layer.grad_generator)
    trainer = LMTrainer(student, teacher if opts.distill else None, train, val_s, opts, sig=sig,
                        grad_generators=generators, log=log, progress=progress)
    if saved is not None:
        trainer.load_state(saved["state"])
        float_ppl, ptq_ppl = saved["float_val_ppl"], saved["ptq_val_ppl"]
        log(f"resumed from {ckpt_path} at step {trainer.step} (epoch {trainer.epoch + 1}, window "
            f"{trainer.batch_in_epoch})")
    elif val_s is not None:
        float_ppl = lm.perplexity(ptq.float_model, val_s.tokens)
        ptq_ppl = lm.perplexity(ptq.model, val_s.tokens)
    else:
        float_ppl = ptq_ppl = None
    log(f"fine-tuning language model W{cfg.bits_w}A{cfg.bits_a} {cfg.quantizer}: {len(train)} training tokens "
        f"({train.describe}), {trainer.steps_per_epoch} windows of {seq_len} x {opts.batch}/epoch x "
        f"{trainer.epochs} epochs = {trainer.total_steps} steps, lr {opts.lr:g}"
        + (", distillation from the float model" if trainer.use_teacher else ""))
    if val_s is not None:
        log(f"validation ({len(val_s)} tokens): perplexity float {float_ppl:.2f}, post-training {ptq_ppl:.2f}")

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, **fingerprint, "float_val_ppl": float_ppl, "ptq_val_ppl": ptq_ppl,
                "ptq_val_acc": None, "float_val_acc": None, "state": trainer.state()}

    def save_checkpoint() -> None:
        if ckpt_path is not None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_torch_save(checkpoint(), ckpt_path)

    def on_epoch_end(tr, rec) -> None:
        val_txt = f"val perplexity {rec.val_acc:.2f} (float {float_ppl:.2f})  " if rec.val_acc is not None else ""
        log(f"epoch {rec.epoch}/{tr.epochs}  loss {rec.loss:.4f} (train perplexity {math.exp(rec.loss):.2f})  "
            f"{val_txt}{rec.images_per_s * seq_len:,.0f} tokens/s  {rec.seconds:.1f} s")
        save_checkpoint()

    def on_step(tr) -> None:
        if checkpoint_every and tr.step % checkpoint_every == 0:
            save_checkpoint()

    train_seconds = ft.fit_with_checkpoints(trainer, on_epoch_end, on_step, stop_after_steps, save_checkpoint,
                                            ckpt_path)

    compiled, trained_float = ft.export(ptq.float_model, student, cfg, source, source_sha)
    check = {"n_tokens": 0}
    final_ppl = None
    if val_s is not None:
        final_ppl = lm.perplexity(compiled.model, val_s.tokens)
        torch_ppl = trainer.evaluate(val_s)
        check = {"n_tokens": len(val_s), "torch_ppl": torch_ppl, "onnxruntime_ppl": final_ppl,
                 "rel_diff": abs(final_ppl - torch_ppl) / torch_ppl}
    report = {
        "task": "language-model", "source": source, "source_sha256": source_sha, "config": cfg.to_dict(),
        "options": opts.fingerprint(), "train_data": train.describe, "train_n": len(train),
        "val_data": val_s.describe if val_s is not None else None, "val_n": len(val_s) if val_s is not None else 0,
        "float_val_ppl": float_ppl, "ptq_val_ppl": ptq_ppl, "finetuned_val_ppl": final_ppl,
        "float_val_acc": None, "ptq_val_acc": None, "finetuned_val_acc": None,
        "steps": trainer.step, "epochs": trainer.epochs, "train_seconds_this_run": round(train_seconds, 2),
        "history": trainer.history.to_dict(), "export_check": check, "recurrent": compiled.report["recurrent"],
        "layers": compiled.report["layers"], "kept_float_weighted": compiled.report["kept_float_weighted"],
        "totals": compiled.report["totals"], "cpu": model_name(),
    }
    return ft.FinetuneResult(source, cfg, opts, compiled, trained_float, checkpoint(), report)


# ---------------------------------------------------------------------------------------------- report
def to_markdown(report: dict) -> str:
    cfg, opts = report["config"], report["options"]

    def ppl(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"# Fine-tuning report (language model): {report['source']}", "",
        f"W{cfg['bits_w']}A{cfg['bits_a']}, quantizer `{cfg['quantizer']}`, {report['steps']} steps "
        f"({report['epochs']} epochs) of {opts.get('seq_len') or 35} tokens x {opts['batch']} columns (truncated "
        f"BPTT), lr {opts['lr']:g}" + (", distillation" if opts.get("distill") else "")
        + f"; CPU: {report.get('cpu', '?')}", "",
        f"Training data: {report['train_data']} ({report['train_n']} tokens); validation: "
        f"{report['val_data'] or 'none'} ({report['val_n']} tokens).", "",
        "| model | validation perplexity |", "|---|---:|",
        f"| float | {ppl(report['float_val_ppl'])} |",
        f"| post-training quantized | {ppl(report['ptq_val_ppl'])} |",
        f"| fine-tuned quantized | {ppl(report['finetuned_val_ppl'])} |", "",
        "Perplexity as qcompile.lm.perplexity computes it (onnxruntime, 10 columns, windows of 35, states carried).",
        "", "## Epochs", "", "| epoch | steps | loss | train perplexity | val perplexity (torch) | tokens/s | seconds "
        "| lr |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seq = opts.get("seq_len") or 35
    for e in report["history"]["epochs"]:
        lines.append(f"| {e['epoch']} | {e['steps']} | {e['loss']:.4f} | {math.exp(min(e['loss'], 50)):.2f} | "
                     f"{ppl(e['val_acc'])} | {e['images_per_s'] * seq:,.0f} | {e['seconds']:.1f} | {e['lr']:.2e} |")
    chk = report["export_check"]
    lines += ["", "## Export", ""]
    if chk.get("n_tokens"):
        lines.append(f"model.onnx (fake-quant Scan form) in onnxruntime against the trained torch model on "
                     f"{chk['n_tokens']} validation tokens: perplexity {chk['onnxruntime_ppl']:.4f} vs "
                     f"{chk['torch_ppl']:.4f} (relative difference {chk['rel_diff']:.2g}).")
    lines += ["", "| layer | op | bits | quantizer | quantized | relative weight error |", "|---|---|---|---|---|---:|"]
    for r in report["recurrent"]:
        lines.append(f"| {r['node']} | {r['op']} | W{r['bits_w']}A{r['bits_a']} | {r['quantizer']} | "
                     f"{r['quantized']} | {r['rel_error']} |")
    for r in report["layers"]:
        lines.append(f"| {r['node']} | {r['op']} | W{r['bits_w']}A{r['bits_a']} | | act clip {r['act_clip']:.4g} | |")
    return "\n".join(lines) + "\n"


def curves_png(report: dict) -> bytes:
    """Training loss per step and validation perplexity against float and post-training."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["history"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = np.asarray(hist["step_loss"], float)
    if loss.size:
        ax1.plot(np.arange(1, loss.size + 1), loss, lw=0.6, alpha=0.4, label="step")
        k = max(1, loss.size // 50)
        ax1.plot(np.arange(k, loss.size + 1), np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5,
                 label=f"mean of {k}")
        ax1.legend()
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (cross entropy)")
    points = [p for p in hist.get("val_points") or [] if p[1] is not None]
    if report["ptq_val_ppl"] is not None:
        steps, ppl = zip(*([[0, report["ptq_val_ppl"]]] + points))
        ax2.plot(steps, ppl, "o-", label="quantized (step 0: post-training)")
        ax2.axhline(report["float_val_ppl"], color="k", ls="--", lw=1, label="float")
        ax2.set_yscale("log")
        ax2.set_ylabel("validation perplexity")
        ax2.legend(loc="upper right")
    ax2.set_xlabel("step")
    cfg = report["config"]
    fig.suptitle(f"{report['source']}: W{cfg['bits_w']}A{cfg['bits_a']} {cfg['quantizer']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
