"""The concrete callbacks of the training loop (clamping neurons, masks, quantization, distillation,
keeping the best epoch).

The protocol they implement, and the points of every step at which the loop calls them, are in
:mod:`snncompress.hooks`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..compress.masks import enforce_masks_
from ..compress.quantizers import snap_to_grid_
from ..hooks import Callback, TrainState


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


class KeepBestEpoch(Callback):
    """Remember the weights (and buffers) of the epoch with the highest validation accuracy.

    After training, :meth:`restore` puts them back into the model; ties keep the earlier epoch. The
    remembered copy is part of resumable snapshots, so a resumed run keeps the same epoch.
    """

    def __init__(self) -> None:
        self.best_accuracy, self.best_epoch = -1.0, 0
        self.weights: dict[str, torch.Tensor] = {}

    def on_epoch_end(self, state: TrainState, row: dict) -> None:
        if row["val_accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_epoch = float(row["val_accuracy"]), int(row["epoch"])
            self.weights = {name: value.detach().cpu().clone() for name, value in state.model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (nothing happens before the first epoch ends)."""
        if self.weights:
            model.load_state_dict(self.weights)

    def state_dict(self) -> dict:
        return {"best_accuracy": self.best_accuracy, "best_epoch": self.best_epoch,
                **{f"w.{name}": value for name, value in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.best_accuracy = float(state.get("best_accuracy", -1.0))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.weights = {name[2:]: value for name, value in state.items() if name.startswith("w.")}


class Distillation(Callback):
    """Blend the loss with knowledge distillation from a frozen ``teacher`` (Hinton et al. 2015).

    With weight ``w`` and temperature ``tau``: ``(1 - w) * loss + w * tau^2 * KL(softmax(teacher / tau) ||
    softmax(logits / tau))``. SNN logits are sums over t, so a T = 4 teacher's are about 4x a T = 1
    student's: both are compared per timestep (teacher logits x T_student / T_teacher; an ANN teacher
    counts as one timestep).
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
        spiking = getattr(student, "spiking", False)
        t_student = getattr(student, "timesteps", 1) if spiking else 1
        t_teacher = getattr(self.teacher, "timesteps", 1) if getattr(self.teacher, "spiking", False) else 1
        if t_teacher != t_student:
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
