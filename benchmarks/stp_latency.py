"""Side-by-side CPU latency of a run's baseline and final models (the STP latency target).

    python benchmarks/stp_latency.py --run runs/stp-fmnist          # the default threads (2 here)

The timed image is the run's first test image, as in the reports (``--image noise``: a Gaussian
noise image instead, what this benchmark timed before session 38; spike patterns, and with them the
time of the LIF kernels, differ).

Loads the checkpoints that ``report.json`` names as baseline and final, and times
both in three forms (each as deployed: subnormal values flushed, the plan at its
fastest thread count up to the process's) with the reports' own protocol (:func:`snncompress.metrics.latency.measure_latency`;
``eager``: the model's own forward; ``plan``: the lean
:class:`~snncompress.deploy.plan.InferencePlan`, BatchNorm folded as the reports time it;
``plan-unfolded``: the plan with ``fold_batchnorm=False``, the eager arithmetic bit for bit)
on the same image, interleaving the six variants round by round so that machine-speed drift hits
all of them alike. Prints each variant's median ms/image per round and over all
rounds, and the baseline/final speed-up per form. Absolute times on a shared VM
drift; the ratios, measured in one process, are the figures to quote.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

from snncompress import load
from snncompress.deploy import build_inference_plan
from snncompress.data import load_data
from snncompress.errors import UserError
from snncompress.metrics.latency import latency_images, measure_latency

#: name -> (measure_latency form, plan builder)
FORMS = {"eager": ("eager", build_inference_plan), "plan": ("plan", build_inference_plan),
         "plan-unfolded": ("plan", functools.partial(build_inference_plan, fold_batchnorm=False))}


def load_models(run: Path, report: dict) -> dict:
    """``{"baseline": model, "final": model}`` from the checkpoints the run's ``report`` names."""
    models = {}
    for role in ("baseline", "final"):
        checkpoint = report[role].get("checkpoint")
        if not checkpoint:
            raise SystemExit(f"error: report.json of {run} names no {role} checkpoint")
        models[role] = load(run / checkpoint).eval()
    return models


def timed_images(dataset: str, kind: str, batch: int, in_shape) -> torch.Tensor:
    """``[batch, *in_shape]``: the first test images of ``dataset`` (``test``), or Gaussian noise."""
    if kind == "noise":
        return torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(0))
    _, test_loader, _ = load_data(dataset, None, batch, augment=False)
    return latency_images(test_loader, batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `snncompress run` folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--passes", type=int, default=300, help="timed passes per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image", choices=("test", "noise"), default="test",
                    help="time the first test image(s) (as the reports do) or Gaussian noise")
    args = ap.parse_args()
    if not (args.run / "report.json").is_file():
        sys.exit(f"error: {args.run} has no report.json (run `snncompress run` first)")
    report = json.loads((args.run / "report.json").read_text())
    models = load_models(args.run, report)
    try:
        images = timed_images(report["dataset"], args.image, args.batch, models["final"].spec["in_shape"])
    except UserError as err:  # e.g. no SNNCOMPRESS_DATA for the test image
        sys.exit(f"error: {err} (or time a noise image: --image noise)")
    per_round: dict[str, list[float]] = {}
    threads_used: dict[str, set[int]] = {}
    flushed: dict[str, int] = {}
    print(f"threads {torch.get_num_threads()}, batch {args.batch} ({args.image} image), {args.passes} passes x "
          f"{args.rounds} rounds")
    for r in range(args.rounds):
        for role, model in models.items():
            for name, (form, build_plan) in FORMS.items():
                timed = measure_latency(model, images, repeats=args.passes, warmup=20 if r == 0 else 3, form=form,
                                        build_plan=build_plan)
                if timed["latency_form"] != form:  # no plan for this model: eager is timed already
                    continue
                key = f"{role} {name}"
                per_round.setdefault(key, []).append(timed["latency_ms"])
                threads_used.setdefault(key, set()).add(timed["latency_threads"])
                flushed[role] = timed["latency_subnormals_flushed"]
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f} ms" for k, v in per_round.items()), flush=True)
    med = {k: statistics.median(v) for k, v in per_round.items()}
    print("threads used: " + ", ".join(f"{k} {sorted(v)}" for k, v in threads_used.items())
          + "; subnormal values flushed: " + ", ".join(f"{k} {v}" for k, v in flushed.items()))
    for form in FORMS:
        b, f = med.get(f"baseline {form}"), med.get(f"final {form}")
        if b and f:
            per_round_ratio = [x / y for x, y in zip(per_round[f"baseline {form}"], per_round[f"final {form}"])]
            print(f"{form}: baseline {b:.3f} ms/img, final {f:.3f} ms/img, speed-up x{b / f:.2f} "
                  f"(per round x{min(per_round_ratio):.2f}..x{max(per_round_ratio):.2f}, "
                  f"median x{statistics.median(per_round_ratio):.2f})")
    if med.get("baseline eager") and med.get("final plan"):
        print(f"final plan vs baseline eager: x{med['baseline eager'] / med['final plan']:.2f}")


if __name__ == "__main__":
    main()
