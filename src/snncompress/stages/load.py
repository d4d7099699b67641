"""The ``load`` stage: start a recipe from a model another run produced (read only).

Lets a chain continue across device commands, e.g. the spatio-temporal pruning of
``recipes/stp-cifar10.yaml`` from the DIET model of ``recipes/diet-cifar10.yaml``.
The file is checked when the recipe loads (a damaged or foreign file is one line,
nothing written), and its content hash is part of the stage's fingerprint, so a
changed file reruns the chain after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..checkpoint import load_checkpoint, read_metadata
from ..errors import UserError
from .base import Chain, StageContext, StageOptions, StageResult, register_stage


class LoadOptions(StageOptions):
    kind: Literal["load"] = "load"
    checkpoint: str = Field(min_length=1, description="a model.safetensors written by a stage (only read)")

    def leaves(self, chain: Chain) -> Chain:
        """The loaded model's mode and T, from the file's metadata (no tensors read)."""
        try:
            spec = read_metadata(self.checkpoint)["spec"]
        except (UserError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        return replace(chain, mode="snn" if spec.get("spiking", True) else "ann",
                       timesteps=spec.get("timesteps"), source=self.name)

    def input_digest(self) -> str:
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


@register_stage("load", LoadOptions)
def load(ctx: StageContext, opts: LoadOptions) -> StageResult:
    """Load a model written by another run (its dataset must be this recipe's)."""
    loaded = load_checkpoint(Path(opts.checkpoint), ctx.device)
    trained_on = loaded.info.get("dataset")
    if trained_on is not None and trained_on != ctx.info.name:
        raise UserError(f"{opts.checkpoint} was trained on {trained_on}, this recipe uses {ctx.info.name}")
    return StageResult(loaded.model, {"loaded_from": Path(opts.checkpoint).name,
                                      "loaded_accuracy": loaded.info.get("accuracy")})
