"""The training loop's callback protocol: :class:`Callback` and the :class:`TrainState` it sees.

A leaf module, so that compression methods (:mod:`snncompress.compress`) can subclass the
protocol without importing the training loop above them. The loop (:mod:`snncompress.training.loop`)
calls, for every registered callback::

    logits = model(images)
    loss   = CE(logits, labels)             then  cb.loss(state, images, labels, logits, loss)
    loss.backward()                         then  cb.after_backward(state)   (gradient edits)
    optimizer.step()                        then  cb.after_step(state)       (projections)
    end of epoch                            then  cb.on_epoch_end(state, row)

A callback with state across steps (schedules, momentum buffers) returns it from
``state_dict`` so a resumed run continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TrainState:
    """What callbacks see: the model, its optimizer, the config and where the loop is (steps count from 0)."""

    model: nn.Module  # a snncompress.models.SpikingNetwork
    optimizer: torch.optim.Optimizer
    config: Any  # the run's training.loop.TrainConfig
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
