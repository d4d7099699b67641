"""A user mistake is refused before the first write: one line ``snncompress: error: ...``, exit 2, nothing on disk.

Covers the model's options and neuron, the seed's range, ``--set`` paths, the
``measure:`` section, stage order and cross-field rules, damaged or foreign
checkpoints, and hostile input (pickles, YAML tags that build Python objects).
Recipe cases never train: ``Run.execute`` fails the test if validation lets one through.
"""

import json
import pickle

import pytest
import torch
import yaml
from conftest import TINY_RECIPE
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from snncompress import UserError, build_model, load_checkpoint, save_checkpoint
from snncompress.checkpoint import META_KEY
from snncompress.cli import builtin_recipe, main
from snncompress.neuron import LIF_BACKENDS
from snncompress.pipeline import Run, validate_stages
from snncompress.recipe import load_recipe
from snncompress.stages import stage_kinds
from snncompress.stages.base import Chain
from snncompress.stages.diet import TrainSNNOptions
from snncompress.stages.stp import TemporalOptions


def files_under(path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*"))


@pytest.fixture
def refused(capsys, tmp_path, monkeypatch):
    """``refused(args, expected)``: the CLI prints exactly one line holding ``expected``, exits 2, writes nothing."""
    def must_not_run(self):
        raise AssertionError("validation let this input through")

    monkeypatch.setattr(Run, "execute", must_not_run)

    def check(args, expected):
        before = files_under(tmp_path)
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("snncompress: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert expected in err, err
        assert files_under(tmp_path) == before
        return err.strip()
    return check


def run_args(tiny_recipe, tmp_path, *overrides):
    args = ["run", tiny_recipe, "--out", tmp_path / "run"]
    for item in overrides:
        args += ["--set", item]
    return args


# ----------------------------------------------------------------------------- 1. model options and neuron

MODEL_CASES = [
    (["model.options.features=[4, B]"],
     "recipe tiny.yaml: model.options.features: entry 1 ('B') is neither a channel count >= 1 nor 'A' (2x2 pooling)"),
    (["model.options.features=[4, 0]"], "model.options.features: entry 1 (0) is neither a channel count >= 1"),
    (["model.options.features=[4.5, A]"], "model.options.features: entry 0 (4.5) is neither a channel count >= 1"),
    (["model.options.features=[true, A]"], "model.options.features: entry 0 (True) is neither a channel count >= 1"),
    (["model.options.features=4"], "model.options.features: Input should be a valid list (got 4)"),
    (["model.options.classifier=[x]"], "model.options.classifier[0]: Input should be a valid integer"),
    (["model.options.classifier=[0]"], "model.options.classifier[0]: Input should be greater than or equal to 1 (got 0)"),
    (["model.options.dropout=1.5"], "recipe tiny.yaml: model.options.dropout: Input should be less than 1 (got 1.5)"),
    (["model.options.dropout=-0.1"], "model.options.dropout: Input should be greater than or equal to 0 (got -0.1)"),
    (["model.options.dropout=.nan"], "model.options.dropout: Input should be a finite number"),
    (["model.options.dropout=abc"], "model.options.dropout: Input should be a valid number"),
    (["model.options.conv_dropout=1.0"], "model.options.conv_dropout: Input should be less than 1 (got 1.0)"),
    (["model.options.batchnorm=maybe"], "model.options.batchnorm: Input should be a valid boolean"),
    (["model.options.width_mult=2"], "recipe tiny.yaml: model.options.width_mult: unknown option"),
    (["model.options.bogus=1"], "recipe tiny.yaml: model.options.bogus: unknown option"),
    (["model.arch=resnet20", "model.options={width_mult: -1}"],
     "model.options.width_mult: Input should be greater than 0 (got -1)"),
    (["model.arch=resnet20", "model.options={features: [4]}"], "model.options.features: unknown option"),
    (["model.options.features=[4, A, A, A, A, A]"],
     "recipe tiny.yaml: model.options: convnet does not fit the data's 1x28x28 images: "),
    (["model.neuron.leak=1.5"], "model.neuron.leak: Input should be less than or equal to 1 (got 1.5)"),
    (["model.neuron.threshold=0"], "model.neuron.threshold: Input should be greater than 0 (got 0)"),
    (["model.neuron.threshold=.inf"], "model.neuron.threshold: Input should be a finite number (got inf)"),
    (["model.neuron.reset=zero"], "model.neuron.reset: Input should be 'soft' or 'hard' (got 'zero')"),
]


@pytest.mark.parametrize("overrides,expected", MODEL_CASES)
def test_bad_model_option_is_one_line_naming_it(refused, tiny_recipe, tmp_path, overrides, expected):
    refused(run_args(tiny_recipe, tmp_path, *overrides), expected)


def test_unknown_lif_backend_lists_the_registered_ones(refused, tiny_recipe, tmp_path):
    names = ", ".join(["auto", *sorted(LIF_BACKENDS)])
    assert "reference" in names and "cpu" in names  # the kernels registered theirs on import
    refused(run_args(tiny_recipe, tmp_path, "model.neuron.backend=nope"),
            f"recipe tiny.yaml: model.neuron.backend: unknown LIF backend; choose one of {names} (got 'nope')")


def test_build_model_names_the_bad_option():
    with pytest.raises(UserError, match=r"^bad option for model 'convnet': dropout: Input should be less than 1 "
                                        r"\(got 1.5\)$"):
        build_model("convnet", 10, (1, 28, 28), 2, dropout=1.5)
    with pytest.raises(UserError, match=r"^bad option for model 'resnet20': depth: unknown option$"):
        build_model("resnet20", 10, (3, 8, 8), 2, depth=3)
    model = build_model("convnet", 10, (1, 28, 28), 2, features=[], classifier=[5], dropout=0.0)
    assert model.spec["features"] == [] and model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


# ----------------------------------------------------------------------------- 2. the seed


@pytest.mark.parametrize("seed,expected", [
    ("-1", "recipe tiny.yaml: seed: Input should be greater than or equal to 0 (got -1)"),
    ("4294967296", "recipe tiny.yaml: seed: Input should be less than 4294967296 (got 4294967296)"),
    ("1.5", "recipe tiny.yaml: seed: Input should be a valid integer, got a number with a fractional part"),
    ("nine", "recipe tiny.yaml: seed: Input should be a valid integer"),
])
def test_seed_outside_what_torch_and_numpy_take_is_refused(refused, tiny_recipe, tmp_path, seed, expected):
    refused(run_args(tiny_recipe, tmp_path, f"seed={seed}"), expected)


def test_largest_seed_is_accepted_by_the_recipe_and_by_torch(tiny_recipe, tmp_path):
    run = Run(tiny_recipe, tmp_path / "run", ["seed=4294967295"])
    assert run.recipe.seed == 2**32 - 1
    torch.manual_seed(run.recipe.seed)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3. --set paths


@pytest.mark.parametrize("override,expected", [
    ("name.foo=1", "snncompress: error: --set name.foo: name is a value (str), not a section"),
    ("seed.x=1", "snncompress: error: --set seed.x: seed is a value (int), not a section"),
    ("stages.0.lr.x=1", "snncompress: error: --set stages.0.lr.x: stages.0.lr is a value (float), not a section"),
    ("stages.0.kind.x.y=1", "snncompress: error: --set stages.0.kind.x: stages.0.kind is a value (str), not a section"),
    ("model.options.features.0=8",
     "snncompress: error: --set model.options.features.0: model.options.features is a value (list), not a section"),
    ("stages=3", "recipe tiny.yaml: stages: Input should be a valid list (got 3)"),
    ("stages=[]", "recipe tiny.yaml: stages: List should have at least 1 item"),
    ("stages.0=3", "snncompress: error: --set stages.0: cannot replace a whole stage; set its options one by one"),
    ("stages.9.lr=1", "snncompress: error: --set stages.9: no stage with index or name '9'"),
    ("stages.-1.lr=1", "snncompress: error: --set stages.-1: no stage with index or name '-1'"),
    ("=1", "snncompress: error: --set '=1': the key has an empty part"),
    (".a=1", "snncompress: error: --set '.a=1': the key has an empty part"),
    ("a..b=1", "snncompress: error: --set 'a..b=1': the key has an empty part"),
    ("seed", "snncompress: error: --set expects key=value, got 'seed'"),
    ("name=[unclosed", "snncompress: error: --set name: the value is not valid YAML: expected ',' or ']'"),
    ("bogus_key=1", "recipe tiny.yaml: bogus_key: unknown option"),
])
def test_set_through_a_path_that_is_not_a_section_is_one_line(refused, tiny_recipe, tmp_path, override, expected):
    refused(run_args(tiny_recipe, tmp_path, override), expected)


# ----------------------------------------------------------------------------- 4. measure


@pytest.mark.parametrize("override,expected", [
    ("measure.bogus=1", "recipe tiny.yaml: measure.bogus: unknown option"),
    ("measure.kind=evaluate", "recipe tiny.yaml: measure.kind: unknown option"),
    ("measure.name=x", "recipe tiny.yaml: measure.name: unknown option"),
    ("measure.noise_sigmas=[]", "recipe tiny.yaml: measure.noise_sigmas: List should have at least 1 item"),
    ("measure.noise_sigmas=[0.1, -0.1]",
     "recipe tiny.yaml: measure.noise_sigmas[1]: Input should be greater than or equal to 0 (got -0.1)"),
    ("measure.latency_repeats=0", "recipe tiny.yaml: measure.latency_repeats: Input should be greater than or equal to 1"),
    ("measure=3", "recipe tiny.yaml: measure: Input should be a valid dictionary (got 3)"),
])
def test_bad_measure_key_names_measure_dot_key(refused, tiny_recipe, tmp_path, override, expected):
    refused(run_args(tiny_recipe, tmp_path, override), expected)


def test_evaluate_set_takes_measurement_options_only(refused, tmp_path):
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]))
    out = tmp_path / "ev"
    refused(["evaluate", path, "--out", out, "--set", "kind=train_ann"], "evaluate --set: kind: unknown option")
    refused(["evaluate", path, "--out", out, "--set", "bogus=1"], "snncompress: error: evaluate --set: bogus: unknown option")
    refused(["evaluate", path, "--out", out, "--set", "noise_sigmas=[-1]"],
            "evaluate --set: noise_sigmas[0]: Input should be greater than or equal to 0 (got -1)")


