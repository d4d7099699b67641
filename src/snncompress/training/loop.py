"""One readable training loop for both twins (ANN with ReLU, SNN with BPTT), open through callbacks.

The same loop trains the ANN twin and the SNN: the model's mode decides what
runs. What methods add to training is a :class:`Callback`; the loop calls
its hooks at fixed points of every step::

    logits = model(images)
    loss   = CE(logits, labels)             then  cb.loss(state, images, labels, logits, loss)
    loss.backward()                         then  cb.after_backward(state)   (gradient edits)
    optimizer.step()                        then  cb.after_step(state)       (projections)
    end of epoch                            then  cb.on_epoch_end(state, row)

Every run has :class:`ClampNeurons` (leak in [0, 1], threshold above a floor)
and :class:`EnforceMasks` (stored values under a pruning mask stay zero; the
mask parametrization already gives them zero gradient). :class:`Distillation`
and :class:`QuantizeAfterStep` are opt-in. The memory tools
(``lean_memory``, ``checkpoint_layers``) are config flags, so they take effect
in every stage that trains.
"""

from __future__ import annotations

import csv
import io
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .. import distributed
from ..errors import UserError
from ..io import write_bytes
from ..models import SpikingNetwork
from .callbacks import Callback, ClampNeurons, EnforceMasks, KeepBestEpoch, TrainState
from .memory import checkpoint_layers, lean_memory
from .resume import Progress, load_snapshot, run_key, save_snapshot
from .speed import CompiledForward, autocast, batch_layout, subnormals_as_zero, to_memory_format

#: steps between two host reads of the loss sums on a GPU (a CPU reads after every step: it costs nothing)
GPU_CHECK_EVERY = 50



