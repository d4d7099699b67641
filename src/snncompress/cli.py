"""Command line: ``snncompress run | demo | evaluate | quantize | report | export | import | stages``.

User mistakes (bad recipe, missing data, incompatible checkpoint) end with one
line on stderr and exit code 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2


def builtin_recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package (``recipes/<name>.yaml``)."""
    path = Path(str(resources.files("snncompress") / "recipes" / f"{name}.yaml"))
    if not path.is_file():
        raise UserError(f"no built-in recipe {name!r}")
    return path


def cmd_run(args) -> dict:
    from .pipeline import run_recipe

    return run_recipe(args.recipe, args.out, args.set or [], ignore_limits=args.ignore_limits)


def cmd_demo(args) -> dict:
    from .pipeline import run_recipe

    return run_recipe(builtin_recipe("demo"), args.out, args.set or [], recipe_label="recipes/demo.yaml",
                      ignore_limits=args.ignore_limits)


def cmd_evaluate(args) -> dict:
    from .commands import evaluate_checkpoint

    return evaluate_checkpoint(args.checkpoint, args.out, dataset=args.dataset, data_dir=args.data_dir,
                               overrides=args.set or [], ignore_limits=args.ignore_limits)


def cmd_quantize(args) -> dict:
    from .commands import quantize_command

    if not 0 <= args.max_accuracy_drop <= 100:
        raise UserError(f"--max-accuracy-drop is in points, 0 to 100, got {args.max_accuracy_drop:g}")
    return quantize_command(args.checkpoint, args.out, max_memory_kb=args.max_memory_kb,
                            max_accuracy_drop=args.max_accuracy_drop / 100, dataset=args.dataset, data_dir=args.data_dir,
                            val_fraction=args.val_fraction, seed=args.seed, overrides=args.set or [],
                            test_weight_bits=args.test_weight_bits, ignore_limits=args.ignore_limits)


def cmd_report(args) -> None:
    from .report import compare_runs

    compare_runs([Path(d) for d in args.runs], Path(args.out))
    print(f"comparison written to {Path(args.out) / 'report.md'}")


def cmd_export(args) -> None:
    if args.format == "c":
        from .data import normalisation
        from .deploy.c import export_c_command

        export_c_command(args.source, args.out_file, normalisation, args.dataset, pack_weights=args.pack_weights)
        return
    from .deploy.nir import export_command

    export_command(args.source, args.format, args.out_file, dt=args.dt, soft_reset=args.soft_reset,
                   leak_one=args.leak_one)


def cmd_import(args) -> None:
    from .deploy.nir import import_command

    import_command(args.source, args.out_file, input_shape=args.input_shape, timesteps=args.timesteps, dt=args.dt,
                   integration=args.integration, reset=args.reset)


def cmd_stages(args) -> None:
    from .stages import stage_kinds

    kinds = stage_kinds()
    if args.kind is not None and args.kind not in kinds:
        raise UserError(f"unknown stage {args.kind!r}; choose one of {', '.join(sorted(kinds))}")
    print(describe_stages({k: kinds[k] for k in ([args.kind] if args.kind else sorted(kinds, key=_stage_order(kinds)))}))


def _stage_order(kinds):
    return lambda kind: (kinds[kind].module, kind)


def describe_stages(kinds: dict) -> str:
    """Each stage's options with their defaults and descriptions, from the options models that validate recipes."""
    lines = []
    for kind, stage in kinds.items():
        summary = (stage.run.__doc__ or "").strip().splitlines()[0] if stage.run.__doc__ else ""
        lines.append(f"{kind}  ({stage.module})  {summary}")
        for name, field in stage.options.model_fields.items():
            if name == "kind":
                continue
            default = field.default_factory() if field.default_factory is not None else field.default
            limits = ", ".join(f"pattern {m.pattern}" if getattr(m, "pattern", None) else repr(m)
                               for m in field.metadata)
            text = f"    {name} = {default!r}"
            text += f"  [{limits}]" if limits else ""
            text += f"  {field.description}" if field.description else ""
            lines.append(text)
        lines.append("")
    return "\n".join(lines).rstrip()


