"""The stage framework: options, context, result, registry, and the helpers every method's stages share.

A stage is a function ``run(ctx, opts) -> StageResult`` registered under its
``kind`` together with a strict options model (pydantic): it reads the
previous stage's model from ``ctx``, returns a model and metrics, and touches
files only inside its own folder ``ctx.stage_dir``. Stages choose on the
validation split (``ctx.val_loader``) and report ``val_accuracy``; the
pipeline adds every returned model's test accuracy.

A method's stages register by living in this package: :func:`stage_kinds`
imports every module of :mod:`snncompress.stages`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import Field

from ..errors import UserError
from ..io import save_figure
from ..models import SpikingNetwork, build_model
from ..models.stdp import ARCH as STDP_ARCH
from ..recipe import SEED_LIMIT, Recipe, Strict
from ..training import Callback, Distillation, TrainConfig, kept_row, seed_everything, train


SNAPSHOT_SUFFIX = ".resume.safetensors"  # training snapshots in a stage folder, removed when the stage ends


#: What a stage's ``needs`` asks of the model the stages before it leave, and how a model is named.
NEEDS = {"model": "a model", "ann": "an ANN (train_ann)", "snn": "a spiking model (convert or train_snn)"}
MODES = {"ann": "an ANN", "snn": "a spiking model"}


@dataclass(frozen=True)
class Chain:
    """What the stages so far leave for the next one, as far as it is known before anything runs."""

    mode: str | None = None       # the model's mode: None (no model yet), "ann" or "snn"
    timesteps: int | None = None  # its T; None once a stage chose T at run time
    source: str | None = None     # the name of the stage that made it
    earlier: tuple = ()           # (name, mode) of every earlier stage, for options that name one
    arch: str | None = None       # the recipe's model.arch
    no_surgery: str | None = None  # why the model cannot be narrowed (an imported graph that is no chain)


class StageOptions(Strict):
    """Options every stage has, and what the stage needs from the stages before it."""

    #: what the stage needs from earlier stages: None (nothing), "model" (any), "ann" or "snn"
    needs: ClassVar[str | None] = None
    #: the mode of the model it returns: "ann", "snn", or None (the model it got, unchanged)
    produces: ClassVar[str | None] = None
    #: options added after runs existed: part of the fingerprint only when set to a value other than the
    #: default, so the folders of earlier runs stay finished
    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset()

    kind: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                             description="folder and report name (letters, digits, '_', '.', '-'; "
                                         "no path); default: the kind")

    def check(self, chain: Chain) -> None:
        """Rules between these options and what the stages before leave; raises ValueError("option: ...")."""

    def needs_channel_surgery(self) -> bool:
        """Whether these options narrow the model's channels (refused on graph networks at recipe load)."""
        return False

    def input_digest(self) -> str:
        """Hash of what the stage reads besides the run (e.g. a checkpoint file); part of its fingerprint."""
        return ""

    def leaves(self, chain: Chain) -> Chain:
        """What this stage leaves for the next one."""
        return chain if self.produces is None else replace(chain, mode=self.produces, source=self.name)

    def follow(self, chain: Chain) -> Chain:
        """Check this stage after ``chain`` (ValueError saying what is wrong); returns what it leaves."""
        if self.needs is not None and chain.mode is None:
            raise ValueError(f"needs {NEEDS[self.needs]} from an earlier stage; put one before it")
        if self.needs in MODES and chain.mode != self.needs:
            raise ValueError(f"needs {NEEDS[self.needs]}, but stage {chain.source!r} before it leaves "
                             f"{MODES[chain.mode]}")
        if chain.no_surgery and self.needs_channel_surgery():
            raise ValueError(f"kind: {self.kind} narrows channels, which this imported graph network does not allow "
                             f"({chain.no_surgery}); prune with masks instead (prune_imp, prune_criticality mode: "
                             f"unstructured)")
        if chain.arch == "graph" and getattr(self, "checkpoint_layers", False):
            raise ValueError("checkpoint_layers: an imported graph network runs its own layers, which "
                             "checkpoint_layers cannot segment; leave it false")
        self.check(chain)
        left = self.leaves(chain)
        return replace(left, earlier=(*chain.earlier, (self.name, left.mode)))