# ----------------------------------------------------------------------------- 5. stage order and cross-field rules

CHAIN_CASES = [
    ("[{kind: convert}]", "stages[0] (convert): needs an ANN (train_ann) from an earlier stage; put one before it"),
    ("[{kind: evaluate}]", "stages[0] (evaluate): needs a model from an earlier stage; put one before it"),
    ("[{kind: quant_sweep}]", "stages[0] (quant_sweep): needs a model from an earlier stage"),
    ("[{kind: temporal}]", "stages[0] (temporal): needs a spiking model (convert or train_snn) from an earlier stage"),
    ("[{kind: train_snn}, {kind: convert}]",
     "stages[1] (convert): needs an ANN (train_ann), but stage 'train_snn' before it leaves a spiking model"),
    ("[{kind: train_ann}, {kind: convert}, {kind: convert}]",
     "stages[2] (convert): needs an ANN (train_ann), but stage 'convert' before it leaves a spiking model"),
    ("[{kind: train_ann}, {kind: prune_pca}]",
     "stages[1] (prune_pca): needs a spiking model (convert or train_snn), but stage 'train_ann' before it leaves "
     "an ANN"),
    ("[{kind: train_ann}, {kind: quant_sweep}, {kind: temporal}]",
     "stages[2] (temporal): needs a spiking model (convert or train_snn), but stage 'train_ann' before it leaves "
     "an ANN"),
    # the tiny model runs at T=2, so the default schedule is [1]
    ("[{kind: train_ann}, {kind: convert}, {kind: temporal, step_epochs: [1, 2]}]",
     "stages[2] (temporal): step_epochs: has 2 entries but the default schedule from T=2, [1], has 1"),
    ("[{kind: train_ann}, {kind: convert}, {kind: temporal, schedule: [4, 3]}]",
     "stages[2] (temporal): schedule: no timestep below the model's T=2, so nothing would be pruned "
     "(schedule [4, 3])"),
    ("[{kind: train_snn, timesteps: 1}, {kind: temporal}]",
     "stages[1] (temporal): schedule: no timestep below the model's T=1, so nothing would be pruned (schedule [])"),
    ("[{kind: train_snn, timesteps: 4}, {kind: temporal, schedule: [1]}, {kind: temporal, step_epochs: [1]}]",
     "stages[2] (temporal): step_epochs: give a schedule too (the T that stage 'temporal' leaves is chosen at "
     "run time)"),
    ("[{kind: train_snn}, {kind: temporal, schedule: [1], step_epochs: [2], epochs: 3}]",
     "stages[1] (temporal): epochs: not used when step_epochs is given"),
    ("[{kind: train_snn}, {kind: temporal, schedule: [2, 1], step_epochs: [2]}]",
     "stages[1] (temporal): step_epochs needs one entry per schedule entry (2), got 1"),
    ("[{kind: train_snn}, {kind: temporal, schedule: [1, 2]}]",
     "stages[1] (temporal): schedule: the timestep schedule must be strictly decreasing, got [1, 2]"),
    ("[{kind: train_snn}, {kind: temporal, distill_temperature: 3}]",
     "stages[1] (temporal): distill_temperature: only used with distill > 0"),
    ("[{kind: train_snn, distill_temperature: 3}]",
     "stages[0] (train_snn): distill_temperature: only used with distill > 0"),
    ("[{kind: train_snn}, {kind: prune_pca, mode: finetune, ann_epochs: 3}]",
     "stages[1] (prune_pca): ann_epochs: not used with mode: finetune"),
    ("[{kind: train_snn}, {kind: prune_pca, mode: finetune, calib_images: 32}]",
     "stages[1] (prune_pca): calib_images: not used with mode: finetune without recalibrate: true"),
    ("[{kind: train_snn}, {kind: prune_pca, mode: scratch, recalibrate: true}]",
     "stages[1] (prune_pca): recalibrate: not used with mode: scratch"),
    ("[{kind: train_snn}, {kind: prune_pca, mode: scratch, distill: 0.5}]",
     "stages[1] (prune_pca): distill: not used with mode: scratch"),
    ("[{kind: train_ann, optimizer: sgd, momentum: 0}]",
     "stages[0] (train_ann): momentum: optimizer sgd (Nesterov) needs momentum > 0"),
    ("[{kind: train_ann, momentum: 0.5}]", "stages[0] (train_ann): momentum: only used with optimizer: sgd"),
    ("[{kind: train_snn}, {kind: quant_sweep, bits: [1, 8]}]",
     "stages[1] (quant_sweep): bits: every bit width must be in [2, 16], got [1]"),
    ("[{kind: train_ann}, {kind: train_ann}, {kind: train_snn, name: train_ann-1}]",
     "stages[2].name: duplicate stage name 'train_ann-1'"),
    ("[{name: x}]", f"stages[0].kind: missing; choose one of {', '.join(sorted(stage_kinds()))}"),
    ("[{kind: [1, 2]}]", "stages[0].kind: unknown stage [1, 2]; choose one of"),
    ("[{kind: train_ann, 1: 2}]", "stages[0][1] (a key): Input should be a valid string (got 1)"),
]


