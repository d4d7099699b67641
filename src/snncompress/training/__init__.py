"""Training: one loop with callbacks (:mod:`.loop`), used by every stage that trains."""

from .callbacks import (Callback, ClampNeurons, Distillation, EnforceMasks, QuantizeAfterStep,
                        TrainState)
from .loop import TrainConfig, evaluate_accuracy, seed_everything, train

__all__ = ["Callback", "ClampNeurons", "Distillation", "EnforceMasks", "QuantizeAfterStep", "TrainConfig",
           "TrainState", "evaluate_accuracy", "seed_everything", "train"]