@dataclass
class StageContext:
    """What a stage can see: the recipe, the data, the previous model, and its own folder."""

    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    device: torch.device
    train_loader: Any
    val_loader: Any                            # held out of training; every selection reads it
    test_loader: Any                           # read only to report (the pipeline and `evaluate`)
    info: Any                                  # data.DatasetInfo
    model: SpikingNetwork | None               # the previous stage's model (None for the first)
    previous: list[dict] = field(default_factory=list)  # earlier stages' records (name, kind, metrics)
    reference_ann: SpikingNetwork | None = None  # the run's trained ANN (its train_ann stage), if any
    seed: int = 0                              # the stage's seed: its own ``seed`` option, else the recipe's

    def new_model(self) -> SpikingNetwork:
        """A fresh network as the recipe's ``model`` section describes it (initialised from the stage's seed)."""
        cfg = self.recipe.model
        seed_everything(self.seed)
        return build_model(cfg.arch, self.info.num_classes, self.info.in_shape, cfg.timesteps,
                           encoding=cfg.encoding, neuron=cfg.neuron.model_dump(), **cfg.options)

    def require_model(self, kind: str) -> SpikingNetwork:
        if self.model is None:
            raise UserError(f"stage {kind!r} needs a model from an earlier stage")
        return self.model

    def relative(self, path: Path) -> str:
        """``path`` relative to the run folder (reports never hold machine-specific prefixes)."""
        try:
            return Path(path).relative_to(self.run_dir).as_posix()
        except ValueError:
            return Path(path).name


@dataclass
class StageResult:
    """A stage's output: the model (None = unchanged, no new checkpoint) and its metrics.

    Masks and quantizers travel on the model. Metrics hold validation figures
    (``val_accuracy``); the pipeline adds the model's test ``accuracy``.
    """

    model: SpikingNetwork | None
    metrics: dict = field(default_factory=dict)
    full_metrics: bool = False  # True when metrics already hold the complete measurement (docs/measuring.md)


@dataclass
class StageDef:
    kind: str
    options: type[StageOptions]
    run: Callable[[StageContext, StageOptions], StageResult]
    module: str = ""


STAGES: dict[str, StageDef] = {}


def register_stage(kind: str, options: type[StageOptions]):
    """Decorator: register ``run(ctx, opts)`` as the stage ``kind`` with its options model."""
    def wrap(run):
        STAGES[kind] = StageDef(kind, options, run, run.__module__.rsplit(".", 1)[-1])
        return run
    return wrap