@pytest.mark.parametrize("stages,expected", CHAIN_CASES)
def test_stage_order_and_cross_field_rules_are_checked_before_running(refused, tiny_recipe, tmp_path, stages,
                                                                       expected):
    refused(run_args(tiny_recipe, tmp_path, f"stages={stages}"), f"snncompress: error: recipe tiny.yaml: {expected}")


def test_validation_split_that_leaves_a_split_empty_is_refused(refused, tiny_recipe, tmp_path):
    refused(run_args(tiny_recipe, tmp_path, "data.train_subset=1"),
            "recipe tiny.yaml: data.val_fraction: 0.1 of the 1 training images leaves the validation split empty")
    refused(run_args(tiny_recipe, tmp_path, "data.train_subset=10", "data.val_fraction=0.999"),
            "recipe tiny.yaml: data.val_fraction: 0.999 of the 10 training images leaves the training split empty")


@pytest.mark.parametrize("stages", [
    "[{kind: train_ann}, {kind: quant_sweep, bits: [8]}, {kind: convert}]",          # quantize the ANN, then convert
    "[{kind: train_snn}, {kind: train_ann}, {kind: convert}]",                       # an ANN again after an SNN
    "[{kind: train_snn, timesteps: 4}, {kind: temporal, step_epochs: [1, 1, 2]}]",   # default schedule [3, 2, 1]
    "[{kind: train_snn}, {kind: temporal, schedule: [1]}, {kind: temporal, schedule: [1]}]",
    "[{kind: train_snn}, {kind: prune_pca, mode: finetune, recalibrate: true, calib_images: 32}]",
    "[{kind: train_ann, optimizer: sgd, momentum: 0.5}, {kind: convert}, {kind: evaluate}]",
])
def test_sensible_orders_pass(tiny_recipe, tmp_path, stages):
    run = Run(tiny_recipe, tmp_path / "run", [f"stages={stages}"])
    assert [opts.kind for _, opts in run.stages] == [s["kind"] for s in yaml.safe_load(stages)]
    assert not (tmp_path / "run").exists()


