"""The training loop: one place for single-process fine-tuning (and, later, the distributed runtime).

Exact resume: the batch order is a function of (seed, epoch) only, the checkpoint records the epoch and the batch
index inside it together with the model, optimizer, schedule and gradient-noise generator states, so a run that
stops (Ctrl-C) and resumes sees the same batches and computes the same losses as one that never stopped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from qcompile.errors import QcompileError

CHECKPOINT_FORMAT = "qcompile-finetune-1"


class TrainingError(QcompileError):
    """Training cannot go on: a NaN loss, a checkpoint that does not match, an interrupted run."""


class Interrupted(TrainingError):
    """Ctrl-C or SIGTERM: the checkpoint is saved; the CLI exits with 130 like any interrupted command."""


@dataclass
class TrainOptions:
    epochs: int = 2
    steps: int | None = None          # total optimizer steps; overrides epochs when given
    batch: int = 64
    lr: float = 3e-4                  # fine-tuning from a trained model: 1e-3 made 1-bit weights churn (loss rose)
    weight_decay: float = 0.0
    seed: int = 0
    distill: bool = False             # train against the float model's outputs (always when there are no labels)
    distill_weight: float = 0.5       # with labels and --distill: loss = (1-w) CE + w KL
    temperature: float = 1.0
    gbits: int | None = None          # DoReFa stochastic gradient quantization of each quantized layer's output
    learn_clip: bool = False          # the activation clips are trained (PACT/LSQ-style)
    eval_batch: int = 512
    seq_len: int | None = None        # language models: tokens per truncated-BPTT window (None: not a language model)

    def fingerprint(self) -> dict:
        """What must not change between a run and its resume (the loss curve depends on all of it)."""
        return asdict(self)


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    loss: float
    train_acc: float | None
    val_acc: float | None
    images_per_s: float
    seconds: float
    lr: float


@dataclass
class History:
    step_loss: list[float] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    val_points: list[list] = field(default_factory=list)   # [step, validation accuracy], for the curve

    def to_dict(self) -> dict:
        return {"step_loss": self.step_loss, "epochs": [asdict(e) for e in self.epochs],
                "val_points": self.val_points}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(list(d["step_loss"]), [EpochRecord(**e) for e in d["epochs"]], list(d.get("val_points", [])))


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save into a temporary sibling, fsync, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, probabilities: bool):
    """KL(teacher || student) on class scores, or MSE for outputs that are not [batch, classes]."""
    if student.dim() != 2:
        return F.mse_loss(student, teacher)
    t = temperature
    if probabilities:  # the model ends in Softmax: its outputs are already probabilities
        log_s = torch.log(student.clamp_min(1e-12))
        return F.kl_div(log_s, teacher, reduction="batchmean")
    return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                    log_target=True) * (t * t)


def label_loss(out: torch.Tensor, y: torch.Tensor, probabilities: bool):
    if probabilities:
        return F.nll_loss(torch.log(out.clamp_min(1e-12)), y)
    return F.cross_entropy(out, y)


class Trainer:
    """Owns the student, optimizer and schedule; `fit` runs epochs, `evaluate` scores a data set."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module | None, train, val, opts: TrainOptions, *,
                 probabilities: bool = False, grad_generators=(), log: Callable[[str], None] = print,
                 progress=None, dist=None):
        from qcompile.finetune.distributed import DistContext

        self.student, self.teacher, self.train_ds, self.val_ds, self.opts = student, teacher, train, val, opts
        self.dist = dist or DistContext()
        self.model = self.dist.wrap(student)   # DDP over the student when there are several ranks
        self.probabilities = probabilities
        self.log, self.progress = log, progress
        self.use_labels = train.y is not None
        self.use_teacher = teacher is not None and (opts.distill or not self.use_labels)
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=opts.lr, weight_decay=opts.weight_decay)
        self.steps_per_epoch = train.num_batches(opts.batch, drop_last=True) or 1
        self.total_steps = opts.steps if opts.steps else opts.epochs * self.steps_per_epoch
        # a small validation set is also scored 8 times a run, so the curve shows more than epoch ends
        self.eval_every = max(self.total_steps // 8, 25) if val is not None and len(val) <= 2000 else 0
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        # cosine decay to zero over the whole run: the usual schedule for fine-tuning
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, self.total_steps) / self.total_steps)))
        self.grad_generators = list(grad_generators)
        self.step = 0
        self.epoch = 0              # the epoch in progress (0-based)
        self.batch_in_epoch = 0     # batches of it already done
        self.history = History()
        self._epoch_loss: list[float] = []
        self._epoch_correct = 0
        self._epoch_seen = 0

    # --------------------------------------------------------------------------------------------- state
    def state(self) -> dict:
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "history": self.history.to_dict(),
                "epoch_partial": {"loss": list(self._epoch_loss), "correct": self._epoch_correct,
                                  "seen": self._epoch_seen},
                "grad_generators": [g.get_state() for g in self.grad_generators],
                "torch_rng": torch.get_rng_state()}

    def load_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = History.from_dict(state["history"])
        part = state["epoch_partial"]
        self._epoch_loss, self._epoch_correct, self._epoch_seen = list(part["loss"]), part["correct"], part["seen"]
        for g, s in zip(self.grad_generators, state["grad_generators"]):
            g.set_state(s)
        torch.set_rng_state(state["torch_rng"])

    # --------------------------------------------------------------------------------------------- steps
    def _loss(self, out, y, x):
        loss = None
        if self.use_labels and y is not None:
            loss = label_loss(out, y, self.probabilities)
        if self.use_teacher:
            with torch.no_grad():
                target = self.teacher(x)
                target = target[0] if isinstance(target, (tuple, list)) else target
            kd = distill_loss(out, target, self.opts.temperature, self.probabilities)
            loss = kd if loss is None else (1 - self.opts.distill_weight) * loss + self.opts.distill_weight * kd
        return loss

    def train_step(self, xb: np.ndarray, yb: np.ndarray | None) -> float:
        self.student.train()
        xb, yb = self.dist.shard(xb, yb)       # this rank's slice of the global batch
        x = torch.from_numpy(xb)
        y = torch.from_numpy(yb) if yb is not None else None
        out = self.model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = self._loss(out, y, x)
        correct = int((out.detach().argmax(1) == y).sum()) if y is not None and out.dim() == 2 else 0
        value, seen = float(loss.detach()), len(xb)
        if self.dist.enabled:  # the global batch's loss and hits: every rank the same, so a NaN stops them all
            loss_sum, correct, seen = self.dist.sum([value * len(xb), correct, len(xb)])
            value = loss_sum / seen
        if not math.isfinite(value):
            raise TrainingError(f"step {self.step + 1} (epoch {self.epoch + 1}): the loss is {value}; stopped, the "
                                "last good checkpoint is kept; lower --lr or check the data for NaN/Inf")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        if y is not None and out.dim() == 2:
            self._epoch_correct += int(correct)
            self._epoch_seen += int(seen)
        self._epoch_loss.append(value)
        self.history.step_loss.append(value)
        return value

    @torch.no_grad()
    def evaluate(self, ds, model: torch.nn.Module | None = None) -> float | None:
        """Top-1 accuracy on a labelled data set (None without labels or for non-classifier outputs)."""
        if ds is None or ds.y is None:
            return None
        model = model or self.student
        model.eval()
        correct = 0
        for xb, yb in ds.batches(self.opts.eval_batch, seed=0, epoch=0, shuffle=False):
            out = model(torch.from_numpy(xb))
            out = out[0] if isinstance(out, (tuple, list)) else out
            if out.dim() != 2:
                return None
            correct += int((out.argmax(1).numpy() == yb).sum())
        return correct / len(ds)

    # --------------------------------------------------------------------------------------------- loop
    def fit(self, on_epoch_end: Callable[["Trainer", EpochRecord], None] | None = None,
            stop_after_steps: int | None = None, on_step: Callable[["Trainer"], None] | None = None) -> History:
        """Train until total_steps. Ctrl-C (KeyboardInterrupt) propagates with the position intact, so the caller
        can checkpoint it; `stop_after_steps` simulates that (tests). `on_step` runs after every step whose
        position is complete (e.g. a checkpoint every N steps)."""
        while self.step < self.total_steps:
            start, first = time.perf_counter(), self.batch_in_epoch
            remaining = min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)
            task = self.progress.add_task(f"epoch {self.epoch + 1}/{self.epochs}", total=remaining,
                                          completed=first) if self.progress else None
            batches = self.train_ds.batches(self.opts.batch, seed=self.opts.seed, epoch=self.epoch,
                                            start=self.batch_in_epoch, drop_last=True)
            for xb, yb in batches:
                if self.batch_in_epoch >= remaining:
                    break
                if stop_after_steps is not None and self.step >= stop_after_steps:
                    raise KeyboardInterrupt
                loss = self.train_step(xb, yb)
                self.batch_in_epoch += 1
                if on_step is not None and self.batch_in_epoch < remaining:  # an epoch's end has on_epoch_end
                    on_step(self)
                if self.eval_every and self.step % self.eval_every == 0 and self.batch_in_epoch < remaining:
                    acc = self.evaluate(self.val_ds)   # no state changes: a resumed run sees the same losses
                    if acc is not None:
                        self.history.val_points.append([self.step, acc])
                if task is not None:
                    self.progress.update(task, advance=1, description=f"epoch {self.epoch + 1}/{self.epochs} "
                                                                      f"loss {loss:.4f}")
            if task is not None:
                self.progress.remove_task(task)
            seconds = time.perf_counter() - start
            done = self.batch_in_epoch - first
            record = EpochRecord(
                epoch=self.epoch + 1, steps=self.step,
                loss=float(np.mean(self._epoch_loss)) if self._epoch_loss else float("nan"),
                train_acc=self._epoch_correct / self._epoch_seen if self._epoch_seen else None,
                val_acc=self.evaluate(self.val_ds), images_per_s=done * self.opts.batch / max(seconds, 1e-9),
                seconds=seconds, lr=float(self.optimizer.param_groups[0]["lr"]))
            self.history.epochs.append(record)
            if record.val_acc is not None:
                self.history.val_points.append([self.step, record.val_acc])
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_loss, self._epoch_correct, self._epoch_seen = [], 0, 0
            if on_epoch_end is not None:
                on_epoch_end(self, record)
        return self.history
