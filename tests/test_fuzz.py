"""Property-based fuzzing of the command line: no input gives a traceback or writes a file.

Hypothesis mutates the tiny recipe (random keys, values of random types in random
places, random stage lists), generates ``--set`` overrides, and whole argument
lists for :func:`snncompress.cli.main`. Every outcome must be exit 0 or 2
(argparse's own usage errors exit 2 as well), a refusal is one line on stderr,
and no file appears anywhere. Nothing trains or measures: ``Run.execute`` is
stubbed (a valid recipe stops after validation) and ``evaluate`` skips the
measurement and the report. Examples are derandomized, so CI sees the same ones.
"""

import contextlib
import functools
import io
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE
from hypothesis import HealthCheck, event, given, settings
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

import snncompress.commands
import snncompress.metrics
import snncompress.pipeline
import snncompress.report
from snncompress import build_model, save_checkpoint
from snncompress.cli import main
from snncompress.models.resnet import ResNetOptions
from snncompress.models.vgg import VGGOptions
from snncompress.pipeline import Run
from snncompress.stages import stage_kinds

FUZZ = settings(max_examples=int(os.environ.get("SNNCOMPRESS_FUZZ_EXAMPLES", 150)), deadline=None,
                derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

KINDS = sorted(stage_kinds())
STAGE_KEYS = sorted({name for kind in KINDS for name in stage_kinds()[kind].options.model_fields})
SECTION_KEYS = ["name", "seed", "device", "data", "model", "stages", "measure", "dataset", "data_dir", "batch_size",
                "train_subset", "test_subset", "val_fraction", "arch", "timesteps", "encoding", "neuron", "options",
                "leak", "threshold", "reset", "surrogate", "backend", "per_channel",
                *VGGOptions.model_fields, *ResNetOptions.model_fields]

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
#: Values a recipe plausibly holds (most pass the field's own check, so the cross-field rules run) ...
PLAUSIBLE = (st.integers(0, 6) | st.floats(0, 1) | st.booleans() | st.none()
             | st.lists(st.integers(1, 6) | st.just("A"), max_size=4)
             | st.sampled_from(["A", "soft", "hard", "cpu", "auto", "reference", "scratch", "finetune", "sgd", "adam",
                                "mnist-builtin", "convnet", "resnet20", "vgg5", *KINDS]))
#: ... and anything YAML can hold.
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
VALUES = PLAUSIBLE | PLAUSIBLE | st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=10)
KEYS = st.sampled_from(SECTION_KEYS + STAGE_KEYS) | TEXT
STAGES = st.lists(st.builds(lambda kind, extra: {"kind": kind, **extra},
                            st.sampled_from(KINDS) | st.sampled_from(KINDS) | TEXT,
                            st.dictionaries(st.sampled_from(STAGE_KEYS), VALUES, max_size=2)),
                  max_size=5)


