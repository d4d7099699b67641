"""Training speed of the Diehl & Cook (2015) STDP network: snncompress vs BindsNET.

What it measures: samples per second of unsupervised STDP training (batch size 1, 250 steps of
1 ms per sample, learning on) on the same first ``--samples`` MNIST training images, in one run
on one machine, for

* BindsNET's ``bindsnet.models.DiehlAndCook2015`` set up as in its ``examples/mnist/eth_mnist.py``:
  ``n_inpt=784, exc=22.5, inh=120, dt=1, norm=78.4, nu=(1e-4, 1e-2), theta_plus=0.05,
  inpt_shape=(1, 28, 28)``, input spikes from ``PoissonEncoder(time=250, dt=1)`` of
  ``pixel * 128`` Hz (encoded per sample inside the timed loop, as the example's dataset does),
  an excitatory spike ``Monitor`` (the example records it for label assignment),
  ``network.run(inputs={"X": ...}, time=250)`` then ``network.reset_state_variables()``;
* snncompress's ``diehl_cook`` model trained by :func:`snncompress.training.stdp.train_stdp`,
  twice: with the same per-step weight updates (``update_every=1``) and with the sample's
  updates summed and applied once per sample (``update_every=0``).

Only the training loop is timed (network construction, monitors and data loading are not).
Label assignment and evaluation are not part of either timing.

Same parameters, different implementations: BindsNET simulates with its generic classes
(``Network``, ``Input``/``DiehlAndCookNodes``/``LIFNodes``, ``MulticompartmentConnection``
with a ``Weight`` feature and the ``PostPre`` rule), one Python-level pass over every layer,
connection and monitor per 1 ms step; snncompress runs the same equations (current-based LIF,
adaptive thresholds, one spike per step, inhibitory layer, pair-based STDP with 20 ms traces,
weights clamped to [0, 1] and normalised to 78.4 per neuron after each sample) with one input
matmul per chunk of steps and a fused population loop. Input spike trains differ in how they
are drawn (BindsNET: Poisson inter-spike intervals; snncompress: Bernoulli per step with
probability rate * dt), with the same mean rates, so spike counts agree only statistically.

How to run (BindsNET is not a dependency of snncompress; use a separate environment)::

    python -m venv bnvenv && . bnvenv/bin/activate
    pip install torch torchvision bindsnet
    pip install -e .            # snncompress
    SNNCOMPRESS_DATA=<data folder with mnist> \\
        python benchmarks/bench_stdp_bindsnet.py --samples 200 [--neurons 100] [--threads 1] [--out result.json]

Set ``OMP_NUM_THREADS`` to the ``--threads`` value as well on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import time
from pathlib import Path

import torch

TIME_STEPS = 250
DT = 1.0
INTENSITY = 128.0  # Hz of a white pixel


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def first_images(count: int):
    """The first ``count`` MNIST training images of snncompress's loader: (normalised, labels, info)."""
    from snncompress.data import load_data

    train, _, info = load_data("mnist", None, 100)
    if hasattr(train, "set_epoch"):
        train.set_epoch(0)
    images, labels, seen = [], [], 0
    for x, y in train:
        images.append(x)
        labels.append(y)
        seen += x.shape[0]
        if seen >= count:
            break
    images, labels = torch.cat(images)[:count], torch.cat(labels)[:count]
    if images.shape[0] < count:
        raise SystemExit(f"only {images.shape[0]} training images, asked for {count}")
    return images, labels, info


