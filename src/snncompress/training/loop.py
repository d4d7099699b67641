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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..compress.masks import enforce_masks_
from ..compress.quantizers import snap_to_grid_
from ..errors import UserError
from ..io import write_bytes
from ..models import SpikingNetwork
from .memory import checkpoint_layers, lean_memory
from .resume import Progress, load_snapshot, run_key, save_snapshot


LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Optimisation settings of one training run.

    lr is the peak learning rate; the cosine schedule decays it to 0 over all
    steps of ``epochs``. ``max_batches`` limits the batches per epoch (tests).
    """

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"       # "adam" (amsgrad, as DIET) or "sgd" (momentum 0.9, nesterov)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"   # "cosine" or "constant"
    seed: int = 0
    max_batches: int | None = None
    label_smoothing: float = 0.0
    lean_memory: bool = False         # spike tensors saved for backward as uint8 (exact)
    checkpoint_layers: bool = False   # recompute each spiking layer in backward (exact)
    snapshot_every_steps: int | None = None  # resumable snapshot every N steps (always after each epoch)


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
    correct = total = 0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(images.to(device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)


def _neuron_summary(model: SpikingNetwork) -> dict:
    layers = list(model.spiking_layers())
    if not layers or not model.spiking:
        return {}
    return {"mean_leak": float(np.mean([lif.leak.mean().item() for _, lif in layers])),
            "mean_threshold": float(np.mean([lif.threshold.mean().item() for _, lif in layers]))}


# ----------------------------------------------------------------------------- callbacks


@dataclass
class TrainState:
    """What callbacks see: the model, its optimizer, the config and where the loop is (steps count from 0)."""

    model: SpikingNetwork
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    device: torch.device | str
    epoch: int = 0
    step: int = 0
    total_steps: int = 0


class Callback:
    """A hook set of the training loop (see the module docstring); every hook is optional."""

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def loss(self, state: TrainState, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        """The step's loss (scalar); ``logits`` ``[B, K]``, ``labels`` ``[B]``. Default: unchanged."""
        return loss

    def after_backward(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """What a resumed run needs to continue this callback (tensors and JSON values); default none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ClampNeurons(Callback):
    """Project every LIF's leak into [0, 1] and its threshold above its floor after each step."""

    def after_step(self, state: TrainState) -> None:
        state.model.clamp_neurons()


class EnforceMasks(Callback):
    """Zero the stored values under every pruning mask at the start and after each step."""

    def on_train_begin(self, state: TrainState) -> None:
        enforce_masks_(state.model)

    def after_step(self, state: TrainState) -> None:
        enforce_masks_(state.model)


class QuantizeAfterStep(Callback):
    """Move every quantized tensor's stored values onto its grid after each step (tinySNN's ITQ variant)."""

    def after_step(self, state: TrainState) -> None:
        snap_to_grid_(state.model)


class Distillation(Callback):
    """Blend the loss with knowledge distillation from a frozen ``teacher`` (Hinton et al. 2015).

    With weight ``w`` and temperature ``tau``: ``(1 - w) * loss + w * tau^2 * KL(softmax(teacher / tau) ||
    softmax(logits / tau))``. SNN logits are sums over t, so a T = 4 teacher's are about 4x a T = 1
    student's: both are compared per timestep (teacher logits x T_student / T_teacher).
    """

    def __init__(self, teacher: torch.nn.Module, weight: float, temperature: float = 2.0):
        if not 0 <= weight <= 1 or temperature <= 0:
            raise ValueError(f"distillation needs 0 <= weight <= 1 and temperature > 0, got {weight}, {temperature}")
        self.teacher, self.weight, self.temperature = teacher, float(weight), float(temperature)

    def on_train_begin(self, state: TrainState) -> None:
        self.teacher.to(state.device).eval().requires_grad_(False)

    def teacher_logits(self, student: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``images``, ``[B, K]``, rescaled to the student's timesteps."""
        with torch.no_grad():
            out = self.teacher(images)
        t_teacher, t_student = getattr(self.teacher, "timesteps", 1), getattr(student, "timesteps", 1)
        if getattr(self.teacher, "spiking", False) and getattr(student, "spiking", False) and t_teacher != t_student:
            out = out * (t_student / t_teacher)
        return out

    def loss(self, state, images, labels, logits, loss):
        if self.weight == 0:
            return loss
        tau = self.temperature
        teacher = self.teacher_logits(state.model, images)
        kd = F.kl_div(F.log_softmax(logits / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                      reduction="batchmean", log_target=True) * tau ** 2
        return (1.0 - self.weight) * loss + self.weight * kd


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
    :class:`TrainingDiverged`. Under ``torchrun`` the steps are data parallel
    (:mod:`snncompress.distributed`).
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    seed_everything(cfg.seed)
    model.to(device).train()
    lean_memory(model, cfg.lean_memory)
    checkpoint_layers(model, cfg.checkpoint_layers)
    try:
        with interrupt_flag() as interrupted:
            run = _Run(model, train_loader, val_loader, cfg, device, csv_path, desc,
                       [ClampNeurons(), EnforceMasks(), *callbacks], snapshot_path, interrupted)
            return run.epochs()
    finally:  # later users get the plain model back
        lean_memory(model, False)
        checkpoint_layers(model, False)


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
    """One call of :func:`train`: the epochs, the steps, the snapshots."""

    def __init__(self, model, train_loader, val_loader, cfg, device, csv_path, desc, callbacks,
                 snapshot_path, interrupted):
        self.model, self.val_loader, self.cfg, self.device = model, val_loader, cfg, device
        self.train_loader, self.csv_path, self.desc, self.callbacks = train_loader, csv_path, desc, callbacks
        self.snapshot_path, self.interrupted = snapshot_path, interrupted
        per_epoch = len(train_loader) if cfg.max_batches is None else min(cfg.max_batches, len(train_loader))
        self.per_epoch = per_epoch
        self.key = run_key(cfg, model, per_epoch) if snapshot_path is not None else ""
        self.state = TrainState(model, make_optimizer(model, cfg), cfg, device, total_steps=cfg.epochs * per_epoch)
        self.net = distributed.wrap_model(model, device)
        self.batches = distributed.ShardedLoader(train_loader, distributed.rank(), distributed.world_size())

    def epochs(self) -> list[dict]:
        for cb in self.callbacks:
            cb.on_train_begin(self.state)
        progress = self._resume() or Progress(loader_epoch=getattr(self.train_loader, "epoch", 0))
        while progress.epoch < self.cfg.epochs:
            self._epoch(progress)
        _set_loader_epoch(self.train_loader, progress.loader_epoch)
        return progress.history

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
        cfg, state = self.cfg, self.state
        state.epoch = progress.epoch
        _set_loader_epoch(self.train_loader, progress.loader_epoch)
        start = time.perf_counter() - progress.seconds
        bar = tqdm(total=self.per_epoch, initial=progress.batch, desc=f"{self.desc} {progress.epoch + 1}/{cfg.epochs}",
                   leave=False, disable=None)
        for i, (images, labels, global_count) in enumerate(self.batches):
            if i >= self.per_epoch:
                break
            if i < progress.batch:  # trained before the snapshot; the loader still draws its augmentation
                continue
            self._step(images, labels, global_count, progress)
            progress.batch, progress.seconds = i + 1, time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{progress.sums[0] / max(progress.sums[2], 1):.3f}")
            self._maybe_pause(progress)
        bar.close()
        self._finish_epoch(progress, time.perf_counter() - start)

    def _step(self, images, labels, global_count: int, progress: Progress) -> None:
        cfg, state = self.cfg, self.state
        lr = cosine_lr(state.step, state.total_steps, cfg.lr) if cfg.lr_schedule == "cosine" else cfg.lr
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(self.device), labels.to(self.device)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
        for cb in self.callbacks:
            loss = cb.loss(state, images, labels, logits, loss)
        value = loss.item()
        if distributed.any_rank(not math.isfinite(value), self.device):
            self._diverged(value, progress)
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
        sums = (value * labels.numel(), (logits.argmax(1) == labels).sum().item(), labels.numel())
        progress.sums = [a + b for a, b in zip(progress.sums, sums)]

    def _maybe_pause(self, progress: Progress) -> None:
        """Snapshot every ``snapshot_every_steps`` steps; on an interrupt, snapshot and stop."""
        if distributed.any_rank(self.interrupted(), self.device):
            self.snapshot(progress)
            where = f"; resumable from {Path(self.snapshot_path).name}" if self.snapshot_path else ""
            print(f"[{self.desc}] interrupted at epoch {progress.epoch + 1}, batch {progress.batch}{where}",
                  flush=True)
            raise KeyboardInterrupt
        every = self.cfg.snapshot_every_steps
        if every and progress.step % every == 0 and progress.batch < self.per_epoch:
            self.snapshot(progress)

    def _diverged(self, value: float, progress: Progress) -> None:
        kept = (f"the last good state is kept in {Path(self.snapshot_path).name}"
                if self.snapshot_path is not None and Path(self.snapshot_path).exists() else "nothing was saved")
        raise TrainingDiverged(f"{self.desc}: the loss became {value} at epoch {progress.epoch + 1}, "
                               f"batch {progress.batch + 1}; training stopped (try a lower lr); {kept}")

    def _finish_epoch(self, progress: Progress, seconds: float) -> None:
        cfg, model = self.cfg, self.model
        loss_sum, correct, seen = distributed.all_reduce_sum(progress.sums, self.device)
        row = {"epoch": progress.epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1),
               "val_accuracy": evaluate_accuracy(model, self.val_loader, self.device),
               "lr": progress.lr, "seconds": seconds, **_neuron_summary(model)}
        for cb in self.callbacks:
            cb.on_epoch_end(self.state, row)
        progress.history.append(row)
        progress.epoch, progress.batch, progress.seconds = progress.epoch + 1, 0, 0.0
        progress.sums, progress.loader_epoch = [0.0, 0.0, 0.0], progress.loader_epoch + 1
        print(f"[{self.desc}] epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f} "
              f"train {row['train_accuracy']:.4f} val {row['val_accuracy']:.4f} ({row['seconds']:.1f} s)",
              flush=True)
        if self.csv_path is not None:
            _write_csv(self.csv_path, progress.history)
        self.snapshot(progress)


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