def stage_kinds() -> dict[str, StageDef]:
    """All registered stages: every module of this package is imported (each registers its own)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return STAGES


# ----------------------------------------------------------------------------- training options


class TrainOptions(StageOptions, TrainConfig):
    """Options of every stage that trains: the loop's :class:`~snncompress.training.TrainConfig` (its one
    definition: fields, defaults, checks) plus the stage's seed."""

    HASHED_WHEN_CHANGED: ClassVar[frozenset[str]] = frozenset({"seed", "keep", "augment", "crop_padding"})

    augment: Literal["none", "flip", "crop_flip"] | None = Field(
        None, description="this stage's augmentation of the training images (in-memory datasets): none, "
                          "horizontal flip, or random crop (crop_padding) + flip. Default: the recipe's data.augment")
    crop_padding: int | None = Field(
        None, ge=1, description="zero pixels added on each side before the random crop of augment: crop_flip "
                                "(default: the recipe's data.crop_padding)")
    seed: int | None = Field(
        None, ge=0, lt=SEED_LIMIT,
        description="this stage's own seed (repeats of a stage over seeds): it seeds torch and numpy, and "
                    "the stage sees the data order of a fresh run with this seed (from its first epoch); "
                    "the run's own order resumes after it. Default: the recipe's seed, continuing the run's order")

    def check(self, chain: Chain) -> None:
        if chain.arch == STDP_ARCH and self.trains_by_gradient():
            raise ValueError(f"kind: {self.kind} trains by backpropagation; the {STDP_ARCH} network learns by "
                             "STDP (kind: train_stdp)")
        if self.optimizer == "sgd" and self.momentum == 0:
            raise ValueError("momentum: optimizer sgd (Nesterov) needs momentum > 0")
        if self.optimizer == "adam" and "momentum" in self.model_fields_set:
            raise ValueError("momentum: only used with optimizer: sgd")
        if self.crop_padding is not None and self.augment != "crop_flip":
            raise ValueError("crop_padding: only used with augment: crop_flip")

    def trains_by_gradient(self) -> bool:
        """Whether these options make the stage train by backpropagation (not every option set does)."""
        return True

    def train_config(self, seed: int, **overrides) -> TrainConfig:
        """The loop's config from these options (``overrides`` replace single fields, e.g. ``epochs``)."""
        values = self.model_dump(include=set(TrainConfig.model_fields))
        return TrainConfig(**{**values, "seed": seed, **overrides})


class DistillOptions(TrainOptions):
    """Options of a training stage that can distil from a frozen teacher (``temporal``: the model it starts from,
    at its T; ``train_snn``: that model's ANN twin, the converted ANN; ``prune_pca``: the unpruned model)."""

    distill: float = Field(0.0, ge=0, le=1, description="weight of distillation from the stage's teacher (temporal: "
                                                        "its starting model at its T; train_snn: the converted ANN; "
                                                        "prune_pca: the unpruned model) in the loss; 0 = off")
    distill_temperature: float = Field(2.0, gt=0, description="softmax temperature of the distillation term")

    def check(self, chain: Chain) -> None:
        super().check(chain)
        if "distill_temperature" in self.model_fields_set and self.distill == 0:
            raise ValueError("distill_temperature: only used with distill > 0")

    def distillation(self, make_teacher: Callable[[], torch.nn.Module]) -> list[Callback]:
        """The training callbacks these options ask for: distillation from ``make_teacher()`` (called only when
        ``distill`` > 0: teachers are copies of the model), or none."""
        return [Distillation(make_teacher(), self.distill, self.distill_temperature)] if self.distill > 0 else []


def fit(ctx: StageContext, model: SpikingNetwork, config: TrainConfig, log_name: str = "train_log.csv",
        desc: str = "train", callbacks: list[Callback] = ()) -> list[dict]:
    """Train ``model`` in its current mode on the training split, validating on ``ctx.val_loader``.

    Resumable: the snapshot ``<log stem>.resume.safetensors`` in the stage folder is
    continued when a killed or interrupted run of the same stage is rerun.
    """
    return train(model, ctx.train_loader, ctx.val_loader, config, device=ctx.device,
                 csv_path=ctx.stage_dir / log_name, desc=desc, callbacks=list(callbacks),
                 snapshot_path=ctx.stage_dir / f"{Path(log_name).stem}{SNAPSHOT_SUFFIX}")


def training_metrics(history: list[dict]) -> dict:
    """A training stage's metrics: the kept epoch's validation accuracy (the last one unless ``keep: best``),
    epochs, the kept epoch, seconds per epoch."""
    kept = kept_row(history)
    return {"val_accuracy": kept["val_accuracy"], "epochs": len(history), "kept_epoch": kept["epoch"],
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history)}


def save_selection_plot(fig, ax, path: Path, xlabel: str, title: str) -> str:
    """Finish a plot of validation accuracy against a knob that shrinks to the right (T, bits); save it as PNG."""
    ax.invert_xaxis()
    ax.set(xlabel=xlabel, ylabel="validation accuracy", title=title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
