"""The ``report.json`` contract as one pydantic model: every report is built through :func:`build_report`.

``Report.model_json_schema()`` is the published JSON Schema (docs/reference/report.md). Keys beyond
the contract are allowed everywhere (methods add their own); the contract's keys are declared here
with their units. A key a producer did not set is left out of the JSON (not written as null), so
the files stay as they were; :func:`snncompress.report.missing_keys` lists what a report lacks.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

#: The version of this contract, the ``schema`` key of every report.
SCHEMA_VERSION = 1


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class SynOps(_Open):
    """Synaptic operations per image, NeuroBench's names in tables."""

    ac: float | None = Field(None, description="Effective_ACs: accumulates (spike input x nonzero weight)")
    mac: float | None = Field(None, description="Effective_MACs: multiply-accumulates (analog input)")
    dense: float | None = Field(None, description="Dense: operations with all-ones input and weights")


class Metrics(_Open):
    """What is measured of one model (the ``metrics`` of a stage, ``baseline`` and ``final``)."""

    checkpoint: str | None = Field(None, description="this model's checkpoint, relative to the run folder")
    accuracy: float | None = Field(None, description="test-split accuracy, 0-1")
    timesteps: int | None = Field(None, description="T, simulation steps per image")
    params: int | None = Field(None, description="weights and neuron parameters")
    nonzero_params: int | None = Field(None, description="parameters that are not zero (masks applied)")
    footprint_bytes: int | None = Field(None, description="bytes the checkpoint stores (codes, indexes, params)")
    spikes_per_image: float | None = Field(None, description="spikes of all layers over all timesteps")
    firing_rate: dict[str, float] | None = Field(None, description="spikes per neuron per timestep, by layer")
    synops: SynOps | None = None
    energy_uj: float | None = Field(None, description="MACs x E_MAC + ACs x E_AC, microjoules per image")
    ann_energy_uj: float | None = Field(None, description="the ReLU twin's dense MAC energy, microjoules")
    energy_preset: str | None = Field(None, description="the energy costs used: fp32, int32 or int8")
    latency_ms: float | None = Field(None, description="median wall-clock milliseconds per image")
    latency_batch: int | None = Field(None, description="images per timed batch")
    robustness: dict[str, float | None] | None = Field(
        None, description="test accuracy under Gaussian input noise, by sigma")


class StageRecord(_Open):
    name: str
    kind: str
    seconds: float = Field(description="wall-clock seconds the stage took")
    metrics: Metrics


class Report(_Open):
    """A run's ``report.json``."""

    schema_version: int = Field(SCHEMA_VERSION, alias="schema", description="the contract's version")
    dataset: str | None
    model: str | None = Field(description="the architecture's name")
    recipe: str | None = Field(description="the recipe's file or name")
    stages: list[StageRecord]
    baseline: Metrics = Field(description="the first trained SNN (or the model a command started from)")
    final: Metrics = Field(description="the last model")


def jsonable(obj):
    """Plain JSON types: tensors and numpy scalars become numbers/lists, NaN and inf become null."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def build_report(*, dataset, model, recipe, stages: list[dict], baseline: dict, final: dict, **extra) -> dict:
    """The report dict of a run, validated against :class:`Report` (``ValueError`` names a bad key).

    ``stages`` are ``{"name", "kind", "seconds", "metrics"}`` dicts; ``extra`` adds top-level keys
    (``device``, ``exploration``, ...). Values keep their Python types (tensors are made JSON by
    :func:`snncompress.report.write_report`).
    """
    report = {"schema": SCHEMA_VERSION, "dataset": dataset, "model": model, "recipe": recipe,
              "stages": stages, "baseline": baseline, "final": final, **extra}
    Report.model_validate(jsonable(report))
    return report


def report_json_schema() -> dict:
    """The JSON Schema of ``report.json`` (published in docs/reference/report.md)."""
    return Report.model_json_schema(by_alias=True)