def test_chain_follows_mode_and_timesteps():
    start = Chain(timesteps=4)
    after_snn = TrainSNNOptions(timesteps=3, name="snn").follow(start)
    assert after_snn == Chain(mode="snn", timesteps=3, source="snn", earlier=(("snn", "snn"),))
    assert TemporalOptions(schedule=[2, 1], name="t").follow(after_snn) == Chain(
        mode="snn", timesteps=None, source="t", earlier=(("snn", "snn"), ("t", "snn")))


BUILTIN_RECIPES = sorted(p.stem for p in builtin_recipe("demo").parent.glob("*.yaml"))


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_every_builtin_recipe_passes_the_rules(name, tmp_path):
    path = builtin_recipe(name)
    overrides = []
    if "kind: load" in path.read_text():  # continues another run's model: give it one
        model = build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]).set_spiking(True)
        save_checkpoint(tmp_path / "m.safetensors", model, info={"dataset": "cifar10-jpg"})
        overrides = [f"stages.load.checkpoint={tmp_path / 'm.safetensors'}"]
    recipe, _ = load_recipe(path, overrides)
    stages = validate_stages(recipe, name)
    assert stages and stages[0][1].kind in ("train_ann", "train_snn", "load", "train_stdp")


# ----------------------------------------------------------------------------- 6. damaged and foreign checkpoints


