"""Training speed, LIF speed and BPTT memory: snncompress vs SpikingJelly vs snnTorch (CPU).

    python benchmarks/bench_speed.py                     # all sections, ~6-10 min on 2 cores
    python benchmarks/bench_speed.py --only lif --reps 3 # one section
    python benchmarks/bench_speed.py --json bench-out/speed.json

The peers are optional extras (``pip install spikingjelly snntorch``); a peer
that is not installed is listed as skipped. All numbers come from this one run
on this one machine; see bench_peers.py for how each network is built (same
layers, same weights, same conv1 reuse and time folding; only the neuron
differs).

Sections
  train   one training step (forward + backward + Adam step, plus the LIF clamp for
          snncompress) of the CIFAR-shape VGG5 (T=5, batch 32) and the 28x28 convnet
          (T=4, batch 128). The ANN twin runs T x B images (the convolutions' floor).
  lif     the LIF layer alone on [T, 32, 64, 16, 16] for T in 4, 8, 16, 32: forward +
          backward with trainable leak / threshold, and forward under inference_mode.
  memory  peak memory of one training step, each configuration in a fresh subprocess:
          resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs
          after the optimizer state exists) minus the resident set before the step.
          glibc is told to return freed blocks >= 64 KiB to the OS at once
          (MALLOC_MMAP_THRESHOLD_=65536) so the resident set follows live memory.

  infer   inference of low-T / pruned networks: as trained vs prepare_for_inference vs
          the ANN twin (bench_infer.py).

Timing: implementations are interleaved round-robin for --reps steps after one
warm-up step. Each step records wall-clock time and the process's CPU time (all
threads, time.process_time). On a dedicated machine the two agree (CPU time =
wall x threads); on a shared one, other processes stretch wall-clock time by
whatever they take, at random, while CPU time stays close to the work the step
itself does. Tables give the median CPU time and the wall-clock minimum and
median; ratios are "cpu / wall-min / wall-median". The target verdicts use CPU
time, and the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_peers as bp  # noqa: E402

from snncompress.kernels import cpu as kcpu  # noqa: E402
from snncompress.training.memory import checkpoint_layers, lean_memory  # noqa: E402
from snncompress.neuron import LIF  # noqa: E402

PEERS = list(bp.NEURONS)
OURS = ["snncompress", "snncompress + lean_memory", "snncompress + lean + checkpoint"]


# ------------------------------------------------------------------------------ helpers
def load_avg() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(r, widths))) + " |"
    out = [f"\n### {title}\n", line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def ratio(a, b) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.2f}x"


def make(impl: str, net: str, timesteps: int | None = None):
    if impl in PEERS and not bp.peer_available(impl):
        return None
    if impl == "snncompress + lean_memory":
        return lean_memory(bp.build("snncompress", net, timesteps))
    if impl == "snncompress + lean + checkpoint":
        return checkpoint_layers(lean_memory(bp.build("snncompress", net, timesteps)))
    return bp.build(impl, net, timesteps)


def train_step_fn(impl: str, model, net: str, timesteps: int | None = None):
    """A closure running one training step of ``model`` on fixed random data."""
    arch, in_shape, t_default, batch = bp.NETWORKS[net]
    steps = timesteps or t_default
    n = batch * steps if impl == "ann twin" else batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *in_shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model.train()
    clamp = getattr(model, "clamp_neurons", None) if impl.startswith("snncompress") else None

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if clamp is not None:
            clamp()

    return step, opt


def interleaved(fns: dict, reps: int) -> dict:
    """Per callable: ``{"cpu": median CPU s, "min": min wall s, "med": median wall s}``.

    Runs each once (warm-up), then round-robin ``reps`` times.
    """
    for f in fns.values():
        f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {k: {"cpu": statistics.median(cpu[k]), "min": min(wall[k]), "med": statistics.median(wall[k])}
            for k in fns}


def ratio3(a: dict, b: dict | None) -> str:
    """``a / b`` on CPU time, wall minimum and wall median."""
    if b is None:
        return "-"
    return " / ".join(f"{a[k] / b[k]:.2f}" for k in ("cpu", "min", "med")) + "x"


def best(results: dict, names) -> dict | None:
    """Per metric, the smallest value among ``names`` present in ``results`` (the fastest peer)."""
    have = [results[n] for n in names if n in results]
    return {k: min(r[k] for r in have) for k in ("cpu", "min", "med")} if have else None


# ------------------------------------------------------------------------------ sections
def bench_train(args, results) -> list[str]:
    out = []
    impls = OURS + ["snncompress reference"] + PEERS + ["ann twin"]
    for net in ("vgg5", "convnet"):
        arch, in_shape, steps, batch = bp.NETWORKS[net]
        fns, skipped = {}, []
        for impl in impls:
            model = make(impl, net)
            if model is None:
                skipped.append(impl)
                continue
            fns[impl] = train_step_fn(impl, model, net)[0]
        res = interleaved(fns, args.reps)
        fastest = best(res, PEERS)
        rows = []
        for impl in impls:
            if impl not in res:
                rows.append([impl, "not installed", "", "", "", ""])
                continue
            r = res[impl]
            rows.append([impl + (" (T x B images)" if impl == "ann twin" else ""), f"{r['cpu']:.2f}",
                         f"{r['min'] * 1e3:.0f}", f"{r['med'] * 1e3:.0f}", ratio3(r, fastest),
                         ratio3(r, res["ann twin"])])
        out.append(table(f"Training step, {net} {in_shape[1]}x{in_shape[2]}, T={steps}, batch {batch} "
                         f"({args.reps} interleaved steps; ratios cpu / wall-min / wall-median)",
                         ["implementation", "CPU s", "wall min ms", "wall median ms", "vs fastest peer",
                          "vs ANN twin"], rows))
        results["train"][net] = dict(res)
        results["train"][net]["_skipped"] = skipped
        del fns
    return out


class _Ours(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.lif = LIF(leak=bp.LEAK, threshold=bp.THRESHOLD, backend=backend)

    def forward(self, x):
        return self.lif(x)


def bench_lif(args, results) -> list[str]:
    impls = {"snncompress (cpu kernel)": lambda: _Ours("cpu"),
             "snncompress (reference)": lambda: _Ours("reference")}
    for p in PEERS:
        if bp.peer_available(p):
            impls[p] = bp.NEURONS[p]
    impls["ReLU (floor)"] = lambda: torch.nn.ReLU()
    out, rows_train, rows_inf = [], [], []
    for steps in args.lif_steps:
        shape = (steps, 32, 64, 16, 16)
        g = torch.Generator().manual_seed(steps)
        x = torch.randn(*shape, generator=g).requires_grad_(True)
        grad = torch.randn(*shape, generator=g)
        mods = {k: f() for k, f in impls.items()}

        def fb(m):
            def run():
                x.grad = None
                m(x).backward(grad)
            return run

        def fwd(m):
            def run():
                with torch.inference_mode():
                    m(x)
            return run

        reps = args.reps if steps <= 16 else max(3, args.reps // 2)
        tr = interleaved({k: fb(m) for k, m in mods.items()}, reps)
        inf = interleaved({k: fwd(m) for k, m in mods.items()}, reps)
        results["lif"][steps] = {"train": tr, "infer": inf}
        ours = "snncompress (cpu kernel)"
        for res, rows in ((tr, rows_train), (inf, rows_inf)):
            fastest = best(res, PEERS)
            speed = "-" if fastest is None else " / ".join(
                f"{fastest[k] / res[ours][k]:.1f}" for k in ("cpu", "min", "med")) + "x"
            rows.append([f"T={steps}"] + [f"{res[k]['cpu'] * 1e3:.0f}" for k in mods]
                        + [speed, ratio3(res[ours], res["ReLU (floor)"])])
        del mods, x, grad
    names = list(impls)
    cols = ["T"] + names + ["speedup vs fastest peer (cpu / wall-min / wall-med)", "ours vs ReLU"]
    out.append(table("LIF layer alone, forward + backward, [T, 32, 64, 16, 16], trainable leak/threshold "
                     "(CPU ms, median)", cols, rows_train))
    out.append(table("LIF layer alone, forward under torch.inference_mode (CPU ms, median)", cols, rows_inf))
    return out


def probe_memory(net: str, impl: str, timesteps: int) -> dict:
    """Runs in a fresh subprocess: peak memory growth of one training step."""
    model = make(impl, net, timesteps)
    if model is None:
        return {"skipped": True}
    step, opt = train_step_fn(impl, model, net, timesteps)
    for p in model.parameters():  # optimizer state and grads exist before the measured step
        p.grad = torch.zeros_like(p)
    opt.step()

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    import gc

    gc.collect()
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "VmHWM (not resettable: includes setup)"
    step()
    return {"peak_mb": status("VmHWM") - base, "base_mb": base, "method": method}


def bench_memory(args, results) -> list[str]:
    out = []
    configs = OURS + ["snncompress reference"] + PEERS + ["ann twin"]
    for net, steps in (("vgg5", 8), ("convnet", 4)):
        arch, in_shape, _, batch = bp.NETWORKS[net]
        res = {}
        for impl in configs:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory", net, impl, str(steps),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res[impl] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        sj = res.get("spikingjelly LIFNode", {}).get("peak_mb")
        peers = [res[p]["peak_mb"] for p in PEERS if "peak_mb" in res.get(p, {})]
        best_peer = min(peers) if peers else None
        ann = res["ann twin"].get("peak_mb")
        rows = []
        for impl in configs:
            r = res[impl]
            if "peak_mb" not in r:
                rows.append([impl, "skipped" if r.get("skipped") else f"error {r.get('error')}", "", "", ""])
                continue
            rows.append([impl + (" (T x B images)" if impl == "ann twin" else ""), f"{r['peak_mb']:.0f}",
                         ratio(r["peak_mb"], sj), ratio(r["peak_mb"], best_peer), ratio(r["peak_mb"], ann)])
        method = next((r["method"] for r in res.values() if "method" in r), "?")
        out.append(table(f"Peak memory of one training step, {net} T={steps}, batch {batch} "
                         f"(MB above the resident set before the step; {method})",
                         ["implementation", "peak MB", "vs spikingjelly LIFNode", "vs leanest peer",
                          "vs ANN twin"], rows))
        results["memory"][net] = res
    return out


def bench_infer(args, results) -> list[str]:
    import bench_infer

    rows = []
    for label, res, diff in bench_infer.run(args.reps * 2, args.threads):
        plain, prep, ann = res["plain (reference LIF)"], res["prepare_for_inference"], res["ANN twin TxB"]
        rows.append([label, f"{plain[0] * 1e3:.1f}", f"{res['fused LIF'][0] * 1e3:.1f}", f"{prep[0] * 1e3:.1f}",
                     f"{ann[0] * 1e3:.1f}", f"{res['ANN twin TxB prepared'][0] * 1e3:.1f}",
                     f"{plain[0] / prep[0]:.2f}x", f"{prep[0] / res['ANN twin TxB prepared'][0]:.2f}x",
                     f"{diff:.1g}"])
        results["infer"][label] = {k: {"min_s": v[0], "median_s": v[1]} for k, v in res.items()}
    return [table("Inference (torch.inference_mode), wall-clock min ms",
                  ["case", "as trained", "fused LIF", "prepared", "ANN twin TxB", "ANN twin prepared",
                   "prepared speedup", "prepared vs ANN twin prepared", "max logit diff"], rows)]


def summary(results) -> list[str]:
    rows = []
    for net in ("vgg5", "convnet"):
        r = results["train"].get(net)
        if not r:
            continue
        ours = r["snncompress"]
        fastest = best(r, PEERS)
        if fastest:
            v = ours["cpu"] / fastest["cpu"]
            rows.append([f"train step {net} <= 0.8x fastest peer", ratio3(ours, fastest),
                         "met" if v <= 0.8 else "NOT met"])
        v = ours["cpu"] / r["ann twin"]["cpu"]
        rows.append([f"train step {net} <= 1.15x ANN twin", ratio3(ours, r["ann twin"]),
                     "met" if v <= 1.15 else "NOT met"])
    if results["lif"]:
        worst = None
        for steps, r in results["lif"].items():
            tr = r["train"]
            fastest = best(tr, PEERS)
            if fastest:
                sp = {k: fastest[k] / tr["snncompress (cpu kernel)"][k] for k in ("cpu", "min", "med")}
                worst = sp if worst is None else {k: min(worst[k], sp[k]) for k in sp}
        if worst is not None:
            rows.append(["LIF alone fwd+bwd >= 2x faster than fastest peer (worst T)",
                         " / ".join(f"{worst[k]:.1f}" for k in ("cpu", "min", "med")) + "x",
                         "met" if worst["cpu"] >= 2 else "NOT met"])
    mem = results["memory"].get("vgg5")
    if mem and "peak_mb" in mem.get("spikingjelly LIFNode", {}):
        sj = mem["spikingjelly LIFNode"]["peak_mb"]
        for impl in OURS:
            if "peak_mb" in mem.get(impl, {}):
                v = mem[impl]["peak_mb"] / sj
                rows.append([f"VGG T=8 peak memory <= 0.6x spikingjelly LIFNode ({impl})", f"{v:.2f}x",
                             "met" if v <= 0.6 else "NOT met"])
    return [table("Targets (time ratios cpu / wall-min / wall-median; verdict on CPU time)",
                  ["target", "measured", "verdict"], rows)] if rows else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="train,lif,memory,infer", help="comma list of: train, lif, memory, infer")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per implementation")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--lif-steps", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16, 32])
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--probe-memory", nargs=3, metavar=("NET", "IMPL", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe_memory:
        net, impl, steps = args.probe_memory
        print(json.dumps(probe_memory(net, impl, int(steps))))
        return 0
    versions = bp.peer_versions()
    kcpu.load_library()
    print("## snncompress speed / memory benchmark (CPU)\n")
    print(f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    print(f"- LIF C kernel: {'loaded' if kcpu.cext_available() else 'unavailable: ' + str(kcpu.build_error())}")
    for name, ver in versions.items():
        print(f"- peer {name}: {ver or 'not installed (optional extra: pip install ' + name + ')'}")
    print(f"- load average at start (2 cores: above 2 means other processes compete): {load_avg()}")
    t0 = time.time()
    results = {"train": {}, "lif": {}, "memory": {}, "infer": {}, "versions": versions}
    sections = {"train": bench_train, "lif": bench_lif, "memory": bench_memory, "infer": bench_infer}
    for name in args.only.split(","):
        for block in sections[name.strip()](args, results):
            print(block, flush=True)
    for block in summary(results):
        print(block)
    print(f"\n- load average at end: {load_avg()}; total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
