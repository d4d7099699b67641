"""Compress my snnTorch network: train it in snnTorch, compress it with snncompress, run it in snnTorch again.

    python examples/compress_snntorch.py [--out FOLDER] [--epochs 1]

1. Train a small convolutional SNN in snnTorch on the built-in MNIST subset (12k images, no download), with the
   images normalised as snncompress's loaders do, each image fed at every one of T = 4 steps.
2. Export it with snnTorch's own ``export_to_nir`` (snnTorch 1.0 needs per-neuron beta and threshold, an
   unbatched sample and ``Flatten(0)`` for that: the trained weights go into such a copy).
3. ``snncompress run`` a recipe that loads the ``.nir`` file (a graph network), measures it, prunes 50% of the
   weights by magnitude with fine-tuning, and sweeps weight bit widths on the validation split.
4. Export the result to NIR, load it with snnTorch's ``import_from_nir``, and check that snnTorch predicts what
   snncompress predicts on the test images. Prints accuracy, footprint and SynOps before and after.
5. Where a C compiler (``cc``) is on the PATH: export the result as the C engine (``snncompress export
   --format c``; quantized weights make it integer-only), build it, and run it on the test images' pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

T = 4
DT = 1e-4  # the step snnTorch's exporter writes its time constants with


def build(batched: bool, beta: torch.Tensor | None = None):
    """conv 1->8 (3x3), Leaky, 2x2 avg pool, conv 8->16 (3x3), Leaky, 2x2 avg pool, flatten, linear 784->10, Leaky.

    ``batched``: ``Flatten(1)`` and per-layer beta for training; else ``Flatten(0)`` and per-neuron beta and
    threshold, the form snnTorch 1.0's exporter takes.
    """
    import snntorch as snn

    shapes = [(8, 28, 28), (16, 14, 14), (10,)]

    def leaky(i):
        if batched:
            return snn.Leaky(beta=0.9, threshold=1.0, init_hidden=True, reset_mechanism="zero")
        return snn.Leaky(beta=torch.full(shapes[i], 0.9), threshold=torch.ones(shapes[i]), init_hidden=True,
                         reset_mechanism="zero")

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), leaky(0), torch.nn.AvgPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), leaky(1), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(1 if batched else 0), torch.nn.Linear(16 * 7 * 7, 10), leaky(2))


def run_snntorch(net, images: torch.Tensor) -> torch.Tensor:
    """Output spike counts ``[B, 10]`` of a batched snnTorch network fed ``images`` at each of T steps."""
    import snntorch.utils

    snntorch.utils.reset(net)
    return sum(net(images) for _ in range(T))


def train(epochs: int, train_images: int, seed: int = 0):
    """The snnTorch network trained with BPTT on the built-in MNIST subset's training images."""
    from snncompress.data import load_data

    torch.manual_seed(seed)
    train_loader, _, _ = load_data("mnist-builtin", batch_size=128, seed=seed, train_subset=train_images)
    net = build(batched=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):
        for images, labels in train_loader:
            loss = torch.nn.functional.cross_entropy(run_snntorch(net, images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net


def export(net, path: Path) -> None:
    """``net``'s weights in the exporter's form, written by snnTorch's ``export_to_nir``."""
    import nir
    from snntorch.export_nir import export_to_nir

    exportable = build(batched=False)
    state = {k: v for k, v in net.state_dict().items() if "beta" not in k and "threshold" not in k}
    exportable.load_state_dict(state, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nir.write(str(path), export_to_nir(exportable.eval(), torch.rand(1, 28, 28)))


RECIPE = """\
name: compress-snntorch
seed: 0
device: cpu
data: {{dataset: mnist-builtin, batch_size: 128, val_fraction: 0.1}}
stages:
  - {{kind: load, checkpoint: {nir}, timesteps: {T}, dt: {dt}}}
  - {{kind: prune_imp, final_sparsity: 0.5, rate: 0.5, epochs: 1, finetune_epochs: 1, max_batches: 40,
     lr: 2.0e-4, weight_decay: 0.0}}
  - {{kind: quant_sweep, bits: [8, 6, 5, 4, 3], tolerance: 0.01}}
measure: {{noise_sigmas: [0.0], robustness_images: 200, ops_images: 256, latency_repeats: 3}}
"""


def snntorch_predictions(path: Path, images: torch.Tensor) -> torch.Tensor:
    """Class predictions ``[B]`` of the NIR file at ``path`` loaded by snnTorch's importer (one image at a time:
    its ``Flatten(0)`` would merge a batch)."""
    import nir
    import snntorch
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = import_from_nir(nir.read(str(path)))
    neurons = [m for m in back.modules() if isinstance(m, snntorch.Leaky)]
    counts = []
    with torch.no_grad():
        for image in images:
            for m in neurons:
                m.mem = torch.zeros(0)
            total = 0
            for _ in range(T):
                out = back(image)
                total = total + (out[0] if isinstance(out, tuple) else out)
            counts.append(total.reshape(-1))
    return torch.stack(counts).argmax(1)


def c_predictions(checkpoint: Path, folder: Path, images: torch.Tensor) -> torch.Tensor | None:
    """Predictions ``[B]`` of the C engine exported from ``checkpoint`` on ``images`` (normalised ``[B, 1, 28,
    28]``, turned back into the uint8 pixels the engine reads), or None without a C compiler."""
    from snncompress.cli import main as snncompress
    from snncompress.data import normalisation

    if shutil.which("cc") is None:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        if snncompress(["export", str(checkpoint), "--format", "c", "--out", str(folder)]) != 0:
            raise SystemExit("snncompress export --format c failed")
    sources = sorted(str(p) for p in folder.glob("*.c"))
    subprocess.run(["cc", "-O2", "-o", str(folder / "snn"), *sources], check=True)
    mean, std = normalisation("mnist-builtin")
    pixels = torch.round((images * std[0] + mean[0]) * 255).clamp(0, 255).to(torch.uint8)
    out = subprocess.run([str(folder / "snn")], input=pixels.numpy().tobytes(), capture_output=True, check=True)
    return torch.tensor([int(line.split()[0]) for line in out.stdout.decode().splitlines()])


def synops(metrics: dict) -> float:
    """Synaptic operations per image: accumulates driven by spikes plus multiply-accumulates of the analog input."""
    ops = metrics.get("synops") or {}
    return float(ops.get("ac") or 0) + float(ops.get("mac") or 0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the files (default: a temporary one)")
    parser.add_argument("--epochs", type=int, default=1, help="snnTorch training epochs (default 1)")
    parser.add_argument("--train-images", type=int, default=4000, help="training images for snnTorch (default 4000 "
                                                                      "of the subset's 12000: a minute on 2 cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder = Path(args.out or tempfile.mkdtemp(prefix="compress-snntorch-"))
    folder.mkdir(parents=True, exist_ok=True)

    from snncompress import load_checkpoint
    from snncompress.cli import main as snncompress
    from snncompress.data import load_data
    from snncompress.deploy.nir import write_nir

    timings = {}
    net = train(args.epochs, args.train_images)
    timings["train in snnTorch"] = time.perf_counter() - start
    _, test_loader, _ = load_data("mnist-builtin", batch_size=256)
    images, labels = map(torch.cat, zip(*test_loader))
    with torch.no_grad():
        trained_accuracy = int((run_snntorch(net.eval(), images).argmax(1) == labels).sum()) / len(labels)
    export(net, folder / "snntorch.nir")

    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(nir=(folder / "snntorch.nir").as_posix(), T=T, dt=DT))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = snncompress(["run", str(recipe), "--out", str(folder / "run")])
    if code != 0:
        raise SystemExit(f"snncompress run failed with exit code {code}")
    report = json.loads((folder / "run" / "report.json").read_text())
    timings["snncompress run"] = time.perf_counter() - start - sum(timings.values())

    final = load_checkpoint(folder / "run" / report["final"]["checkpoint"]).model
    write_nir(final, folder / "compressed.nir")
    theirs = snntorch_predictions(folder / "compressed.nir", images)
    with torch.no_grad():
        ours = final.eval()(images).argmax(1)
    timings["back in snnTorch"] = time.perf_counter() - start - sum(timings.values())
    in_c = c_predictions(folder / "run" / report["final"]["checkpoint"], folder / "c", images)
    timings["C engine"] = time.perf_counter() - start - sum(timings.values())
    base, end = report["baseline"], report["final"]
    rows = [("accuracy (test, %)", f"{100 * base['accuracy']:.2f}", f"{100 * end['accuracy']:.2f}"),
            ("footprint (bytes)", f"{base['footprint_bytes']:,}", f"{end['footprint_bytes']:,}"),
            ("SynOps per image", f"{synops(base):,.0f}", f"{synops(end):,.0f}")]
    print(f"snnTorch network trained {args.epochs} epoch(s): test accuracy {100 * trained_accuracy:.2f}% in snnTorch")
    print(f"{'':22}{'imported':>14}{'compressed':>14}")
    for name, before, after in rows:
        print(f"{name:22}{before:>14}{after:>14}")
    agree = int((theirs == ours).sum())
    accuracy_back = int((theirs == labels).sum()) / len(labels)
    print(f"back in snnTorch: test accuracy {100 * accuracy_back:.2f}%, predictions equal to snncompress's on "
          f"{agree}/{len(labels)} test images")
    agree_c = None if in_c is None else int((in_c == ours).sum())
    if in_c is None:
        print("no C compiler (cc): the C engine step was skipped")
    else:
        print(f"in C (integer-only engine): test accuracy {100 * int((in_c == labels).sum()) / len(labels):.2f}%, "
              f"predictions equal to snncompress's on {agree_c}/{len(labels)} test images")
    print(f"wall time {time.perf_counter() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}); "
          f"files in {folder}")
    return {"trained_accuracy": trained_accuracy, "baseline": base, "final": end, "agree": agree,
            "images": len(labels), "accuracy_back": accuracy_back, "agree_c": agree_c}


if __name__ == "__main__":
    main(sys.argv[1:])