@pytest.fixture
def good_checkpoint(tmp_path):
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, build_model("convnet", 10, (1, 28, 28), 2, features=[4, "A"], classifier=[8]),
                    info={"dataset": "mnist-builtin"})
    return path


def _with_meta(path, tensors, meta=None, raw=None):
    save_file(tensors, str(path), metadata={META_KEY: raw if raw is not None else json.dumps(meta)})


def _damage(kind, good, target):
    """Write a damaged or foreign variant ``kind`` of checkpoint ``good`` at ``target``."""
    data, tensors = good.read_bytes(), load_file(str(good))
    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    spec = meta["spec"]
    if kind == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        target.write_bytes(bytes(range(256)) * 8)
    elif kind == "empty":
        target.write_bytes(b"")
    elif kind == "no_metadata":
        save_file(tensors, str(target))
    elif kind == "bad_json":
        _with_meta(target, tensors, raw="{not json")
    elif kind == "deep_json":
        _with_meta(target, tensors, raw="[" * 100_000 + "]" * 100_000)
    elif kind == "no_spec":
        _with_meta(target, tensors, {k: v for k, v in meta.items() if k != "spec"})
    elif kind == "spec_not_a_mapping":
        _with_meta(target, tensors, {**meta, "spec": "vgg"})
    elif kind == "unknown_family":
        _with_meta(target, tensors, {**meta, "spec": {**spec, "family": "lstm"}})
    elif kind == "wrong_shape_spec":
        _with_meta(target, tensors, {**meta, "spec": {**spec, "features": [8, "A"]}})
    elif kind == "huge_spec":
        _with_meta(target, tensors, {**meta, "spec": {**spec, "classifier": [10**15]}})
    elif kind == "wrong_tensor_shape":
        _with_meta(target, {k: v.reshape(-1)[:1] if v.dim() else v for k, v in tensors.items()}, meta)
    elif kind == "missing_tensor":
        _with_meta(target, {k: v for k, v in tensors.items() if k != "classifier.0.weight"}, meta)
    elif kind == "tensors_not_a_mapping":
        _with_meta(target, tensors, {**meta, "tensors": [1]})
    elif kind == "info_not_a_mapping":
        _with_meta(target, tensors, {**meta, "info": [1]})
    elif kind == "bad_state_quantizer":
        _with_meta(target, tensors, {**meta, "state_quantizers": {"features.1": {"config": {}, "scale": 1}}})
    elif kind == "future_format":
        _with_meta(target, tensors, {**meta, "format": 9})
    elif kind == "folder":
        target.mkdir()


