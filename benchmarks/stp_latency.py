"""Side-by-side CPU latency of a run's baseline and final models (the STP latency target).

    OMP_NUM_THREADS=1 python benchmarks/stp_latency.py --run runs/stp-fmnist

Loads the checkpoints that ``report.json`` names as baseline and final, and times
both in both forms (``eager``: the model's own forward; ``plan``: the lean
:class:`~snncompress.kernels.inference_plan.InferencePlan`) on the same image,
interleaving the four variants round by round so that machine-speed drift hits
all of them alike. Prints each variant's median ms/image per round and over all
rounds, and the baseline/final speed-up per form. Absolute times on a shared VM
drift; the ratios, measured in one process, are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from snncompress.checkpoint import load
from snncompress.metrics.latency import inference_form


def _median_ms(model, images, passes: int) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(passes):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / images.shape[0]


def variants(run: Path) -> tuple[dict, list[int]]:
    """``({"baseline eager": module, "baseline plan": ..., "final eager": ..., "final plan": ...},
    the models' input shape [C, H, W])``."""
    report = json.loads((run / "report.json").read_text())
    out, shape = {}, None
    for role in ("baseline", "final"):
        checkpoint = report[role].get("checkpoint")
        if not checkpoint:
            raise SystemExit(f"error: report.json of {run} names no {role} checkpoint")
        model = load(run / checkpoint).eval()
        shape = model.spec["in_shape"]
        for form in ("eager", "plan"):
            module, used = inference_form(model, form)
            out[f"{role} {used}"] = module
    return out, shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished `snncompress run` folder")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--passes", type=int, default=300, help="timed passes per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not (args.run / "report.json").is_file():
        sys.exit(f"error: {args.run} has no report.json (run `snncompress run` first)")
    models, shape = variants(args.run)
    images = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    for m in models.values():
        _median_ms(m, images, 20)  # warm-up
    per_round = {k: [] for k in models}
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {args.passes} passes x {args.rounds} rounds")
    for r in range(args.rounds):
        for k, m in models.items():
            per_round[k].append(_median_ms(m, images, args.passes))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f} ms" for k, v in per_round.items()), flush=True)
    med = {k: statistics.median(v) for k, v in per_round.items()}
    for form in ("eager", "plan"):
        b, f = med.get(f"baseline {form}"), med.get(f"final {form}")
        if b and f:
            print(f"{form}: baseline {b:.3f} ms/img, final {f:.3f} ms/img, speed-up x{b / f:.2f}")
    if med.get("baseline eager") and med.get("final plan"):
        print(f"final plan vs baseline eager: x{med['baseline eager'] / med['final plan']:.2f}")


if __name__ == "__main__":
    main()
