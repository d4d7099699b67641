"""Count synaptic operations of the same spiking models with NeuroBench and with snncompress.

    pip install neurobench          # the "peers" extra of snncompress
    python benchmarks/neurobench_synops.py [--timesteps 4] [--images 32] [--batch 16]

For each model (random weights, thresholds lowered so that every layer
spikes, random normalised images) it prints NeuroBench's
``SynapticOperations`` (Effective_MACs, Effective_ACs, Dense per sample) next
to :func:`snncompress.metrics.count_synops` under each counting convention,
and NeuroBench's ``Footprint`` next to snncompress's. Expected:

* default conventions (conv1 once, average-pooled spikes as MACs): identical
  numbers. Both count what each Conv/Linear received: NeuroBench with
  forward pre-hooks on the layers, snncompress at the aten-op level; conv1
  runs once per image in both, on the time-less batch.
* ``conv1_per_timestep=True``: Effective_MACs and Dense grow by (T - 1) x
  conv1's count (conv1 counted as if recomputed every timestep).
* ``pooled_spikes="ac"``: layers fed by average-pooled spikes move from
  Effective_MACs to Effective_ACs counted per raw spike (value x pool area),
  and their Dense is counted on the raw-spike grid (x pool area).
* Footprint: NeuroBench sums ``element_size`` of every parameter and buffer
  (BatchNorm's int64 ``num_batches_tracked`` included); snncompress skips
  integer bookkeeping buffers and applies the stored bit widths.

Exits non-zero when the default-convention counts disagree.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

from snncompress import build_model
from snncompress.metrics import count_synops, footprint

try:
    from neurobench.benchmarks import Benchmark
    from neurobench.metrics.static import Footprint
    from neurobench.metrics.workload import SynapticOperations
    from neurobench.models import TorchModel
except ImportError as exc:  # pragma: no cover - depends on the optional peer
    sys.exit(f"neurobench is not installed ({exc}); pip install neurobench")

NB_KEYS = {"mac": "Effective_MACs", "ac": "Effective_ACs", "dense": "Dense"}


def models(timesteps: int) -> dict:
    """Small spiking models of every family, thresholds low enough that every layer spikes."""
    low = {"threshold": 0.3}
    convnet = build_model("convnet", 10, (1, 28, 28), timesteps, features=[8, "A", 16, "A"], classifier=[32],
                          neuron=low)
    pruned = build_model("convnet", 10, (1, 28, 28), timesteps, features=[8, "A", 16, "A"], classifier=[32],
                         neuron=low)
    pruned.masks = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
                    for name, p in pruned.named_parameters() if p.dim() > 1}
    pruned.apply_masks()
    poisson = build_model("convnet", 10, (1, 28, 28), timesteps, features=[8, "A", 16, "A"], classifier=[32],
                          neuron=low, encoding="poisson")
    return {
        "convnet (direct input, avg-pool)": convnet,
        "convnet, 50% weights masked": pruned,
        "convnet, Poisson input": poisson,
        "vgg5 (3x32x32, width/8)": build_model("vgg5", 10, (3, 32, 32), timesteps, features=[8, "A", 16, 16, "A"],
                                              classifier=[64, 64], neuron=low),
        "resnet19 (BatchNorm, shortcuts, width/16)": build_model("resnet19", 10, (3, 32, 32), timesteps,
                                                                 width_mult=1 / 16, neuron={"threshold": 0.5}),
        "resnet20 (stem avg-pool, width/16)": build_model("resnet20", 10, (3, 32, 32), timesteps,
                                                          width_mult=1 / 16, neuron={"threshold": 0.5}),
    }


def neurobench_counts(model, loader) -> tuple[dict, int]:
    """NeuroBench's SynapticOperations per sample and Footprint in bytes."""
    bench = Benchmark(TorchModel(model), loader, [], [], [[Footprint], [SynapticOperations]])
    results = bench.run(quiet=True)
    return results["SynapticOperations"], int(results["Footprint"])


