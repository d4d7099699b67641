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

Checked before the first write, besides each option's type and range: the
model's family options (``model.options.<name>``) and that the network fits the
data's images, the LIF backend, the seed (``0 <= seed < 2**32``), the stage
order (each stage gets the model it needs from the ones before it) and the
rules between a stage's options. The YAML is read as plain data only: tags that
build Python objects and keys given twice are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .data import CROP_PADDING
from .errors import UserError, format_validation_error
from .models import MODEL_NAMES, build_model, family_options
from .neuron import NeuronOptions

#: Seeds go to torch.manual_seed and numpy, which take 0 <= seed < 2**32.
SEED_LIMIT = 2**32


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, NaN and infinity are not numbers."""

    model_config = ConfigDict(extra="forbid", strict=False, allow_inf_nan=False)


class DataConfig(Strict):
    dataset: str = "mnist-builtin"
    data_dir: str | None = Field(None, description="offline data folder; default: env SNNCOMPRESS_DATA")
    batch_size: int = Field(128, ge=1)
    test_batch_size: int = Field(512, ge=1)
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    augment: bool | Literal["crop_flip"] = Field(True, description=(
        "true: the dataset's default (random crop + flip on CIFAR-style and image-folder data, none on "
        "MNIST-style data); crop_flip: random crop (crop_padding) + horizontal flip on any in-memory dataset; "
        "false: none"))
    crop_padding: int = Field(CROP_PADDING, ge=0, description="zero pixels added on each side before the random crop")
    #: added after runs were made: hashed into fingerprints only when changed (pipeline.fingerprint)
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset({"crop_padding"})
    val_fraction: float = Field(0.1, gt=0, lt=1, description=(
        "seeded, class-stratified slice of the training split held out for every selection "
        "(timesteps, bit widths, schedules); the test split is only reported"))
    num_workers: int = Field(0, ge=0)
    on_device: bool | None = Field(None, description=(
        "hold in-memory datasets on the run's device (uint8) and cut, augment and normalise batches there; "
        "default: on a GPU"))


#: A recipe's ``model.neuron`` section: the neuron's one options model (:class:`snncompress.neuron.NeuronOptions`).
NeuronConfig = NeuronOptions


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

    @field_validator("options")
    @classmethod
    def family_option_values(cls, value: dict, info: ValidationInfo) -> dict:
        """Checked against the arch's family options (errors name ``model.options.<key>``); kept as written."""
        if "arch" in info.data:
            family_options(info.data["arch"]).model_validate(value)
        return value


class Recipe(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seeds torch and numpy: 0 <= seed < 2**32")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    stages: list[dict[str, Any]] = Field(min_length=1)
    #: measurement options used for the report's baseline/final models (see the ``evaluate`` stage).
    measure: dict[str, Any] = Field(default_factory=dict)

    def check_model(self, in_shape, num_classes: int, where: str) -> None:
        """Pass one image through the network built on the meta device (no memory, no arithmetic).

        An architecture that does not fit the data (more poolings than the image has
        pixels) is then a UserError naming ``model.options`` before anything is written.
        """
        cfg, shape = self.model, tuple(int(v) for v in in_shape)
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "initializing zero-element tensors is a no-op"
                model = build_model(cfg.arch, num_classes, shape, cfg.timesteps, encoding=cfg.encoding,
                                    neuron=cfg.neuron.model_dump(), **cfg.options)
                model.set_spiking(False).eval()(torch.zeros(1, *shape))
        except (RuntimeError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"{where}: model.options: {cfg.arch} does not fit the data's "
                            f"{'x'.join(map(str, shape))} images: {reason}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set key.path=value`` overrides (values parsed as YAML) to the raw recipe dict.

    Stage entries are addressed by index (``stages.2.epochs=3``) or by name or
    kind (``stages.train_snn.epochs=3``); any other list is set whole.
    """
    for item in overrides:
        key, value = _split_override(item)
        parts, node = key.split("."), raw
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[:i])
        if not isinstance(node, dict):
            parent = ".".join(parts[:-1])
            if isinstance(node, list) and parent == "stages":
                raise UserError(f"--set {key}: cannot replace a whole stage; set its options one by one")
            raise UserError(f"--set {key}: {parent} is a value ({type(node).__name__}), not a section")
        node[parts[-1]] = _parse_value(key, value)
    return raw


def _split_override(item: str) -> tuple[str, str]:
    """``key=value`` -> ``(key, value)``; a missing ``=`` or an empty key part is a UserError."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    if not all(key.split(".")):
        raise UserError(f"--set {item!r}: the key has an empty part; write e.g. stages.train_snn.epochs=3")
    return key, value


def _parse_value(key: str, value: str):
    try:
        return read_yaml(value)
    except YAML_ERRORS as exc:
        raise UserError(f"--set {key}: the value is not valid YAML: {yaml_problem(exc)}") from None


def _child(node, part: str, above: list[str]):
    """Section ``part`` of ``node`` (the path ``above`` leads to it); created when missing."""
    path = ".".join([*above, part])
    if isinstance(node, list) and above == ["stages"]:
        if part.isdecimal() and int(part) < len(node):
            return node[int(part)]
        for stage in node:
            if isinstance(stage, dict) and part in (stage.get("name"), stage.get("kind")):
                return stage
        raise UserError(f"--set {path}: no stage with index or name {part!r}")
    if not isinstance(node, dict):
        raise UserError(f"--set {path}: {'.'.join(above)} is a value ({type(node).__name__}), not a section")
    return node.setdefault(part, {})


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python object tags), refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the keys as written (a merge ``<<: *x`` may be overridden)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


#: What reading hostile YAML raises: syntax, refused tags, nesting deeper than Python's stack,
#: integers with more digits than Python converts.
YAML_ERRORS = (yaml.YAMLError, RecursionError, ValueError)


def read_yaml(text: str | bytes):
    """Parse YAML safely (plain data only, no duplicate keys); raises one of :data:`YAML_ERRORS`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: Exception) -> str:
    """One line saying what is wrong in a YAML text and where."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    if "python/" in problem:
        problem = f"tags that build Python objects are refused: {problem}"
    mark = getattr(exc, "problem_mark", None)
    return " ".join(problem.split()) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def load_recipe(path, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """Read, override and validate a recipe; returns the model and the raw dict (for provenance)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = read_yaml(path.read_bytes())
    except YAML_ERRORS as exc:
        raise UserError(f"recipe {path} is not valid YAML: {yaml_problem(exc)}") from None
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping with a 'stages' list")
    raw = apply_overrides(raw, overrides or [])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"recipe {path.name}")) from None
    return recipe, raw

