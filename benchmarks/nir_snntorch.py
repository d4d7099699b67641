"""Cross-framework check: run a checkpoint exported to NIR in snnTorch and compare spikes per layer.

    pip install -e ".[nir]" snntorch
    python benchmarks/nir_snntorch.py runs/stp-fmnist/stages/02-train_snn/model.safetensors \\
        --dataset fashion-mnist --data-dir ../shared/data --images 64

For each checkpoint: export to NIR (``leak_one="lif"``, the form snnTorch 1.0's
importer can run), import the graph with snnTorch's own NIR importer
(``snntorch.import_nir.import_from_nir``), feed the same normalised test images
unchanged at every step, and print the spikes per layer next to this package's,
and next to this package's model with its reset switched to what NIR's LIF node
states (hard, to v_reset = 0). Also checks that the NIR round trip
(snncompress -> NIR file -> snncompress) gives the same logits bit for bit, and
shows what snnTorch says about the default ``IF`` form of leak-1 layers.
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import io
import tempfile
from pathlib import Path

import torch

from snncompress import load
from snncompress.data import load_data
from snncompress.deploy.nir import export_nir, layer_spike_counts, load_nir, snntorch_spike_counts, write_nir


def with_reset(model, reset: str):
    """A copy of ``model`` whose every LIF resets with ``reset``."""
    twin = copy.deepcopy(model)
    for _, lif in twin.spiking_layers():
        lif.reset = reset
    return twin


def check(path: Path, images: torch.Tensor) -> None:
    model = load(path).eval()
    resets = sorted({lif.reset for _, lif in model.spiking_layers()})
    print(f"== {path.parent.name} ({model.spec['arch']}, T = {model.timesteps}, reset {'/'.join(resets)}, "
          f"{images.shape[0]} test images)")
    with tempfile.TemporaryDirectory() as tmp:
        write_nir(model, Path(tmp) / "model.nir")
        back = load_nir(Path(tmp) / "model.nir")
    ours, logits = layer_spike_counts(model, images)
    _, logits_back = layer_spike_counts(back, images)
    print(f"round trip snncompress -> NIR -> snncompress: logits equal bit for bit: {torch.equal(logits, logits_back)}")
    hard, logits_hard = layer_spike_counts(with_reset(model, "hard"), images)
    theirs, logits_snntorch = snntorch_spike_counts(export_nir(model, leak_one="lif"), images, model.timesteps)
    print(f"{'layer':<14}{'snncompress':>13}{'snnTorch':>11}{'snncompress, hard reset':>25}")
    for name in ours:
        print(f"{name:<14}{ours[name]:>13}{theirs.get(name, '-'):>11}{hard[name]:>25}")
    same = all(theirs.get(n) == hard[n] for n in hard)
    print(f"snnTorch equals snncompress with hard reset in every layer: {same}; logits max |diff| "
          f"{float((logits_snntorch - logits_hard).abs().max()):.3g}")
    if "soft" in resets:
        print(f"(soft reset: snnTorch's importer resets to zero; snncompress vs snnTorch logits max |diff| "
              f"{float((logits_snntorch - logits).abs().max()):.3g}, predictions agree on "
              f"{int((logits_snntorch.argmax(1) == logits.argmax(1)).sum())}/{images.shape[0]})")
    default = export_nir(model)
    if any(type(node).__name__ == "IF" for node in default.nodes.values()):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                snntorch_spike_counts(default, images[:1], model.timesteps)
            print("default export (IF nodes): snnTorch ran it")
        except AssertionError as exc:
            print(f"default export (IF nodes): snnTorch's importer refuses it: AssertionError: {exc}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    _, test, _ = load_data(args.dataset, args.data_dir, batch_size=args.images, test_subset=args.images,
                           augment=False)
    images, _ = next(iter(test))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for path in args.checkpoints:
        check(path, images)


if __name__ == "__main__":
    main()