CHECKPOINT_CASES = [
    ("truncated", "is not a snncompress checkpoint (safetensors): Error while deserializing header"),
    ("random", "is not a snncompress checkpoint (safetensors): Error while deserializing header: header too large"),
    ("empty", "is not a snncompress checkpoint (safetensors): Error while deserializing header: header too small"),
    ("no_metadata", "is a safetensors file without snncompress metadata"),
    ("bad_json", "has damaged snncompress metadata (not JSON)"),
    ("deep_json", "has damaged snncompress metadata (not JSON)"),
    ("no_spec", "is damaged or not from this tool: KeyError: 'spec'"),
    ("spec_not_a_mapping", "is damaged or not from this tool: AttributeError: 'str' object has no attribute 'get'"),
    ("unknown_family", ": model spec has unknown family 'lstm'"),
    ("wrong_shape_spec", ": does not match its architecture: classifier.0.weight is (8, 784) in the file and "
                         "(8, 1568) in the spec"),
    ("huge_spec", ": does not match its architecture: classifier.0.weight is (8, 784) in the file and "
                  "(1000000000000000, 784) in the spec"),
    ("wrong_tensor_shape", "is damaged or not from this tool: RuntimeError: shape '[4, 1, 3, 3]' is invalid"),
    ("missing_tensor", "is damaged or not from this tool: KeyError: 'classifier.0.weight"),
    ("tensors_not_a_mapping", "is damaged or not from this tool: AttributeError: 'list' object has no attribute"),
    ("info_not_a_mapping", "is damaged or not from this tool: TypeError: info is a list, not a mapping"),
    ("bad_state_quantizer", "is damaged or not from this tool: ValueError: unknown quantizer None"),
    ("future_format", "has checkpoint format 9, this version reads (1, 2)"),
    ("folder", "is a folder, not a file"),
    ("nonexistent", "checkpoint not found: "),
]


@pytest.mark.parametrize("kind,expected", CHECKPOINT_CASES)
def test_damaged_or_foreign_checkpoint_is_one_line_and_writes_nothing(refused, good_checkpoint, tmp_path, kind,
                                                                      expected):
    target = tmp_path / f"{kind}.safetensors"
    _damage(kind, good_checkpoint, target)
    err = refused(["evaluate", target, "--out", tmp_path / "ev"], expected)
    assert target.name in err
    assert load_checkpoint(good_checkpoint).model.spec["features"] == [4, "A"]  # the undamaged file loads


