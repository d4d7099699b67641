"""Training: one loop with callbacks (:mod:`.loop`), used by every stage that trains."""

from .callbacks import (Callback, ClampNeurons, Distillation, EnforceMasks, KeepBestEpoch, QuantizeAfterStep,
                        TrainState)
from .loop import TrainConfig, evaluate_accuracy, kept_row, seed_everything, train

__all__ = ["Callback", "ClampNeurons", "Distillation", "EnforceMasks", "KeepBestEpoch", "QuantizeAfterStep",
           "TrainConfig", "TrainState", "evaluate_accuracy", "kept_row", "seed_everything", "train"]
