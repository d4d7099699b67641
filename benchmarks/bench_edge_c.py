"""Measure the C engine (snncompress export --format c) against the model it was compiled from.

    python benchmarks/bench_edge_c.py baseline=runs/stp-fmnist/stages/02-train_snn/model.safetensors \\
        stp=runs/stp-fmnist/stages/05-quant_sweep/model.safetensors --out results/edge-c

For each LABEL=CHECKPOINT (a Fashion-MNIST / MNIST spiking VGG or convnet):

* accuracy of the host C build (``cc -O2``) on the whole test split, next to the PyTorch model's
  on the same images, and how many predictions differ;
* batch-1 latency per image on one thread, the three engines interleaved image by image in this
  one process (median over ``--latency-images``): the C engine (a shared library of the same
  sources, called through ctypes), snncompress's PyTorch inference plan
  (:func:`snncompress.deploy.build_inference_plan`), and snnTorch running the NIR export; every
  engine runs the deployed weights (subnormal values flushed to zero first, as in the reports'
  latency protocol);
* flash / RAM of the engine library (``size``) on the host and for a Cortex-M4
  (``arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -Os``, if installed), beside ``footprint_bytes``;
* additions and multiplications executed per image (a ``-DSNN_COUNT_OPS`` build) beside the
  model's SynOps (:func:`snncompress.metrics.ops.count_synops`).

Writes ``edge_c.json`` and prints a table; build folders go under ``--build`` (not committed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import io
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from snncompress.checkpoint import load_checkpoint
from snncompress.compress.state import flush_subnormals_, frozen
from snncompress.data import normalisation, read_fashion_mnist, read_mnist
from snncompress.deploy import build_inference_plan
from snncompress.deploy.c import EXPORT_FILES, write_c_folder
from snncompress.deploy.nir import export_nir
from snncompress.compress.footprint import footprint
from snncompress.metrics.ops import count_synops

READERS = {"fashion-mnist": read_fashion_mnist, "mnist": read_mnist}
LIBRARY_SOURCES = ("snn_model.c", "snn_runtime.c")
M4_FLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-Os", "-std=c99"]


def sh(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, **kw)


def build(folder: Path) -> dict[str, Path]:
    """Host binary, counting binary and shared library of an export folder."""
    c_files = [folder / n for n in EXPORT_FILES if n.endswith(".c")]
    lib_files = [folder / n for n in LIBRARY_SOURCES]
    sh("cc", "-O2", "-o", folder / "snn", *c_files)
    sh("cc", "-O2", "-DSNN_COUNT_OPS", "-o", folder / "snn_count", *c_files)
    sh("cc", "-O2", "-shared", "-fPIC", "-o", folder / "libsnn.so", *lib_files)
    return {"snn": folder / "snn", "count": folder / "snn_count", "lib": folder / "libsnn.so"}


def section_sizes(tool: str, files: list[Path]) -> dict[str, int]:
    """``size`` totals of object files / binaries: text, data, bss; flash = text + data, ram = data + bss."""
    out = sh(tool, *files).stdout.decode().splitlines()[1:]
    text = sum(int(line.split()[0]) for line in out)
    data = sum(int(line.split()[1]) for line in out)
    bss = sum(int(line.split()[2]) for line in out)
    return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": data + bss}


def sizes(folder: Path) -> dict:
    """Engine library sizes (model + runtime objects, no driver, no libc) on the host and a Cortex-M4."""
    result = {}
    sh("cc", "-O2", "-c", "-o", folder / "model.o", folder / "snn_model.c")
    sh("cc", "-O2", "-c", "-o", folder / "runtime.o", folder / "snn_runtime.c")
    result["host"] = section_sizes("size", [folder / "model.o", folder / "runtime.o"])
    if shutil.which("arm-none-eabi-gcc"):
        for src, obj in (("snn_model.c", "m4_model.o"), ("snn_runtime.c", "m4_runtime.o")):
            sh("arm-none-eabi-gcc", *M4_FLAGS, "-c", "-o", folder / obj, folder / src)
        result["cortex_m4"] = section_sizes("arm-none-eabi-size", [folder / "m4_model.o", folder / "m4_runtime.o"])
    return result


def run_binary(binary: Path, images: np.ndarray) -> list[list[str]]:
    out = sh(binary, input=images.tobytes()).stdout.decode().splitlines()
    return [line.split() for line in out]


def snntorch_runner(model):
    """``run(image [1, C, H, W]) -> logits`` through snnTorch's NIR importer (leak-1 neurons as LIF)."""
    import snntorch
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):
        net = import_from_nir(export_nir(model, leak_one="lif"))
    neurons = [m for m in net.modules() if isinstance(m, snntorch.Leaky)]

    def run(image):
        for m in neurons:
            m.mem = torch.zeros(0)
        total = 0
        for _ in range(model.timesteps):
            out = net(image)
            total = total + (out[0] if isinstance(out, tuple) else out)
        return total

    return run