def to_pixels(images: torch.Tensor, info) -> torch.Tensor:
    """Normalised ``[B, 1, 28, 28]`` -> intensities in [0, 1]."""
    mean = torch.tensor(info.mean, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------- BindsNET

def bindsnet_train(pixels: torch.Tensor, neurons: int, seed: int = 0) -> dict:
    """Train BindsNET's DiehlAndCook2015 on ``pixels`` ``[S, 1, 28, 28]`` in [0, 1], one at a time."""
    from bindsnet.encoding import PoissonEncoder
    from bindsnet.models import DiehlAndCook2015
    from bindsnet.network.monitors import Monitor

    torch.manual_seed(seed)
    network = DiehlAndCook2015(n_inpt=784, n_neurons=neurons, exc=22.5, inh=120.0, dt=DT, norm=78.4,
                               nu=(1e-4, 1e-2), theta_plus=0.05, inpt_shape=(1, 28, 28))
    steps = int(TIME_STEPS / DT)
    exc_spikes = Monitor(network.layers["Ae"], state_vars=["s"], time=steps)
    network.add_monitor(exc_spikes, name="Ae_spikes")
    encoder = PoissonEncoder(time=TIME_STEPS, dt=DT)
    record = torch.zeros(pixels.shape[0], steps, neurons)  # as the example's spike_record

    start = time.perf_counter()
    for i in range(pixels.shape[0]):
        encoded = encoder(pixels[i] * INTENSITY)                    # [T, 1, 28, 28]
        network.run(inputs={"X": encoded.view(steps, 1, 1, 28, 28)}, time=TIME_STEPS)
        record[i] = exc_spikes.get("s").squeeze()
        network.reset_state_variables()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "excitatory_spikes": float(record.sum())}


# ------------------------------------------------------------------------------------- snncompress

def snncompress_train(images: torch.Tensor, labels: torch.Tensor, info, neurons: int, update_every: int,
                      seed: int = 0) -> dict:
    from snncompress.models import build_model
    from snncompress.training.stdp import STDPConfig, train_stdp

    torch.manual_seed(seed)
    model = build_model("diehl_cook", 10, (1, 28, 28), TIME_STEPS, neurons=neurons)
    model.set_input_normalisation(info.mean, info.std)
    stats = train_stdp(model, [(images, labels)],
                       STDPConfig(samples=len(images), update_every=update_every, seed=seed),
                       log=lambda s: None)
    return {"seconds": stats.seconds, "excitatory_spikes": float(stats.excitatory_spikes),
            "weight_updates": stats.weight_updates}


# -------------------------------------------------------------------------------------------- main

def versions() -> dict:
    out = {"torch": torch.__version__}
    for dist in ("bindsnet", "snncompress"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--neurons", type=int, default=100, help="excitatory neurons (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="images each implementation trains on untimed first (C kernel build, caches)")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    images, labels, info = first_images(max(args.samples, args.warmup))
    images, labels = images[:args.samples], labels[:args.samples]
    pixels = to_pixels(images, info)

    runs = [
        ("bindsnet DiehlAndCook2015 (per step)", lambda x, y, p: bindsnet_train(p, args.neurons)),
        ("snncompress update_every=1 (per step)",
         lambda x, y, p: snncompress_train(x, y, info, args.neurons, update_every=1)),
        ("snncompress update_every=0 (per sample)",
         lambda x, y, p: snncompress_train(x, y, info, args.neurons, update_every=0)),
    ]
    results = []
    for name, fn in runs:
        if args.warmup:
            fn(images[:args.warmup], labels[:args.warmup], pixels[:args.warmup])
        r = fn(images, labels, pixels)
        results.append({"implementation": name, "samples": args.samples, **r,
                        "samples_per_s": args.samples / r["seconds"]})
    base = results[0]["samples_per_s"]
    for r in results:
        r["speedup_vs_bindsnet"] = r["samples_per_s"] / base

    meta = {**versions(), "threads": args.threads, "neurons": args.neurons, "steps_per_sample": TIME_STEPS,
            "cpu": cpu_name(), "python": platform.python_version()}
    header = (f"{'implementation':<42} {'samples':>7} {'seconds':>9} {'samples/s':>10} {'speed-up':>9} "
              f"{'exc spikes/sample':>18}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['implementation']:<42} {r['samples']:>7d} {r['seconds']:>9.2f} {r['samples_per_s']:>10.2f} "
              f"{r['speedup_vs_bindsnet']:>8.2f}x {r['excitatory_spikes'] / r['samples']:>18.1f}")
    print(f"torch {meta['torch']}, bindsnet {meta['bindsnet']}, snncompress {meta['snncompress']}, "
          f"threads {meta['threads']}, neurons {meta['neurons']}, CPU: {meta['cpu']}")
    report = {"meta": meta, "results": results}
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