def test_out_that_is_a_file_is_refused_before_any_work(refused, good_checkpoint, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    refused(["evaluate", good_checkpoint, "--out", blocker / "ev"],
            f"snncompress: error: --out {blocker / 'ev'}: {blocker} exists and is not a folder")
    assert blocker.read_text() == "x"


# ----------------------------------------------------------------------------- 7. hostile input


class _CreatesFile:
    """Unpickling this calls ``open(target, "w")``, which creates the file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_given_as_checkpoint_is_never_unpickled(refused, tmp_path, writer):
    target, evil = tmp_path / "created-by-unpickling", tmp_path / "model.safetensors"
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(_CreatesFile(target)))
    else:
        torch.save({"weights": _CreatesFile(target)}, evil)
    assert not target.exists()
    refused(["evaluate", evil, "--out", tmp_path / "ev"],
            f"snncompress: error: {evil} is a pickle / torch.save file, not a snncompress checkpoint (safetensors); "
            f"pickles are never loaded")
    assert not target.exists()


def test_pickle_as_a_run_folders_checkpoint_is_never_unpickled(capsys, tmp_path):
    """A rerun reloads each finished stage's model.safetensors; a pickle put there is refused, not loaded."""
    head, _, tail = TINY_RECIPE.partition("  - {kind: convert")
    recipe = tmp_path / "one.yaml"
    recipe.write_text(head + "measure:" + tail.split("measure:")[1])  # train_ann only, the tiny measurement
    out, target = tmp_path / "run", tmp_path / "created-by-unpickling"
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    checkpoint = out / "stages" / "00-train_ann" / "model.safetensors"
    assert load_checkpoint(checkpoint).model.spiking is False
    checkpoint.write_bytes(pickle.dumps(_CreatesFile(target)))
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"snncompress: error: {checkpoint} is a pickle / torch.save file, not a snncompress checkpoint "
                   f"(safetensors); pickles are never loaded\n")
    assert not target.exists()


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:builtins.open ["{target}", "w"]',
    '!!python/object/apply:os.system ["touch {target}"]',
    '!!python/object/new:builtins.open ["{target}", "w"]',
    "!!python/name:os.system",
])
def test_yaml_tags_that_build_objects_are_refused_and_never_run(refused, tmp_path, tag):
    target = tmp_path / "created-by-yaml"
    value = tag.format(target=target)
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(TINY_RECIPE.replace("name: tiny", f"name: {value}"))
    refused(["run", recipe, "--out", tmp_path / "run"],
            f"snncompress: error: recipe {recipe} is not valid YAML: tags that build Python objects are refused: "
            f"could not determine a constructor for the tag 'tag:yaml.org,2002:python/")
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY_RECIPE)
    refused(["run", tiny, "--out", tmp_path / "run", "--set", f"name={value}"],
            "snncompress: error: --set name: the value is not valid YAML: tags that build Python objects are refused")
    assert not target.exists()


@pytest.mark.parametrize("text,expected", [
    ("stages: " + "[" * 5000 + "]" * 5000, "is not valid YAML: nested too deeply"),
    (TINY_RECIPE + "seed: 5\n", "is not valid YAML: duplicate key 'seed' (line 15, column 1)"),
    (TINY_RECIPE.replace("seed: 0", "seed: " + "9" * 5000), "is not valid YAML: Exceeds the limit (4300 digits)"),
    ("- 1\n- 2\n", "must be a mapping with a 'stages' list"),
])
def test_hostile_yaml_is_one_line(refused, tmp_path, text, expected):
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(text)
    refused(["run", recipe, "--out", tmp_path / "run"], f"snncompress: error: recipe {recipe} {expected}")


def test_binary_recipe_and_alias_bomb_are_one_short_line(refused, tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)))
    refused(["run", binary, "--out", tmp_path / "run"], f"recipe {binary} is not valid YAML: unacceptable character")
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    bomb = tmp_path / "bomb.yaml"  # features: 9**9 strings in its last entry if anything expanded them
    bomb.write_text(TINY_RECIPE.replace("[4, A]", f"[{', '.join(levels)}]"))
    err = refused(["run", bomb, "--out", tmp_path / "run"],
                  "recipe bomb.yaml: model.options.features: entry 0 (['x', 'x', 'x', 'x', 'x', 'x', ...]) is neither")
    assert len(err) < 300
