"""Run a recipe: stages in order, one checkpoint and metrics file each, then the report.

Run folder layout::

    OUT/recipe.yaml                     the validated recipe as run (with --set applied)
    OUT/stages/NN-NAME/model.safetensors   the stage's model (stages that change it)
    OUT/stages/NN-NAME/metrics.json     written last: marks the stage finished
    OUT/stages/NN-NAME/train_log.csv    per-epoch metrics of training stages
    OUT/report.json, report.md, *.png   the run's report (docs/reference/report.md)

A stage is skipped when its ``metrics.json`` exists with the same fingerprint
(hash of the data and model sections, the seed, its own options and the
previous stage's fingerprint), so a killed run resumes where it stopped. A
stage that was cut short keeps its folder (``stage.json`` holds its
fingerprint) and its training snapshots (``*.resume.safetensors``), so its
training resumes mid-stage; the snapshots are removed when it finishes. A
live run holds ``OUT/.lock``; a second run on the same folder is refused.
Under ``torchrun`` every rank runs the stages and rank 0 writes
(:mod:`snncompress.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from . import __version__, distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .data import TensorBatchLoader, hold_out_validation, image_count, load_data
from .errors import UserError
from .io import atomic_write, folder_lock, write_json
from .metrics import count_params, footprint
from .recipe import Recipe, format_validation_error, load_recipe
from .report_schema import build_report
from .resources import check_recipe_resources
from .stages import StageContext, StageDef, stage_kinds
from .stages.base import SNAPSHOT_SUFFIX
from .stages.evaluate import EvaluateOptions, measure
from .training import evaluate_accuracy

CHECKPOINT_NAME = "model.safetensors"
STAGE_MARKER = "stage.json"  # written when a stage starts: its fingerprint, so a rerun can resume it


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def validate_stages(recipe: Recipe, where: str) -> list[tuple[StageDef, object]]:
    """Each raw stage dict -> (its definition, its validated options); names made unique.

    The order is checked too: each stage gets what it ``needs`` from the ones before it
    (:meth:`~snncompress.stages.base.StageOptions.follow`), e.g. ``convert`` an ANN.
    """
    from .errors import short_repr
    from .stages.base import Chain

    kinds, stages, names = stage_kinds(), [], set()
    chain = Chain(timesteps=recipe.model.timesteps, arch=recipe.model.arch)
    for i, raw in enumerate(recipe.stages):
        kind = raw.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            problem = "missing" if kind is None else f"unknown stage {short_repr(kind)}"
            raise UserError(f"{where}: stages[{i}].kind: {problem}; choose one of {', '.join(sorted(kinds))}")
        try:
            opts = kinds[kind].options.model_validate(raw)
        except ValidationError as exc:
            raise UserError(format_validation_error(exc, f"{where}: stages[{i}] ({kind})")) from None
        if opts.name is None:
            opts.name = kind if kind not in names else f"{kind}-{i}"
        if opts.name in names:
            raise UserError(f"{where}: stages[{i}].name: duplicate stage name {opts.name!r}")
        names.add(opts.name)
        try:
            chain = opts.follow(chain)
        except ValueError as exc:
            raise UserError(f"{where}: stages[{i}] ({kind}): {exc}") from None
        stages.append((kinds[kind], opts))
    return stages


#: options that change how a stage runs but not what it outputs (a change keeps its results and snapshots)
NOT_IN_FINGERPRINT = {"snapshot_every_steps"}
DATA_NOT_IN_FINGERPRINT = {"data_dir", "num_workers", "test_batch_size", "on_device"}


def _not_in_fingerprint(options, always: set[str]) -> set[str]:
    """Options left out of a hash: ``always``, and those of ``options.HASHED_WHEN_CHANGED`` (added later, so
    that runs made before them keep their fingerprints) while they hold their default."""
    fields = type(options).model_fields
    return always | {name for name in getattr(options, "HASHED_WHEN_CHANGED", ())
                     if getattr(options, name) == fields[name].default}


@contextmanager
def stage_data_order(loader, seed: int | None):
    """While a stage with its own ``seed`` runs, ``loader`` shuffles as a fresh run with that seed would
    (from epoch 0); afterwards it resumes the run's own seed and epoch. ``seed=None``: no change."""
    if seed is None:
        yield
        return
    saved = loader.seed, loader.epoch
    loader.seed, loader.epoch = seed, 0
    try:
        yield
    finally:
        loader.seed, loader.epoch = saved


