"""DIET-SNN convnet on full Fashion-MNIST through the hybrid pipeline at T = 4 (CPU).

Target (issue 2): test accuracy >= 91% within 30 minutes of CPU time.

    python benchmarks/diet_fmnist.py --data-dir ../shared/data --out bench-out/diet-fmnist

Prints the accuracy of each stage, wall and process CPU seconds. Rerunning
with the same --out resumes (finished stages are skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from snncompress.cli import builtin_recipe
from snncompress.pipeline import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SNNCOMPRESS_DATA"))
    parser.add_argument("--out", default="bench-out/diet-fmnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_recipe(builtin_recipe("diet-fmnist"), args.out, overrides + args.set,
                        recipe_label="recipes/diet-fmnist.yaml")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{'stage':<12}{'accuracy':>10}{'seconds':>10}")
    for stage in report["stages"]:
        print(f"{stage['name']:<12}{stage['metrics'].get('accuracy', float('nan')):>10.4f}{stage['seconds']:>10.1f}")
    final = report["final"]
    print(json.dumps({"dataset": "fashion-mnist (full, exact)", "model": "convnet", "timesteps": final["timesteps"],
                      "snn_test_accuracy": final["accuracy"], "target": 0.91, "met": final["accuracy"] >= 0.91,
                      "wall_s": round(wall, 1), "process_cpu_s": round(cpu, 1), "threads": args.threads,
                      "cpu_budget_s": 1800}, indent=2))


if __name__ == "__main__":
    main()