def add_checkpoint_data(parser: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--data-dir`` of a command that reads a checkpoint's dataset."""
    parser.add_argument("--dataset", help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-dir", help="offline data folder (default: env SNNCOMPRESS_DATA)")


def add_ignore_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ignore-limits", action="store_true",
                        help="run even when the memory estimate or a count ceiling says it does not fit "
                             "(docs/limits.md)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="snncompress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"snncompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe's stages into a run folder")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("--out", required=True, help="run folder (created; a rerun resumes)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a recipe value, e.g. --set stages.train_snn.epochs=3")
    add_ignore_limits(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="train a convnet DIET-SNN on the built-in MNIST subset")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe value")
    add_ignore_limits(demo)
    demo.set_defaults(func=cmd_demo)

    ev = sub.add_parser("evaluate", help="measure a checkpoint: accuracy, spikes, SynOps, energy, ...")
    ev.add_argument("checkpoint", help="model.safetensors written by a stage")
    ev.add_argument("--out", required=True, help="folder for report.json, report.md and plots")
    add_checkpoint_data(ev)
    ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="measurement option, e.g. --set energy_preset=int8")
    add_ignore_limits(ev)
    ev.set_defaults(func=cmd_evaluate)

    qu = sub.add_parser("quantize", help="tinySNN exploration: scheme x bits per group x rounding; keep the "
                                         "smallest model within a memory and an accuracy-drop limit")
    qu.add_argument("checkpoint", help="model.safetensors of a spiking model written by a stage")
    qu.add_argument("--max-memory-kb", type=float, help="memory limit in KiB (default: none)")
    qu.add_argument("--max-accuracy-drop", type=float, default=1.0,
                    help="accepted validation accuracy drop in points (default: 1)")
    qu.add_argument("--out", default="runs/quantize", help="folder for model.safetensors, report.json/.md, pareto.png")
    add_checkpoint_data(qu)
    qu.add_argument("--val-fraction", type=float, default=0.1,
                    help="validation slice of the training split, as the training run held it out (default 0.1)")
    qu.add_argument("--seed", type=int, default=0, help="the training run's seed (draws the same validation slice)")
    qu.add_argument("--test-weight-bits", type=int, action="append", metavar="B",
                    help="also report the test accuracy of weights-only B-bit models (each rounding)")
    qu.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="exploration option of the quantize stage, e.g. --set bits.weights=[6,5,4]")
    add_ignore_limits(qu)
    qu.set_defaults(func=cmd_quantize)

    rep = sub.add_parser("report", help="put several runs side by side in one table and Pareto plot")
    rep.add_argument("runs", nargs="+", help="run folders holding report.json")
    rep.add_argument("--out", required=True, help="folder for the comparison")
    rep.set_defaults(func=cmd_report)

    ex = sub.add_parser("export", help="write a checkpoint as a NIR graph or a C99 engine folder, or a NIR file "
                                       "back as a checkpoint")
    ex.add_argument("source", help="model.safetensors, or a .nir file written by this command (import back)")
    ex.add_argument("--format", choices=["nir", "safetensors", "c"], default="nir",
                    help="what to write (default: nir; c: a folder of C99 sources, docs/deployment/c.md)")
    ex.add_argument("--out", dest="out_file", required=True, metavar="PATH",
                    help="the file to write (a folder for --format c)")
    ex.add_argument("--dataset", help="--format c: the dataset whose normalisation the input gets (default: the "
                                      "checkpoint's)")
    ex.add_argument("--pack-weights", action="store_true",
                    help="--format c: store integer weight codes as a bit stream of their width (flash = the "
                         "checkpoint's footprint; slower: each run is unpacked at inference)")
    ex.add_argument("--dt", type=float, default=1e-4, help="simulation step of the NIR neurons (default: 1e-4)")
    ex.add_argument("--soft-reset", choices=["annotate", "refuse"], default="annotate",
                    help="soft reset: keep as node metadata (default) or refuse")
    ex.add_argument("--leak-one", choices=["if", "lif"], default="if",
                    help="neurons with leak 1: IF nodes (default) or LIF nodes with tau = 1e8 dt (snnTorch)")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="a NIR graph from snnTorch, Norse, Sinabs, Rockpool (or this package) as a "
                                       "checkpoint of a graph network, ready for the compression stages")
    im.add_argument("source", help="a .nir file")
    im.add_argument("--out", dest="out_file", required=True, metavar="CKPT", help="the checkpoint to write")
    im.add_argument("--input-shape", metavar="C,H,W", help="shape of one input without batch (default: the graph's "
                                                          "Input node)")
    im.add_argument("--timesteps", type=int, help="T, steps per image (default: the graph's metadata; needed "
                                                  "otherwise)")
    im.add_argument("--dt", type=float, help="time step in seconds the neurons are made discrete with (default: "
                                             "the graph's metadata; snnTorch's export: 1e-4; Norse 1.1's: its dt squared, "
                                             "1e-6; docs/interop.md)")
    im.add_argument("--integration", choices=["euler", "jump", "rockpool"], default="euler",
                    help="how the neurons are made discrete: euler (NIR's ODE, snnTorch; default), jump (inputs "
                         "added as they are: Norse's LIFCell and IAFCell, Sinabs) or rockpool (exp(-dt/tau) decays)")
    im.add_argument("--reset", choices=["zero", "subtract"],
                    help="reset of every spiking node (default: the graph's, v_reset = 0: zero); exporters write "
                         "zero for networks that subtracted (Sinabs' and Rockpool's defaults)")
    im.set_defaults(func=cmd_import)

    stages = sub.add_parser("stages", help="list the recipe stages with their options, defaults and descriptions")
    stages.add_argument("kind", nargs="?", help="one stage kind (default: all)")
    stages.set_defaults(func=cmd_stages)
    return parser


def check_out(out: str) -> None:
    """``--out`` must be a folder or creatable as one; anything in the way is a UserError before any work."""
    path = Path(out)
    try:
        folder = next(p for p in (path, *path.parents) if p.exists())
    except (OSError, ValueError) as exc:
        raise UserError(f"--out {out}: {exc}") from None
    if not folder.is_dir():
        raise UserError(f"--out {out}: {folder} exists and is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {folder} is not writable")


def summarize(report: dict | None) -> None:
    if not report:
        return
    final = report.get("final", {})
    keys = ("accuracy", "timesteps", "footprint_bytes", "spikes_per_image", "energy_uj", "latency_ms")
    print(json.dumps({k: final.get(k) for k in keys}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None) is not None:
            check_out(args.out)
        summarize(args.func(args))
    except UserError as exc:
        print(f"snncompress: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("snncompress: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
