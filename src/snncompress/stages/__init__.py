"""Recipe stages: the framework (:mod:`.base`) and one module per method.

=============  ==========================================================
module         stages
=============  ==========================================================
``diet``       ``train_ann``, ``convert``, ``train_snn`` (DIET-SNN)
``stp``        ``prune_pca``, ``temporal`` (spatio-temporal pruning)
``quant``      ``quant_sweep`` (post-training weight quantization)
``evaluate``   ``evaluate`` (the measurement of docs/measuring.md)
=============  ==========================================================

A new method adds a module here; :func:`~.base.stage_kinds` finds it.
"""

from .base import (STAGES, StageContext, StageDef, StageOptions, StageResult, TrainOptions, register_stage,
                   stage_kinds)

__all__ = ["STAGES", "StageContext", "StageDef", "StageOptions", "StageResult", "TrainOptions",
           "register_stage", "stage_kinds"]