def _paths(node, above=()):
    """Every path into the tiny recipe (its sections, options and stage entries)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        yield [*above, key]
        yield from _paths(child, [*above, key])


TINY_PATHS = list(_paths(yaml.safe_load(TINY_RECIPE)))
#: Mostly a place the recipe has, else a new key below one (or anywhere).
PATHS = (st.sampled_from(TINY_PATHS) | st.sampled_from(TINY_PATHS)
         | st.builds(lambda path, key: [*path[:-1], key], st.sampled_from(TINY_PATHS), KEYS)
         | st.lists(KEYS | st.integers(0, 3), min_size=1, max_size=4))


def files_under(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Inputs the argument lists name (a recipe, a checkpoint, a damaged file, a folder), as cwd; stubs in place."""
    base = tmp_path_factory.mktemp("fuzz")
    (base / "tiny.yaml").write_text(TINY_RECIPE)
    save_checkpoint(base / "model.safetensors",
                    build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]),
                    info={"dataset": "mnist-builtin"})
    (base / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (base / "folder").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setattr(Run, "execute", lambda self: None)
        mp.setattr(snncompress.metrics, "measure_model", lambda *a, **k: {})
        mp.setattr(snncompress.report, "write_report", lambda *a, **k: None)
        for module in (snncompress.pipeline, snncompress.commands):  # a valid recipe loads its data once
            mp.setattr(module, "load_data", _memoized(module.load_data))
        yield base


def _memoized(load):
    @functools.lru_cache(maxsize=16)
    def cached(*args, **kwargs):
        return load(*args, **kwargs)
    return lambda *args, **kwargs: cached(*args, **dict(sorted(kwargs.items())))


def outcome(argv: list[str], workdir: Path, errors: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; assert exit 0 or 2, one line per refusal and nothing written; return the code.

    ``errors``: a list the refusal line (stderr) is appended to.
    """
    before = files_under(workdir)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help / --version exit 0, a usage error 2 (usage + one line)
            assert exc.code in (0, 2), (argv, exc.code)
            with contextlib.suppress(InvalidArgument):
                event(f"argparse exit {exc.code}")
            return exc.code
    assert code in (0, 2), (argv, code)
    if errors is not None:
        errors.append(err.getvalue())
    with contextlib.suppress(InvalidArgument):  # outside a Hypothesis test
        event(f"exit {code}")
    if code == 2:
        assert err.getvalue().startswith("snncompress: error: ") and err.getvalue().count("\n") == 1, \
            (argv, err.getvalue())
    assert files_under(workdir) == before, argv
    return code


def _mutate(raw: dict, path: list, value) -> None:
    """Set (``value`` is not ``...``) or delete the entry at ``path``, making missing sections on the way."""
    node = raw
    for part in path[:-1]:
        child = node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else \
            node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(child, (dict, list)):
            return
        node = child
    last = path[-1]
    if isinstance(node, list) and not (isinstance(last, int) and last < len(node)):
        return
    if value is not ...:
        node[last] = value
    elif isinstance(node, dict):
        node.pop(last, None)
    else:
        del node[last]


@FUZZ
@given(mutations=st.lists(st.tuples(PATHS, VALUES | st.just(...)), max_size=4),
       stages=st.none() | STAGES)
def test_mutated_recipes_validate_or_refuse_cleanly(workdir, mutations, stages):
    raw = yaml.safe_load(TINY_RECIPE)
    if stages is not None:
        raw["stages"] = stages
    for path, value in mutations:
        _mutate(raw, path, value)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        recipe = Path(tmp) / "fuzz.yaml"
        recipe.write_text(yaml.safe_dump(raw, allow_unicode=True))
        outcome(["run", str(recipe), "--out", str(Path(tmp) / "run")], Path(tmp))


@FUZZ
@given(overrides=st.lists(st.builds(lambda keys, value: f"{'.'.join(keys)}={value}",
                                    st.lists(KEYS | st.sampled_from(["0", "2", "train_snn", "convert"]),
                                             min_size=1, max_size=4),
                                    TEXT | VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())),
                          min_size=1, max_size=3))
def test_set_overrides_validate_or_refuse_cleanly(workdir, overrides):
    argv = ["run", "tiny.yaml", "--out", "run"]
    for item in overrides:
        argv += ["--set", item]
    outcome(argv, workdir)


WORDS = st.sampled_from(["tiny.yaml", "model.safetensors", "damaged.safetensors", "folder", "nope.yaml", "out",
                          "folder/out", "tiny.yaml/out", "seed=-1", "seed=3", "stages.0.epochs=2", "energy_preset=int8",
                          "noise_sigmas=[0.1]", "mnist-builtin", "fashion-mnist", "imagefolder:folder", *KINDS]) | TEXT
FLAGS = st.sampled_from(["--out", "--out", "--set", "--set", "--dataset", "--data-dir", "--help", "--version"])
#: A command, its positionals and flags with values, mostly in the order argparse expects; or any words at all.
ARGV = (st.builds(lambda command, positional, flags: [command, *positional, *(w for pair in flags for w in pair)],
                  st.sampled_from(["run", "demo", "evaluate", "report", "stages"]), st.lists(WORDS, max_size=2),
                  st.lists(st.tuples(FLAGS, WORDS), max_size=3))
        | st.lists(FLAGS | WORDS | st.sampled_from(["run", "evaluate", "report"]), max_size=7))


@FUZZ
@given(argv=ARGV)
def test_argument_lists_never_raise(workdir, argv):
    outcome(argv, workdir)


#: Options whose size nothing bounds but this machine (tests/test_limits.py holds the estimates); at 10^9 and above
#: each must be refused, naming the option: ``--set`` path -> the option the refusal names.
UNBOUNDED_SIZES = {
    "model.timesteps": "model.timesteps", "model.options.features=[{}, A]": "model.options",
    "model.options.classifier=[{}]": "model.options", "stages.0.epochs": "stages.train_ann.epochs",
    "stages.1.calib_images": "stages.convert.calib_images", "stages.1.calib_timesteps": "stages.convert.calib_timesteps",
    "stages.2.epochs": "stages.train_snn.epochs", "stages.2.timesteps": "stages.train_snn.timesteps",
    "measure.robustness_images": "measure.robustness_images", "measure.ops_images": "measure.ops_images",
    "measure.latency_repeats": "measure.latency_repeats", "measure.latency_batch": "measure.latency_batch",
}
#: Options a split bounds (a batch holds at most the split's images): any size validates or is refused cleanly.
SPLIT_BOUNDED_SIZES = ["data.batch_size", "data.test_batch_size", "data.train_subset", "data.test_subset"]


def _size_override(option: str, value: int) -> str:
    return option.format(value) if "{}" in option else f"{option}={value}"


@FUZZ
@given(option=st.sampled_from(sorted(UNBOUNDED_SIZES)), value=st.integers(10**9, 10**18))
def test_absurd_sizes_are_refused_in_one_line_naming_the_option(workdir, option, value):
    errors: list[str] = []
    code = outcome(["run", "tiny.yaml", "--out", "run", "--set", _size_override(option, value)], workdir, errors)
    assert code == 2, (option, value)
    assert f": {UNBOUNDED_SIZES[option]}: " in errors[0], errors[0]


@FUZZ
@given(sizes=st.lists(st.tuples(st.sampled_from(sorted(UNBOUNDED_SIZES) + SPLIT_BOUNDED_SIZES),
                                st.integers(1, 10**6) | st.integers(1, 10**18)), min_size=1, max_size=3))
def test_any_mix_of_sizes_validates_or_refuses_cleanly(workdir, sizes):
    argv = ["run", "tiny.yaml", "--out", "run"]
    for option, value in sizes:
        argv += ["--set", _size_override(option, value)]
    outcome(argv, workdir)


def test_the_fuzz_reaches_valid_and_refused_inputs(workdir):
    """The stubs let a valid command through without writing, and refusals still happen (the fuzz is not vacuous)."""
    assert outcome(["run", "tiny.yaml", "--out", "run"], workdir) == 0
    assert outcome(["evaluate", "model.safetensors", "--out", "ev"], workdir) == 0
    assert outcome(["demo", "--set", "seed=-1"], workdir) == 2
    assert outcome(["run", "tiny.yaml", "--out", "run", "--set", "stages=[{kind: convert}]"], workdir) == 2
    assert outcome(["bogus"], workdir) == 2
    assert not os.path.exists(workdir / "run") and not os.path.exists(workdir / "ev")
