"""One readable training loop for both twins (ANN with ReLU, SNN with BPTT).

The same loop trains the ANN twin and the SNN: the model's mode decides what
runs. After every optimizer step the LIF leaks and thresholds are projected
back into range and pruning masks (``model.masks``) are re-applied; masked
weights also get zero gradients, so a sparse model stays sparse.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models import SpikingNetwork


LR_SCHEDULES = ("cosine", "constant")


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage.

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
    distill_weight: float = 0.0       # weight of the teacher term in the loss (0: no teacher)
    distill_temperature: float = 2.0  # softmax temperature of the teacher term


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


def _mask_gradients(model: SpikingNetwork) -> None:
    params = dict(model.named_parameters())
    for name, mask in model.masks.items():
        if params[name].grad is not None:
            params[name].grad.mul_(mask.to(params[name].grad.dtype))


def _neuron_summary(model: SpikingNetwork) -> dict:
    layers = list(model.spiking_layers())
    if not layers or not model.spiking:
        return {}
    return {"mean_leak": float(np.mean([lif.leak.mean().item() for _, lif in layers])),
            "mean_threshold": float(np.mean([lif.threshold.mean().item() for _, lif in layers]))}


def training_loss(logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                  teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy, blended with knowledge distillation when a teacher's logits are given.

    ``logits``, ``teacher_logits``: ``[B, K]``; ``labels``: ``[B]``. With weight ``w`` and
    temperature ``tau``: ``(1 - w) * CE + w * tau^2 * KL(softmax(teacher / tau) || softmax(logits / tau))``
    (Hinton et al. 2015).
    """
    ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.distill_weight == 0:
        return ce
    tau = cfg.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                  reduction="batchmean", log_target=True) * tau ** 2
    return (1.0 - cfg.distill_weight) * ce + cfg.distill_weight * kd


def _teacher_logits(teacher: torch.nn.Module | None, student: SpikingNetwork, images: torch.Tensor):
    """The teacher's logits on ``images`` ``[B, K]``, rescaled to the student's timesteps.

    SNN logits are sums over t, so a T = 4 teacher's are about 4x a T = 1 student's; both are
    compared per timestep (teacher logits x T_student / T_teacher).
    """
    if teacher is None:
        return None
    with torch.no_grad():
        out = teacher(images)
    t_teacher, t_student = getattr(teacher, "timesteps", 1), getattr(student, "timesteps", 1)
    if getattr(teacher, "spiking", False) and getattr(student, "spiking", False) and t_teacher != t_student:
        out = out * (t_student / t_teacher)
    return out


def train(model: SpikingNetwork, train_loader, val_loader, cfg: TrainConfig, *,
          device="cpu", csv_path: Path | None = None, desc: str = "train",
          teacher: torch.nn.Module | None = None) -> list[dict]:
    """Train ``model`` in its current mode; returns one metrics dict per epoch.

    ``teacher`` (eval mode, frozen) adds a distillation term to the loss when
    ``cfg.distill_weight > 0`` (see :func:`training_loss`).

    Each epoch row: ``epoch``, ``train_loss``, ``train_accuracy``,
    ``val_accuracy`` (0-1, on the validation split), ``lr``, ``seconds``, and for SNNs the mean leak
    and threshold. Rows are also appended to ``csv_path`` as they finish.
    """
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if cfg.distill_weight > 0 and teacher is None:
        raise ValueError("distill_weight > 0 needs a teacher model")
    seed_everything(cfg.seed)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    optimizer = make_optimizer(model, cfg)
    per_epoch = len(train_loader) if cfg.max_batches is None else min(cfg.max_batches, len(train_loader))
    total_steps, step, history = cfg.epochs * per_epoch, 0, []
    model.apply_masks()
    for epoch in range(cfg.epochs):
        start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        bar = tqdm(total=per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        for i, (images, labels) in enumerate(train_loader):
            if i >= per_epoch:
                break
            lr = cosine_lr(step, total_steps, cfg.lr) if cfg.lr_schedule == "cosine" else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss = training_loss(logits, labels, cfg, _teacher_logits(teacher, model, images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _mask_gradients(model)
            optimizer.step()
            model.clamp_neurons()
            model.apply_masks()
            step += 1
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
               "train_accuracy": correct / max(seen, 1),
               "val_accuracy": evaluate_accuracy(model, val_loader, device),
               "lr": lr, "seconds": time.perf_counter() - start, **_neuron_summary(model)}
        history.append(row)
        print(f"[{desc}] epoch {row['epoch']}/{cfg.epochs}: loss {row['train_loss']:.4f} "
              f"train {row['train_accuracy']:.4f} val {row['val_accuracy']:.4f} ({row['seconds']:.1f} s)",
              flush=True)
        if csv_path is not None:
            _append_csv(csv_path, row)
    return history


def _append_csv(path: Path, row: dict) -> None:
    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
