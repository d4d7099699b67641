"""Inference latency/throughput of low-T (and pruned) networks: plain vs prepare_for_inference.

Used by bench_speed.py (section ``infer``); runnable alone:

    python benchmarks/bench_infer.py --reps 10

For each case: the model as trained (eval mode, reference LIF), the fused LIF
backend only, :func:`snncompress.kernels.prepare_for_inference` (fused LIF +
C average pool + channels_last convolutions), the lean inference plan
(:mod:`snncompress.deploy.plan`, VGG/convnet on CPU), and the ANN twin on
T x B images (plain and prepared). All under ``torch.inference_mode``; the largest logit
difference between the prepared and the plain model is reported.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from snncompress import build_model
from snncompress.deploy import prepare_for_inference
from snncompress.deploy.plan import build_inference_plan

#: (label, arch, in_shape, T, batch, family options); "pruned" = narrower widths as PCA pruning yields.
CASES = [
    ("convnet T=4 batch 128", "convnet", (1, 28, 28), 4, 128, {}),
    ("convnet T=4 batch 1 (latency, 1 thread)", "convnet", (1, 28, 28), 4, 1, {"_threads": 1}),
    ("vgg5 pruned [32,A,64,64,A] fc 256 T=2 batch 64", "vgg5", (3, 32, 32), 2, 64,
     {"features": [32, "A", 64, 64, "A"], "classifier": [256, 256]}),
    ("vgg5 T=5 batch 32", "vgg5", (3, 32, 32), 5, 32, {}),
]


def _time(model, x, reps):
    with torch.inference_mode():
        model(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def run(reps: int = 10, threads: int = 2):
    """Returns rows ``(case, {variant: (min_s, median_s)}, max |logit difference|)`` per case."""
    rows = []
    for label, arch, shape, steps, batch, opts in CASES:
        opts = dict(opts)
        torch.set_num_threads(opts.pop("_threads", threads))
        torch.manual_seed(0)
        plain = build_model(arch, 10, shape, steps, neuron={"backend": "reference", "threshold": 0.5},
                            **opts).eval()
        fused = copy.deepcopy(plain)
        fused.set_lif_backend("auto")
        variants = {
            "plain (reference LIF)": plain,
            "fused LIF": fused,
            "prepare_for_inference": prepare_for_inference(copy.deepcopy(plain)),
            "inference plan": build_inference_plan(copy.deepcopy(fused)),
            "ANN twin TxB": plain.ann_twin(),
            "ANN twin TxB prepared": prepare_for_inference(plain.ann_twin()),
        }
        variants = {k: v for k, v in variants.items() if v is not None}  # no plan without the C kernel
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
        xs = x.repeat(steps, 1, 1, 1)
        with torch.inference_mode():  # channels_last convolutions may round differently
            identical = (plain(x) - variants["prepare_for_inference"](x)).abs().max().item()
        for v in variants.values():  # warm up every variant before the interleaved timing
            _time(v, xs if "ANN" in _name(variants, v) else x, 1)
        times = {k: [] for k in variants}
        for _ in range(reps):
            for k, v in variants.items():
                times[k].append(_time(v, xs if "ANN" in k else x, 1)[0])
        res = {k: (min(v), statistics.median(v)) for k, v in times.items()}
        rows.append((label, res, identical))
    torch.set_num_threads(threads)
    return rows


def _name(variants, model):
    return next(k for k, v in variants.items() if v is model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for label, res, identical in run(args.reps, args.threads):
        print(label, f"max |logit diff| {identical:.2g}",
              {k: f"{v[0] * 1e3:.1f} ms" for k, v in res.items()})


if __name__ == "__main__":
    main()