class TrainConfig(BaseModel):
    """Optimisation settings of one training run: the one definition, validated once.

    A training stage's options (:class:`snncompress.stages.base.TrainOptions`) are this model plus
    the stage's own fields, so a recipe's training keys, their defaults and their checks live here.
    ``lr`` is the peak learning rate; the cosine schedule decays it to 0 over all steps of ``epochs``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = Field(
        "adam", description="adam (amsgrad, as DIET-SNN) or sgd (momentum, Nesterov)")
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning rate over the stage: cosine decay from lr to 0, or constant")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    keep: Literal["last", "best"] = Field(
        "last", description="the weights the stage ends with: the last epoch's, or those of the epoch with the "
                            "highest validation accuracy (ties: the earlier)")
    max_batches: int | None = Field(None, ge=1, description="cap on batches per epoch (quick runs)")
    lean_memory: bool = Field(False, description="keep spike tensors for backward as uint8 (exact)")
    checkpoint_layers: bool = Field(False, description="recompute each spiking layer in backward")
    snapshot_every_steps: int | None = Field(
        None, ge=1, description="also write a resumable training snapshot every N steps (always after each epoch)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast convolutions and linear layers (LIF state stays float32)")
    channels_last: bool = Field(False, description="NHWC weights and batches (faster convolutions on GPUs)")
    compile: bool = Field(False, description="torch.compile the forward pass (eager fallback if it fails)")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop training cleanly after this many seconds; after the first epoch the "
                                "cosine schedule is shortened to the epochs that fit")
    seed: int = Field(0, ge=0, description="seeds torch and numpy and the data order")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a CPU run repeats bit for bit."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam(amsgrad) or SGD over all trainable parameters; neuron parameters get no weight decay."""
    neuron, weights = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (neuron if name.endswith(("leak", "threshold")) or p.dim() <= 1 else weights).append(p)
    groups = [{"params": weights, "weight_decay": cfg.weight_decay},
              {"params": neuron, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, amsgrad=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Cosine decay from ``peak`` at step 0 to 0 at ``total``."""
    return 0.5 * peak * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@torch.inference_mode()
def evaluate_accuracy(model: SpikingNetwork, loader, device="cpu", max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(images.to(device, non_blocking=True))
        correct += (logits.argmax(1) == labels.to(logits.device)).sum()
        total += labels.numel()
    model.train(was_training)
    return correct.item() / max(total, 1)


def _neuron_summary(model: SpikingNetwork) -> dict:
    layers = list(model.spiking_layers())
    if not layers or not model.spiking:
        return {}
    return {"mean_leak": float(np.mean([lif.leak.mean().item() for _, lif in layers])),
            "mean_threshold": float(np.mean([lif.threshold.mean().item() for _, lif in layers]))}


# ----------------------------------------------------------------------------- the loop


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; training stopped (the last snapshot is kept)."""


def train(model: SpikingNetwork, train_loader, val_loader, cfg: TrainConfig, *,
          device="cpu", csv_path: Path | None = None, desc: str = "train",
          callbacks: list[Callback] = (), snapshot_path: Path | None = None) -> list[dict]:
    """Train ``model`` in its current mode; returns one metrics dict per epoch.

    ``callbacks`` run after the built-in :class:`ClampNeurons` and :class:`EnforceMasks`.
    Each epoch row: ``epoch``, ``train_loss``, ``train_accuracy``, ``val_accuracy``
    (0-1, on the validation split), ``lr``, ``seconds``, for SNNs the mean leak and
    threshold, and what callbacks add; ``csv_path`` is rewritten with all rows after
    each epoch. With ``snapshot_path`` the run is resumable (:mod:`.resume`): a
    snapshot is written after every epoch, every ``cfg.snapshot_every_steps`` steps
    and on Ctrl-C / SIGTERM (then ``KeyboardInterrupt`` is raised), and a matching
    snapshot found at the start is resumed. A non-finite loss raises
    :class:`TrainingDiverged`. ``cfg.time_budget_s`` ends training cleanly when the
    time is spent (after the first epoch the cosine schedule is shortened to the
    epochs that fit), and the last row says ``stopped``. Speed switches:
    :mod:`.speed`. Under ``torchrun`` the steps are data parallel
    (:mod:`snncompress.distributed`).
    """
    seed_everything(cfg.seed)
    model.to(device).train()
    lean_memory(model, cfg.lean_memory)
    checkpoint_layers(model, cfg.checkpoint_layers)
    to_memory_format(model, cfg.channels_last)
    try:
        with interrupt_flag() as interrupted, subnormals_as_zero(device):
            run = _Run(model, train_loader, val_loader, cfg, device, csv_path, desc,
                       [ClampNeurons(), EnforceMasks(), *callbacks], snapshot_path, interrupted)
            return run.epochs()
    finally:  # later users get the plain model back
        lean_memory(model, False)
        checkpoint_layers(model, False)
        to_memory_format(model, False)


@contextmanager
def interrupt_flag():
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a flag the loop checks between steps.

    Yields a zero-argument callable that tells whether one arrived. A second
    Ctrl-C interrupts at once. Outside the main thread nothing is installed.
    """
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(seen)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Run:
    """One call of :func:`train`: the epochs, the steps, the snapshots, the checks.

    The step never waits for the device: loss, correct count and a finite flag
    accumulate on it, and the host reads them at check points only (every
    step on a CPU, every :data:`GPU_CHECK_EVERY` steps on a GPU, and before
    every snapshot and epoch end). Interrupts, the time budget and a
    non-finite loss are acted on at those points, so every snapshot holds a
    state whose losses were all finite.
    """

    clock = staticmethod(time.perf_counter)  # seconds; tests replace it to play out a time budget

    def __init__(self, model, train_loader, val_loader, cfg, device, csv_path, desc, callbacks,
                 snapshot_path, interrupted):
        self.model, self.val_loader, self.cfg, self.device = model, val_loader, cfg, torch.device(device)
        self.keeper = KeepBestEpoch() if cfg.keep == "best" else None  # last: it reads the finished epoch row
        self.train_loader, self.csv_path, self.desc = train_loader, csv_path, desc
        self.callbacks = callbacks if self.keeper is None else [*callbacks, self.keeper]
        self.snapshot_path, self.interrupted = snapshot_path, interrupted
        per_epoch = len(train_loader) if cfg.max_batches is None else min(cfg.max_batches, len(train_loader))
        self.per_epoch = per_epoch
        self.key = run_key(cfg, model, per_epoch) if snapshot_path is not None else ""
        self.state = TrainState(model, make_optimizer(model, cfg), cfg, device, total_steps=cfg.epochs * per_epoch)
        self.net = distributed.wrap_model(model, device)
        if cfg.compile:
            self.net = CompiledForward(self.net, desc)
        self.batches = distributed.ShardedLoader(train_loader, distributed.rank(), distributed.world_size())
        self.check_every = 1 if self.device.type == "cpu" else GPU_CHECK_EVERY
        self.started = self.clock()
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, seen
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.stop_reason: str | None = None

    def epochs(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self.state)
        progress = self._resume() or Progress(loader_epoch=getattr(self.train_loader, "epoch", 0),
                                              epochs=self.cfg.epochs)
        progress.epochs = progress.epochs or self.cfg.epochs
        self.state.total_steps = progress.epochs * self.per_epoch
        while progress.epoch < progress.epochs and self.stop_reason is None:
            self._epoch(progress)
        _set_loader_epoch(self.train_loader, progress.loader_epoch)
        self._keep_best(progress.history)
        return progress.history

    def _keep_best(self, history: list[dict]) -> None:
        """With ``keep: best``: load the best validation epoch's weights and mark its row ``kept``."""
        if self.keeper is None or not history:
            return
        self.keeper.restore(self.model)
        for row in history:
            row["kept"] = int(row["epoch"] == self.keeper.best_epoch)
        print(f"[{self.desc}] keeping epoch {self.keeper.best_epoch}/{len(history)} "
              f"(validation accuracy {self.keeper.best_accuracy:.4f})", flush=True)
        if self.csv_path is not None:
            _write_csv(self.csv_path, history)

    def _resume(self) -> Progress | None:
        if self.snapshot_path is None:
            return None
        progress = load_snapshot(self.snapshot_path, self.key, self.model, self.state.optimizer, self.callbacks)
        if progress is not None:
            self.state.step = progress.step
            print(f"[{self.desc}] resuming at epoch {progress.epoch + 1}, batch {progress.batch} "
                  f"(step {progress.step}) from {Path(self.snapshot_path).name}", flush=True)
        return progress

    def snapshot(self, progress: Progress) -> None:
        if self.snapshot_path is not None:
            save_snapshot(self.snapshot_path, self.key, self.model, self.state.optimizer, progress, self.callbacks)

    def _epoch(self, progress: Progress) -> None:
        state = self.state
        state.epoch = progress.epoch
        _set_loader_epoch(self.train_loader, progress.loader_epoch)
        self.sums.copy_(torch.tensor(progress.sums, dtype=torch.float64))
        start = self.clock() - progress.seconds
        bar = tqdm(total=self.per_epoch, initial=progress.batch,
                   desc=f"{self.desc} {progress.epoch + 1}/{progress.epochs}", leave=False, disable=None)
        for i, (images, labels, global_count) in enumerate(self.batches):
            if i >= self.per_epoch:
                break
            if i < progress.batch:  # trained before the snapshot; the loader still draws its augmentation
                continue
            self._step(images, labels, global_count, progress)
            progress.batch, progress.seconds = i + 1, self.clock() - start
            bar.update(1)
            if self._at_check_point(progress):
                bar.set_postfix(loss=f"{progress.sums[0] / max(progress.sums[2], 1):.3f}")
                if self.stop_reason is not None:
                    break
        bar.close()
        self._sync(progress)
        self._finish_epoch(progress, self.clock() - start)

    def _step(self, images, labels, global_count: int, progress: Progress) -> None:
        cfg, state = self.cfg, self.state
        lr = cosine_lr(state.step, state.total_steps, cfg.lr) if cfg.lr_schedule == "cosine" else cfg.lr
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        images = batch_layout(images.to(self.device, non_blocking=True), cfg.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        with autocast(self.device, cfg.precision):
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            for cb in self.callbacks:
                loss = cb.loss(state, images, labels, logits, loss)
        state.optimizer.zero_grad(set_to_none=True)
        # each rank's mean over its share, weighted so DDP's gradient average is the global batch's mean
        (loss * (labels.numel() * distributed.world_size() / global_count)).backward()
        for cb in self.callbacks:
            cb.after_backward(state)
        state.optimizer.step()
        for cb in self.callbacks:
            cb.after_step(state)
        state.step += 1
        progress.step, progress.lr = state.step, lr
        loss = loss.detach()
        self.finite &= torch.isfinite(loss)
        self.sums += torch.stack([loss.double() * labels.numel(), (logits.argmax(1) == labels).sum().double(),
                                  torch.tensor(float(labels.numel()), dtype=torch.float64, device=self.device)])

    def _at_check_point(self, progress: Progress) -> bool:
        """At a check point: sync with the device (and the other ranks), then act on interrupts, snapshots and
        the budget."""
        every = self.cfg.snapshot_every_steps
        snapshot_due = bool(every) and progress.step % every == 0 and progress.batch < self.per_epoch
        # every rank must reach the same check points (they all-reduce): a rank-local Ctrl-C waits for one
        local_interrupt = self.interrupted() and not distributed.active()
        if not (snapshot_due or local_interrupt or progress.step % self.check_every == 0):
            return False
        interrupted, over_budget = self._sync(progress, with_budget=True)
        if interrupted:
            self.snapshot(progress)
            where = f"; resumable from {Path(self.snapshot_path).name}" if self.snapshot_path else ""
            print(f"[{self.desc}] interrupted at epoch {progress.epoch + 1}, batch {progress.batch}{where}",
                  flush=True)
            raise KeyboardInterrupt
        if snapshot_due:
            self.snapshot(progress)
        if over_budget and self.stop_reason is None:  # stop after this batch; the epoch is closed as usual
            self.stop_reason = (f"time budget of {self.cfg.time_budget_s:g} s reached at epoch {progress.epoch + 1}, "
                                f"batch {progress.batch}")
            print(f"[{self.desc}] {self.stop_reason}: training stops here", flush=True)
        return True

    def _sync(self, progress: Progress, with_budget: bool = False) -> tuple[bool, bool]:
        """Copy the device's running sums into ``progress`` and agree with every rank, in one reduction,
        on (an interrupt arrived, ``time_budget_s`` is spent); stop if a loss since the last sync was not finite.
        """
        budget = self.cfg.time_budget_s
        over = with_budget and budget is not None and self.clock() - self.started > budget
        flags = [float(not bool(self.finite)), float(self.interrupted()), float(over)]
        diverged, interrupted, over = (flag > 0 for flag in distributed.all_reduce_sum(flags, self.device))
        if diverged:
            last = self.sums[0].item()
            kept = (f"the last good state is kept in {Path(self.snapshot_path).name}"
                    if self.snapshot_path is not None and Path(self.snapshot_path).exists() else "nothing was saved")
            raise TrainingDiverged(f"{self.desc}: the loss became {_non_finite(last)} at epoch {progress.epoch + 1}, "
                                   f"batch {progress.batch}; training stopped (try a lower lr); {kept}")
        progress.sums = self.sums.tolist()
        return interrupted, over

    def _replan(self, progress: Progress, seconds: float) -> None:
        """After the first epoch: if all epochs would overrun ``time_budget_s``, end the schedule earlier.

        The cosine schedule then decays to 0 at the last epoch that fits rather than
        being cut off at a high learning rate.
        """
        budget = self.cfg.time_budget_s
        if budget is None or self.stop_reason or progress.epoch != 1 or progress.epochs * seconds <= budget:
            return
        fits = max(1, int(distributed.all_reduce_sum([budget / seconds], self.device)[0]
                          / distributed.world_size()))
        if fits < progress.epochs:
            print(f"[{self.desc}] time budget of {budget:g} s fits {fits} of {progress.epochs} epochs "
                  f"({seconds:.1f} s each): the schedule now ends after epoch {fits}", flush=True)
            progress.epochs = fits
            self.state.total_steps = fits * self.per_epoch

    def _finish_epoch(self, progress: Progress, seconds: float) -> None:
        model = self.model
        loss_sum, correct, seen = distributed.all_reduce_sum(progress.sums, self.device)
        row = {"epoch": progress.epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1),
               "val_accuracy": evaluate_accuracy(model, self.val_loader, self.device),
               "lr": progress.lr, "seconds": seconds, **_neuron_summary(model)}
        if self.stop_reason is not None:
            row["stopped"] = self.stop_reason
        for cb in self.callbacks:
            cb.on_epoch_end(self.state, row)
        progress.history.append(row)
        progress.epoch, progress.batch, progress.seconds = progress.epoch + 1, 0, 0.0
        progress.sums, progress.loader_epoch = [0.0, 0.0, 0.0], progress.loader_epoch + 1
        print(f"[{self.desc}] epoch {row['epoch']}/{progress.epochs}: loss {row['train_loss']:.4f} "
              f"train {row['train_accuracy']:.4f} val {row['val_accuracy']:.4f} ({row['seconds']:.1f} s)",
              flush=True)
        if self.csv_path is not None:
            _write_csv(self.csv_path, progress.history)
        self._replan(progress, seconds)
        self.snapshot(progress)


def kept_row(history: list[dict]) -> dict:
    """The epoch row whose weights a training run ended with: the one marked ``kept``, else the last."""
    return next((row for row in history if row.get("kept")), history[-1])


def _non_finite(value: float) -> str:
    """How a loss sum that is no longer finite reads: ``nan``, ``inf`` or ``-inf``."""
    return str(value) if not math.isfinite(value) else "nan"


def _set_loader_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


def _write_csv(path: Path, rows: list[dict]) -> None:
    """All epoch rows as CSV, written atomically (a resumed run rewrites it whole)."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(Path(path), text.getvalue().encode())