def latency(model, lib_path: Path, engine, pixels: np.ndarray, normalised: torch.Tensor, count: int,
            packed_lib_path: Path | None = None) -> dict:
    """Median ms per image of the engines, interleaved image by image (one thread): the C engine (and its
    bit-packed build, ``c_packed``), the PyTorch plan, snnTorch."""
    libs = {"c": ctypes.CDLL(str(lib_path))}
    if packed_lib_path is not None:
        libs["c_packed"] = ctypes.CDLL(str(packed_lib_path))
    logit_type = ctypes.c_int32 if engine.integer else ctypes.c_float
    logits = (logit_type * engine.num_classes)()
    plan = build_inference_plan(frozen(model))
    snn_torch = snntorch_runner(frozen(model))
    times = {**{name: [] for name in libs}, "plan": [], "snntorch": []}
    buffers = [np.ascontiguousarray(p) for p in pixels[:count]]
    with torch.inference_mode():
        for i in range(count):
            image = buffers[i]
            for name, lib in libs.items():
                start = time.perf_counter()
                lib.snn_predict(image.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), logits)
                times[name].append(time.perf_counter() - start)
            x = normalised[i:i + 1]
            start = time.perf_counter()
            plan(x)
            times["plan"].append(time.perf_counter() - start)
            start = time.perf_counter()
            snn_torch(x)
            times["snntorch"].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def measure(label: str, path: Path, build_root: Path, args) -> dict:
    loaded = load_checkpoint(path)
    model = loaded.model.eval()
    # as deployed, and as the reports' latency protocol times it: subnormal values (trained weights
    # decayed below 1.2e-38) set to zero before the export and every engine, so that neither the
    # C build nor PyTorch pays x86's microcoded subnormal arithmetic
    subnormals = flush_subnormals_(model)
    dataset = loaded.info.get("dataset", args.dataset)
    mean, std = normalisation(dataset)
    _, _, test_x, test_y = READERS[dataset](args.data_dir)
    test_x = test_x[: args.images] if args.images else test_x
    test_y = np.asarray(test_y[: len(test_x)])
    folder = build_root / label
    for old in (folder, build_root / f"{label}-packed"):
        if old.exists():
            shutil.rmtree(old)
    engine = write_c_folder(model, folder, mean, std, f"{label} benchmark")
    binaries = build(folder)
    normalised = (torch.from_numpy(test_x).float() / 255 - torch.tensor(mean).view(1, -1, 1, 1)) / \
        torch.tensor(std).view(1, -1, 1, 1)
    lines = run_binary(binaries["snn"], test_x)
    c_pred = np.array([int(line[0]) for line in lines])
    with torch.no_grad():
        torch_pred = torch.cat([model(normalised[i:i + 500]).argmax(1) for i in range(0, len(test_x), 500)]).numpy()
    packed = None
    if engine.integer:  # the same engine with its weight codes bit-packed: flash = footprint, unpacking costs time
        write_c_folder(model, build_root / f"{label}-packed", mean, std, f"{label} benchmark, packed", pack_weights=True)
        packed_binaries = build(build_root / f"{label}-packed")
        packed_pred = np.array([int(line[0]) for line in run_binary(packed_binaries["snn"], test_x)])
        packed = {"size": sizes(build_root / f"{label}-packed"),
                  "predictions_differing_from_unpacked": int((packed_pred != c_pred).sum())}
    counted = run_binary(binaries["count"], test_x[: args.ops_images])
    adds = np.mean([int(line[-2]) for line in counted])
    muls = np.mean([int(line[-1]) for line in counted])
    synops = count_synops(model, normalised[: args.ops_images])
    torch.set_num_threads(1)
    lat = latency(model, binaries["lib"], engine, test_x, normalised, args.latency_images,
                  packed_binaries["lib"] if packed else None)
    return {
        "checkpoint": str(path), "dataset": dataset, "timesteps": model.timesteps, "integer": engine.integer,
        "weight_bits": engine.weight_bits, "test_images": int(len(test_x)),
        "accuracy_c": float((c_pred == test_y).mean()), "accuracy_pytorch": float((torch_pred == test_y).mean()),
        "predictions_differing": int((c_pred != torch_pred).sum()),
        "latency_ms": lat, "latency_images": args.latency_images, "threads": 1, "subnormals_flushed": subnormals,
        "footprint_bytes": footprint(model)["bytes"], "size": sizes(folder),
        "ops_per_image": {"adds": float(adds), "muls": float(muls), "images": args.ops_images},
        "synops_per_image": {"ac": synops["ac"], "mac": synops["mac"], "convention": synops["pooled_spikes"]},
        "sparse_layers": [not layer.dense for layer in engine.layers],
        "packed": packed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="LABEL=CHECKPOINT")
    parser.add_argument("--out", default="results/edge-c")
    parser.add_argument("--build", default="build/edge-c", help="build folders (not committed)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dataset", default="fashion-mnist", help="when the checkpoint records none")
    parser.add_argument("--images", type=int, default=0, help="test images (0: the whole split)")
    parser.add_argument("--latency-images", type=int, default=300)
    parser.add_argument("--ops-images", type=int, default=512)
    args = parser.parse_args()
    results = {}
    for item in args.models:
        label, _, path = item.partition("=")
        results[label] = measure(label, Path(path), Path(args.build), args)
        r = results[label]
        print(f"{label}: C {r['accuracy_c']:.4f} vs PyTorch {r['accuracy_pytorch']:.4f} "
              f"({r['predictions_differing']} of {r['test_images']} differ); latency ms C "
              f"{r['latency_ms']['c']:.4f} plan {r['latency_ms']['plan']:.4f} snnTorch {r['latency_ms']['snntorch']:.4f}"
              f"{' packed %.4f' % r['latency_ms']['c_packed'] if r['packed'] else ''}; "
              f"packed {json.dumps(r['packed'])}; "
              f"size {json.dumps(r['size'])}; footprint {r['footprint_bytes']}; ops {r['ops_per_image']}; "
              f"synops {r['synops_per_image']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_c.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