@contextmanager
def stage_augmentation(loader, opts, data):
    """While a training stage with its own ``augment`` runs, ``loader`` (in memory) augments as it asks: ``none``,
    ``flip`` (a crop with no padding is the image itself) or ``crop_flip`` (``crop_padding``, default the recipe's
    ``data.crop_padding``); afterwards as the recipe says. No ``augment``: no change."""
    augment = getattr(opts, "augment", None)
    if augment is None:
        yield
        return
    padding = {"none": 0, "flip": 0, "crop_flip": opts.crop_padding or data.crop_padding}[augment]
    saved = loader.augment, loader.crop_padding
    loader.augment, loader.crop_padding = augment != "none", padding
    try:
        yield
    finally:
        loader.augment, loader.crop_padding = saved


def fingerprint(recipe: Recipe, opts, previous: str) -> str:
    """Hash of what determines a stage's output: the package version, the recipe's data (not the
    folder's location) and model sections, the seed, the stage's options and the previous stage's hash.

    Not included: the device and the number of processes, so a run moved from one machine to
    another keeps its finished stages.
    """
    payload = {"version": __version__,
               "data": recipe.data.model_dump(exclude=_not_in_fingerprint(recipe.data, DATA_NOT_IN_FINGERPRINT)),
               "model": {**recipe.model.model_dump(), "neuron": recipe.model.neuron.spec()}, "seed": recipe.seed,
               "stage": opts.model_dump(exclude=_not_in_fingerprint(opts, NOT_IN_FINGERPRINT)), "inputs": opts.input_digest(),
               "previous": previous}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_summary(model) -> dict:
    """Cheap metrics every model-producing stage records: timesteps, parameters, footprint, mode."""
    params, nonzero = count_params(model)
    return {"timesteps": model.timesteps, "params": params, "nonzero_params": nonzero,
            "footprint_bytes": footprint(model)["bytes"], "spiking": model.spiking}


