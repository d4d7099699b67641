"""The commands that read a checkpoint and write a report: ``snncompress evaluate`` and ``snncompress quantize``.

They sit at the pipeline's layer (above :mod:`snncompress.stages`): they load a checkpoint and its
dataset, run what a stage would run, and write the run folder's files.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import ValidationError

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint, stored_bytes
from .compress.exploration import Candidate, quantize_model
from .compress.footprint import footprint
from .data import hold_out_validation, image_count, load_data
from .errors import UserError, format_validation_error
from .io import write_bytes, write_json
from .recipe import apply_overrides
from .report_schema import build_report
from .resources import check_checkpoint_command
from .stages.evaluate import EvaluateOptions
from .stages.tiny import (QuantizeOptions, chosen_metrics, exploration_markdown, exploration_record, itq_callbacks,
                          plot_pareto, run_exploration)
from .training import evaluate_accuracy, train


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
    from .deploy import build_inference_plan
    from .metrics import measure_model
    from .report import write_report

    opts = EvaluateOptions.from_measure(apply_overrides({}, overrides or []), "evaluate --set")
    loaded = load_checkpoint(path)
    _, test_loader, info = checkpoint_data(loaded, path, dataset, data_dir, batch_size)
    check_checkpoint_command(loaded.model, opts, batch_size=batch_size, device="cpu", where="evaluate --set",
                             ignore=ignore_limits)
    start = time.perf_counter()
    metrics = {"checkpoint": Path(path).name, **measure_model(loaded.model, test_loader, build_plan=build_inference_plan,
                                                                    **opts)}
    report = build_report(dataset=info.name, model=loaded.model.spec.get("arch"), recipe=loaded.info.get("recipe"),
                          stages=[{"name": "evaluate", "kind": "evaluate", "seconds": time.perf_counter() - start,
                                   "metrics": metrics}],
                          baseline=metrics, final=metrics)
    write_report(Path(out_dir), report)
    return report


def quantize_command(checkpoint, out, *, max_memory_kb: float | None, max_accuracy_drop: float,
                     dataset: str | None = None, data_dir: str | None = None, val_fraction: float = 0.1,
                     seed: int = 0, overrides: list[str] | None = None, test_weight_bits: list[int] | None = None,
                     ignore_limits: bool = False, log=print) -> dict:
    """``snncompress quantize``: explore, then write model.safetensors, report.json/.md and pareto.png in ``out``.

    Everything is validated and computed before the first file is written; nothing is written when nothing fits.
    """
    raw = apply_overrides({}, overrides or [])
    raw.update({k: v for k, v in (("max_memory_kb", max_memory_kb), ("max_accuracy_drop", max_accuracy_drop))
                if v is not None})
    try:
        opts = QuantizeOptions(**raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "quantize")) from None
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    if not getattr(model, "spiking", True):
        raise UserError(f"{checkpoint} holds an ANN; quantize needs a spiking model")
    train_loader, test_loader, info = checkpoint_data(loaded, checkpoint, dataset, data_dir, 64, seed=seed,
                                                      test_batch_size=512)
    train_loader, val_loader = hold_out_validation(train_loader, val_fraction, seed, 512)
    device = torch.device("cpu")
    check_checkpoint_command(model, opts, batch_size=512, device=device, where="quantize --set",
                             train_images=image_count(train_loader),
                             train_batch_size=64 if "itq" in opts.schemes else None, ignore=ignore_limits)
    start = time.perf_counter()

    def train_fn(candidate_model, candidate):
        train(candidate_model, train_loader, val_loader, opts.train_config(seed), device=device, desc="itq",
              callbacks=itq_callbacks(opts))
        return candidate_model

    result = run_exploration(model, opts, val_loader, device, train_fn if "itq" in opts.schemes else None, log)
    seconds = time.perf_counter() - start
    chosen = result.chosen_model.eval()
    log("[quantize] test split (read once, to report)")
    test = {"float": evaluate_accuracy(model, test_loader, device), "chosen": evaluate_accuracy(chosen, test_loader, device)}
    extra_rows = []
    for bits in test_weight_bits or []:
        for rounding in opts.roundings:
            candidate = Candidate.of({"weights": bits}, rounding)
            acc = evaluate_accuracy(quantize_model(model, candidate, opts.space()), test_loader, device)
            test[candidate.label] = acc
            extra_rows.append(f"| {candidate.label} | {acc * 100:.2f}% | {(acc - test['float']) * 100:+.2f} |")
    out = Path(out)
    ckpt = out / "model.safetensors"
    info_ = {"stage": "quantize", "kind": "quantize", "dataset": info.name, "recipe": loaded.info.get("recipe"),
             "source": Path(checkpoint).name, "accuracy": test["chosen"], "candidate": result.chosen.candidate.label}
    save_checkpoint(ckpt, chosen, info=info_)
    again = load_checkpoint(ckpt).model
    images, _ = next(iter(val_loader))
    with torch.inference_mode():
        bit_exact = bool(torch.equal(again(images), chosen(images)))
    fp = footprint(chosen)
    metrics = {**chosen_metrics(result), "checkpoint": "model.safetensors", "accuracy": test["chosen"],
               "float_accuracy": test["float"], "accuracy_drop_points": (test["float"] - test["chosen"]) * 100,
               "test_accuracy": test, "timesteps": getattr(chosen, "timesteps", None),
               "footprint_bytes": fp["bytes"], "stored_tensor_bytes": stored_bytes(ckpt),
               "reload_bit_exact": bit_exact, "seconds": seconds, "threads": torch.get_num_threads()}
    baseline = {"checkpoint": Path(checkpoint).name, "accuracy": test["float"], "val_accuracy": result.baseline.accuracy,
                "footprint_bytes": result.baseline.bytes, "footprint_bytes_with_state": result.baseline.bytes_with_state,
                "timesteps": getattr(model, "timesteps", None)}
    report = build_report(dataset=info.name, model=model.spec.get("arch"), recipe=loaded.info.get("recipe"),
                          stages=[{"name": "quantize", "kind": "quantize", "seconds": seconds, "metrics": metrics}],
                          baseline=baseline, final=metrics, exploration=exploration_record(result),
                          options=opts.model_dump(mode="json"))
    test_lines = ["## Test split (read once, to report)", "", "| model | test accuracy | vs float (points) |",
                  "|---|---|---|", f"| float32 | {test['float'] * 100:.2f}% | - |",
                  f"| chosen: {result.chosen.candidate.label} | {test['chosen'] * 100:.2f}% | "
                  f"{(test['chosen'] - test['float']) * 100:+.2f} |", *extra_rows, "",
                  f"Stored: {stored_bytes(ckpt)} tensor bytes in model.safetensors (footprint {fp['bytes']} bytes); "
                  f"reload gives the same logits bit for bit: {bit_exact}. {seconds:.0f} s, "
                  f"{torch.get_num_threads()} threads, CPU."]
    plot_pareto(result, out / "pareto.png")
    write_bytes(out / "report.md", exploration_markdown(result, f"snncompress quantize {Path(checkpoint).name}",
                                                        "\n".join(test_lines)).encode())
    write_json(out / "report.json", report)
    log(f"[quantize] wrote {out / 'model.safetensors'}, report.json, report.md, pareto.png; test accuracy "
        f"{test['float'] * 100:.2f}% -> {test['chosen'] * 100:.2f}%, footprint {result.baseline.bytes / result.chosen.bytes:.2f}x smaller")
    return report
