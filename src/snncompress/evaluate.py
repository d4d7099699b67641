"""``snncompress evaluate``: measure any checkpoint on its dataset and write a report."""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .data import load_data
from .errors import UserError
from .recipe import apply_overrides
from .resources import check_measurement
from .stages.evaluate import EvaluateOptions


def checkpoint_data(loaded: Checkpoint, path, dataset: str | None, data_dir: str | None, batch_size: int,
                    **options):
    """``(train_loader, test_loader, info)`` of the dataset a loaded checkpoint was trained on (or ``dataset``).

    Not augmented; ``options`` go to :func:`~snncompress.data.load_data`. A checkpoint that records no
    dataset, or a dataset whose images or classes do not fit the model, is a UserError.
    """
    name = dataset or loaded.info.get("dataset")
    if not name or not isinstance(name, str):
        raise UserError(f"checkpoint {path} does not record its dataset; pass --dataset")
    train_loader, test_loader, info = load_data(name, data_dir, batch_size, augment=False, **options)
    expected = (tuple(loaded.model.spec["in_shape"]), loaded.model.spec["num_classes"])
    if (tuple(info.in_shape), info.num_classes) != expected:
        raise UserError(f"dataset {info.name} has input {tuple(info.in_shape)} and {info.num_classes} classes; "
                        f"the checkpoint expects {expected[0]} and {expected[1]}")
    return train_loader, test_loader, info


def evaluate_checkpoint(path, out_dir, *, dataset: str | None = None, data_dir: str | None = None,
                        overrides: list[str] | None = None, batch_size: int = 512,
                        ignore_limits: bool = False) -> dict:
    """Measure the model in ``path`` on the test split; writes report.json/.md and plots to ``out_dir``.

    ``dataset`` defaults to the one recorded in the checkpoint; ``overrides``
    are ``key=value`` measurement options (see the ``evaluate`` stage); their counts and the memory of a
    test batch are checked before anything is written unless ``ignore_limits`` (docs/limits.md).
    """
    from .metrics import measure_model
    from .report import write_report

    opts = EvaluateOptions.from_measure(apply_overrides({}, overrides or []), "evaluate --set")
    loaded = load_checkpoint(path)
    _, test_loader, info = checkpoint_data(loaded, path, dataset, data_dir, batch_size)
    check_measurement(loaded.model, opts, batch_size, "cpu", "evaluate --set", ignore=ignore_limits)
    start = time.perf_counter()
    metrics = {"checkpoint": Path(path).name, **measure_model(loaded.model, test_loader, **opts)}
    report = {"schema": 1, "dataset": info.name, "model": loaded.model.spec.get("arch"),
              "recipe": loaded.info.get("recipe"),
              "stages": [{"name": "evaluate", "kind": "evaluate", "seconds": time.perf_counter() - start,
                          "metrics": metrics}],
              "baseline": metrics, "final": metrics}
    write_report(Path(out_dir), report)
    return report