class Run:
    """One execution of a recipe into a run folder."""

    def __init__(self, recipe_path, out_dir, overrides: list[str] | None = None, recipe_label: str | None = None,
                 ignore_limits: bool = False):
        self.recipe, _ = load_recipe(recipe_path, overrides)
        where = f"recipe {Path(recipe_path).name}"
        self.stages = validate_stages(self.recipe, where)
        self.measure_opts = EvaluateOptions.from_measure(self.recipe.measure, where, "measure")
        self.recipe_label = recipe_label or str(recipe_path)
        self._ann_cache: tuple[str | None, object] = (None, None)
        self.out = Path(out_dir)
        self.device = resolve_device(self.recipe.device)
        self.device = distributed.init_from_env() or self.device  # under torchrun: this rank's device
        d = self.recipe.data
        self.train_loader, self.test_loader, self.info = load_data(
            d.dataset, d.data_dir, d.batch_size, train_subset=d.train_subset, test_subset=d.test_subset,
            augment=d.augment, seed=self.recipe.seed, num_workers=d.num_workers, crop_padding=d.crop_padding,
            test_batch_size=d.test_batch_size)
        self.train_loader, self.val_loader = hold_out_validation(
            self.train_loader, d.val_fraction, self.recipe.seed, d.test_batch_size)
        on_device = d.on_device if d.on_device is not None else self.device.type == "cuda"
        if on_device:
            for loader in (self.train_loader, self.val_loader, self.test_loader):
                if isinstance(loader, TensorBatchLoader):
                    loader.to(self.device)
        for split, loader in (("training", self.train_loader), ("validation", self.val_loader)):
            if loader is not None and len(loader) == 0:
                raise UserError(f"{where}: data.val_fraction: {d.val_fraction} of the {d.train_subset or 'all'} "
                                f"training images leaves the {split} split empty")
        augmenting = [opts.name for _, opts in self.stages if getattr(opts, "augment", None) is not None]
        if augmenting and not isinstance(self.train_loader, TensorBatchLoader):
            raise UserError(f"{where}: stage {augmenting[0]}: augment applies to in-memory datasets; "
                            f"{d.dataset!r} keeps the recipe's data.augment")
        self.recipe.check_model(self.info.in_shape, self.info.num_classes, where)  # before anything is written
        self.estimates = check_recipe_resources(
            self.recipe, [(stage.kind, opts) for stage, opts in self.stages], in_shape=self.info.in_shape,
            num_classes=self.info.num_classes, train_images=image_count(self.train_loader),
            test_images=image_count(self.test_loader), device=self.device,
            measure=self.measure_opts, where=where, ignore=ignore_limits)

    def context(self, model, stage_dir: Path, previous=None, seed: int | None = None) -> StageContext:
        previous = previous or []
        return StageContext(recipe=self.recipe, run_dir=self.out, stage_dir=stage_dir, device=self.device,
                            train_loader=self.train_loader, val_loader=self.val_loader,
                            test_loader=self.test_loader, info=self.info, model=model, previous=previous,
                            reference_ann=self._trained_ann(previous),
                            seed=self.recipe.seed if seed is None else seed)

    def _trained_ann(self, records: list[dict]):
        """The model of the run's last finished ``train_ann`` stage (the energy/robustness reference), or None."""
        ann = [r for r in records if r["kind"] == "train_ann" and r["metrics"].get("checkpoint")]
        if not ann:
            return None
        path = ann[-1]["metrics"]["checkpoint"]
        if self._ann_cache[0] != path:
            self._ann_cache = (path, load_checkpoint(self.out / path, self.device).model)
        return self._ann_cache[1]

    def execute(self) -> dict:
        """Run (or skip) every stage, then write and return the report."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} exists and is not a folder")
        if distributed.is_writer():
            self.out.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.out):
            return self._execute()

    def _execute(self) -> dict:
        atomic_write(self.out / "recipe.yaml",
                     lambda tmp: Path(tmp).write_text(yaml.safe_dump(self.recipe.model_dump(), sort_keys=False)))
        model, records, prev_fp, rerun = None, [], "", False
        for index, (stage, opts) in enumerate(self.stages):
            stage_dir = self.out / "stages" / f"{index:02d}-{opts.name}"
            fp = fingerprint(self.recipe, opts, prev_fp)
            record = None if rerun else self._finished(stage_dir, fp)
            if record is not None:
                print(f"[{opts.name}] finished earlier; skipped", flush=True)
                if record.get("loader_epoch") is not None:  # later stages see the same shuffles
                    self.train_loader.set_epoch(int(record["loader_epoch"]))
                if record["metrics"].get("checkpoint"):
                    model = load_checkpoint(self.out / record["metrics"]["checkpoint"], self.device).model
            else:
                rerun = True
                record, model = self._run_stage(stage, opts, stage_dir, fp, model, records)
            records.append(record)
            prev_fp = fp
        if not distributed.is_writer():  # rank 0 measures alone, so its latency figures are not shared
            return {}
        return self._report(records)

    def _finished(self, stage_dir: Path, fp: str) -> dict | None:
        path = stage_dir / "metrics.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        ckpt = record["metrics"].get("checkpoint")
        if record.get("fingerprint") != fp or (ckpt and not (self.out / ckpt).is_file()):
            return None
        return record

    def _open_stage_dir(self, stage_dir: Path, fp: str) -> bool:
        """Keep the folder a cut-short run of this very stage left (to resume it); else start it empty.

        Returns whether the stage resumes.
        """
        marker = stage_dir / STAGE_MARKER
        try:
            resumes = json.loads(marker.read_text()).get("fingerprint") == fp
        except (OSError, ValueError, AttributeError):
            resumes = False
        distributed.barrier()  # every rank has decided before rank 0 changes the folder
        if distributed.is_writer() and not resumes:
            if stage_dir.exists():
                shutil.rmtree(stage_dir)
            stage_dir.mkdir(parents=True)
            write_json(marker, {"fingerprint": fp})
        distributed.barrier()
        return resumes

    def _run_stage(self, stage: StageDef, opts, stage_dir: Path, fp: str, model, records):
        resumes = self._open_stage_dir(stage_dir, fp)
        print(f"[{opts.name}] {'resuming' if resumes else 'running'} stage {stage.kind}", flush=True)
        start = time.perf_counter()
        try:
            seed = getattr(opts, "seed", None)
            with stage_data_order(self.train_loader, seed), \
                    stage_augmentation(self.train_loader, opts, self.recipe.data):
                result = stage.run(self.context(model, stage_dir, records, seed), opts)
        except UserError as exc:
            raise UserError(f"stage {opts.name}: {exc}") from None
        seconds = time.perf_counter() - start
        metrics = dict(result.metrics)
        if result.model is not None:
            model = result.model
            ckpt = stage_dir / CHECKPOINT_NAME
            metrics = {**model_summary(model), **metrics,
                       "accuracy": evaluate_accuracy(model, self.test_loader, self.device),
                       "checkpoint": ckpt.relative_to(self.out).as_posix()}
            save_checkpoint(ckpt, model, info={"stage": opts.name, "kind": stage.kind, "dataset": self.info.name,
                                  "recipe": self.recipe.name, "accuracy": metrics.get("accuracy")})
            distributed.barrier()  # the other ranks read what rank 0 wrote
            # later stages start from what the checkpoint holds (a quantized tensor's stored values are
            # its codes times scale), exactly as a resumed run does
            model = load_checkpoint(ckpt, self.device).model
        else:
            previous = records[-1]["metrics"] if records else {}
            metrics = {"checkpoint": previous.get("checkpoint"), **metrics}
        record = {"name": opts.name, "kind": stage.kind, "seconds": seconds, "metrics": metrics,
                  "fingerprint": fp, "full_metrics": result.full_metrics,
                  "dir": stage_dir.relative_to(self.out).as_posix(),
                  "loader_epoch": int(self.train_loader.epoch)}
        write_json(stage_dir / "metrics.json", record)
        if distributed.is_writer():
            for snapshot in stage_dir.glob(f"*{SNAPSHOT_SUFFIX}"):
                snapshot.unlink()
        return record, model

    def _report(self, records: list[dict]) -> dict:
        from .report import write_report

        with_model = [r for r in records if r["metrics"].get("checkpoint")]
        if not with_model:
            raise UserError("the recipe produced no model: add a training stage")
        spiking = [r for r in with_model if r["metrics"].get("spiking", True)]
        trained = [r for r in spiking if r["kind"] == "train_snn"]
        baseline = (trained or spiking or with_model)[0]
        baseline["baseline"] = True
        for record in dict.fromkeys(map(id, [baseline, records[-1]])):
            self._ensure_measured(next(r for r in records if id(r) == record), records)
        report = build_report(
            dataset=self.info.name, model=self.recipe.model.arch, recipe=self.recipe_label,
            stages=[{"name": r["name"], "kind": r["kind"], "seconds": r["seconds"], "metrics": r["metrics"]}
                    for r in records],
            baseline=baseline["metrics"], final=records[-1]["metrics"], device=str(self.device))
        write_report(self.out, report)
        return report

    def _measure_key(self) -> str:
        """Hash of the recipe's ``measure:`` options; a report measurement taken with others is redone."""
        return hashlib.sha256(json.dumps(self.measure_opts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _ensure_measured(self, record: dict, records: list[dict]) -> None:
        """Give ``record`` the full metrics (docs/measuring.md) (cached in its metrics.json with the measure options' key).

        An ``evaluate`` stage's own measurement (its options are in its fingerprint) counts as is; a
        report measurement counts only with the same options (one without a key predates them).
        """
        key = self._measure_key()
        if record.get("full_metrics") and (record["kind"] == "evaluate" or record.get("measured_with") == key):
            return
        same_model = next((r for r in records if r.get("full_metrics") and r["kind"] == "evaluate"
                           and r["metrics"].get("checkpoint") == record["metrics"]["checkpoint"]), None)
        if same_model is not None:  # an evaluate stage already measured this checkpoint
            record["metrics"] = {**record["metrics"], **same_model["metrics"]}
            record["full_metrics"] = True
            write_json(self.out / record["dir"] / "metrics.json", record)
            return
        model = load_checkpoint(self.out / record["metrics"]["checkpoint"], self.device).model
        ctx = self.context(model, self.out, [r for r in records if r.get("baseline") or r["kind"] == "train_ann"])
        print(f"[report] measuring {record['name']}", flush=True)
        record["metrics"] = {**record["metrics"], **measure(ctx, model, self.measure_opts)}
        record["full_metrics"], record["measured_with"] = True, key
        write_json(self.out / record["dir"] / "metrics.json", record)


def run_recipe(recipe_path, out_dir, overrides: list[str] | None = None, recipe_label: str | None = None,
               ignore_limits: bool = False) -> dict:
    """Validate, run and report a recipe into ``out_dir``; returns the report dict.

    ``ignore_limits``: run even when :mod:`snncompress.resources` estimates it does not fit.
    """
    try:
        return Run(recipe_path, out_dir, overrides, recipe_label, ignore_limits).execute()
    finally:
        distributed.shutdown()
