"""Recipes: YAML files that say which data, which model and which stages to run.

A recipe is validated strictly (pydantic, unknown keys rejected) before
anything is written. Every option has a default and a range; a violation
becomes one :class:`UserError` line naming the option::

    name: demo
    seed: 0
    device: auto                  # auto | cpu | cuda
    data: {dataset: mnist-builtin, batch_size: 128}
    model: {arch: convnet, timesteps: 4, neuron: {reset: soft}}
    stages:
      - {kind: train_ann, epochs: 3, lr: 1.0e-3}
      - {kind: convert, calib_timesteps: 16}
      - {kind: train_snn, epochs: 2, lr: 1.0e-4}
      - {kind: evaluate}

Stage kinds and their options live in :mod:`snncompress.stages`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError
from .models import MODEL_NAMES
from .neuron import RESETS, SURROGATES


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are not coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=False)


class DataConfig(Strict):
    dataset: str = "mnist-builtin"
    data_dir: str | None = Field(None, description="offline data folder; default: env SNNCOMPRESS_DATA")
    batch_size: int = Field(128, ge=1)
    test_batch_size: int = Field(512, ge=1)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    augment: bool = True
    val_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "seeded, class-stratified slice of the training split held out for every selection "
        "(timesteps, bit widths, schedules); the test split is only reported"))
    num_workers: int = Field(0, ge=0)


class NeuronConfig(Strict):
    leak: float = Field(1.0, ge=0.0, le=1.0)
    threshold: float = Field(1.0, gt=0.0)
    reset: Literal[RESETS] = "soft"
    surrogate: Literal[SURROGATES] = "linear"
    learn_leak: bool = True
    learn_threshold: bool = True
    per_channel: bool = False
    backend: str = "auto"


class ModelConfig(Strict):
    arch: str = "convnet"
    timesteps: int = Field(4, ge=1, description="T, simulation steps")
    encoding: Literal["direct", "poisson"] = "direct"
    neuron: NeuronConfig = NeuronConfig()
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="family options: features, classifier, batchnorm, dropout, ...")

    @field_validator("arch")
    @classmethod
    def known_arch(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; choose one of {', '.join(MODEL_NAMES)}")
        return value


class Recipe(Strict):
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: list[dict[str, Any]] = Field(min_length=1)
    #: measurement options used for the report's baseline/final models (see the ``evaluate`` stage).
    measure: dict[str, Any] = Field(default_factory=dict)


def format_validation_error(exc: ValidationError, where: str) -> str:
    """One line naming the first offending option, e.g. ``recipe: stages[1].lr: must be > 0``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].replace("Value error, ", "")
    if err["type"] == "extra_forbidden":
        msg = "unknown option"
    extra = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err \
        and not isinstance(err["input"], dict) else ""
    return f"{where}: {loc}: {msg}{extra}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set key.path=value`` overrides (values parsed as YAML) to the raw recipe dict.

    Stage entries are addressed by index (``stages.2.epochs=3``) or by name or
    kind (``stages.train_snn.epochs=3``).
    """
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node, parts = raw, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            raise UserError(f"--set {key}: cannot replace a whole stage")
        node[last] = yaml.safe_load(value)
    return raw


def _child(node, part: str, path: str):
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        for stage in node:
            if isinstance(stage, dict) and part in (stage.get("name"), stage.get("kind")):
                return stage
        raise UserError(f"--set {path}: no stage with index or name {part!r}")
    if not isinstance(node, dict):
        raise UserError(f"--set {path}: {part!r} is not a section")
    return node.setdefault(part, {})


def load_recipe(path, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe; returns the model and the raw dict (for provenance)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping with a 'stages' list")
    raw = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"recipe {path.name}")) from None
    return recipe, raw
