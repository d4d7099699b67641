"""The ``load`` stage: start a recipe from a model another run produced, or from a NIR file (read only).

A ``.nir`` file written by another framework (snnTorch, Norse, Sinabs, Rockpool) becomes a graph network
(:mod:`snncompress.deploy.nir.graph`): ``timesteps`` (T per image), ``dt`` and ``integration`` say how to run
its neurons, as for ``snncompress import``. Its input must be the dataset's image shape and its output one
value per class.

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
from typing import ClassVar, Literal

from pydantic import Field

from ..checkpoint import load_checkpoint, read_metadata
from ..deploy.nir import INTEGRATIONS, RESETS, is_nir_file, load_nir
from ..errors import UserError
from ..models import build_from_spec
from .base import Chain, StageContext, StageOptions, StageResult, register_stage


class LoadOptions(StageOptions):
    kind: Literal["load"] = "load"
    checkpoint: str = Field(min_length=1, description="a model.safetensors written by a stage, or a .nir file "
                                                      "from any framework (only read)")
    timesteps: int | None = Field(None, ge=1, description="NIR file: T per image (default: the file's)")
    dt: float | None = Field(None, gt=0, description="NIR file: the neurons' time step in seconds (default: the "
                                                      "file's; snnTorch's export: 1e-4; Norse 1.1's: its dt "
                                                      "squared, 1e-6; docs/interop.md)")
    integration: Literal[INTEGRATIONS] = Field("euler", description="NIR file: how the neurons are made discrete "
                                                                     "(euler: snnTorch; jump: Norse, Sinabs; "
                                                                     "rockpool)")
    reset: Literal[RESETS] | None = Field(None, description="NIR file: reset of every spiking node (default: the "
                                                             "file's, zero)")
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset({"timesteps", "dt", "integration", "reset"})

    def is_nir(self) -> bool:
        return is_nir_file(self.checkpoint)

    def load_nir(self):
        """The model in the NIR file (a graph network for a foreign graph)."""
        return load_nir(self.checkpoint, timesteps=self.timesteps, dt=self.dt, integration=self.integration,
                        reset=self.reset)

    def leaves(self, chain: Chain) -> Chain:
        """The loaded model's mode and T, from the file's metadata (a NIR file: its graph, checked here)."""
        if self.is_nir():
            try:
                model = self.load_nir()
            except UserError as exc:
                raise ValueError(f"checkpoint: {exc}") from None
            return replace(chain, mode="snn", timesteps=model.timesteps, source=self.name,
                           arch=model.spec.get("arch", chain.arch), no_surgery=_no_surgery(model))
        if self.timesteps is not None or self.dt is not None or self.integration != "euler" or self.reset:
            raise ValueError("timesteps, dt, integration and reset apply to a .nir file only")
        try:
            spec = read_metadata(self.checkpoint)["spec"]
        except (UserError, KeyError, TypeError) as exc:
            raise ValueError(f"checkpoint: {exc}") from None
        graph = spec.get("family") == "graph"
        return replace(chain, mode="snn" if spec.get("spiking", True) else "ann",
                       timesteps=spec.get("timesteps"), source=self.name, arch=spec.get("arch", chain.arch),
                       no_surgery=_no_surgery(build_from_spec(spec)) if graph else None)

    def input_digest(self) -> str:
        digest = hashlib.sha256()
        with open(self.checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


def _no_surgery(model) -> str | None:
    """Why channel surgery cannot narrow ``model`` (its family's refusal), or None when it can."""
    try:
        model.channel_groups()
    except ValueError as exc:
        return str(exc)
    return None


@register_stage("load", LoadOptions)
def load(ctx: StageContext, opts: LoadOptions) -> StageResult:
    """Load a model written by another run (its dataset must be this recipe's), or a NIR file."""
    if opts.is_nir():
        model = opts.load_nir().to(ctx.device)
        shape, classes = tuple(model.spec["in_shape"]), int(model.spec["num_classes"])
        if shape != tuple(ctx.info.in_shape) or classes != ctx.info.num_classes:
            raise UserError(f"{opts.checkpoint} takes input {list(shape)} and gives {classes} outputs; dataset "
                            f"{ctx.info.name} has images {list(ctx.info.in_shape)} and {ctx.info.num_classes} classes")
        return StageResult(model, {"loaded_from": Path(opts.checkpoint).name, "loaded_accuracy": None})
    loaded = load_checkpoint(Path(opts.checkpoint), ctx.device)
    trained_on = loaded.info.get("dataset")
    if trained_on is not None and trained_on != ctx.info.name:
        raise UserError(f"{opts.checkpoint} was trained on {trained_on}, this recipe uses {ctx.info.name}")
    return StageResult(loaded.model, {"loaded_from": Path(opts.checkpoint).name,
                                      "loaded_accuracy": loaded.info.get("accuracy")})