def snncompress_counts(model, images: torch.Tensor, batch: int, **conventions) -> dict:
    """snncompress's counts per image over the same batches (Poisson draws reseeded identically)."""
    totals = {"ac": 0.0, "mac": 0.0, "dense": 0.0}
    for start in range(0, images.shape[0], batch):
        chunk = images[start:start + batch]
        counts = count_synops(model, chunk, **conventions)
        for key in totals:
            totals[key] += counts[key] * chunk.shape[0]
    return {k: v / images.shape[0] for k, v in totals.items()}


def compare(name: str, model, images: torch.Tensor, batch: int, timesteps: int) -> bool:
    model.eval()
    # A private generator keeps the DataLoader from drawing on the global RNG, so both counters
    # see the same Poisson draws after the same manual_seed.
    loader = DataLoader(TensorDataset(images, torch.zeros(images.shape[0], dtype=torch.long)), batch_size=batch,
                        generator=torch.Generator())
    torch.manual_seed(123)
    nb, nb_bytes = neurobench_counts(model, loader)
    rows = []
    for label, conv in (("default (conv1 once, pooled=MAC)", {}),
                        ("conv1_per_timestep=True", {"conv1_per_timestep": True}),
                        ('pooled_spikes="ac"', {"pooled_spikes": "ac"})):
        torch.manual_seed(123)
        rows.append((label, snncompress_counts(model, images, batch, **conv)))
    print(f"\n## {name}  (T={timesteps}, {images.shape[0]} images)")
    print(f"{'counter':38s} {'Effective_MACs':>15s} {'Effective_ACs':>15s} {'Dense':>15s}")
    print(f"{'NeuroBench SynapticOperations':38s} " + " ".join(f"{nb[NB_KEYS[k]]:15.1f}" for k in ("mac", "ac", "dense")))
    for label, counts in rows:
        print(f"{'snncompress ' + label:38s} " + " ".join(f"{counts[k]:15.1f}" for k in ("mac", "ac", "dense")))
    default = rows[0][1]
    agree = all(abs(default[k] - nb[NB_KEYS[k]]) <= 1e-6 * max(1.0, nb[NB_KEYS[k]]) for k in NB_KEYS)
    print(f"default convention vs NeuroBench: {'AGREE' if agree else 'DIFFER'}")
    print_footprints(model, nb_bytes)
    return agree


def print_footprints(model, nb_bytes: int) -> None:
    """NeuroBench's Footprint beside snncompress's, with the difference explained term by term."""
    ours = footprint(model)
    int_buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point())
    sparse_saving = sum(t["numel"] * t["value_bits"] - t["bits"] for t in ours["tensors"].values()) / 8
    line = f"footprint bytes: NeuroBench {nb_bytes}, snncompress {ours['bytes']}"
    if nb_bytes == ours["bytes"]:
        print(line + " (same: dense float32 tensors, no integer buffers)")
        return
    formats = sorted({t["format"] for t in ours["tensors"].values()} - {"dense"})
    rest = nb_bytes - ours["bytes"] - int_buffers - sparse_saving
    print(f"{line}; difference {nb_bytes - ours['bytes']} = {int_buffers} bytes of integer buffers "
          f"(BatchNorm num_batches_tracked: NeuroBench counts them, inference does not need them) + "
          f"{sparse_saving:g} bytes saved by storing masked weights as {formats or ['dense']}"
          f"{f' + {rest:g} (rounding to whole bytes)' if rest else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    all_agree = True
    for name, model in models(args.timesteps).items():
        in_shape = tuple(model.spec["in_shape"])
        images = torch.randn(args.images, *in_shape, generator=torch.Generator().manual_seed(0))
        all_agree &= compare(name, model, images, args.batch, args.timesteps)
    print(f"\nall default-convention counts agree with NeuroBench: {all_agree}")
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
