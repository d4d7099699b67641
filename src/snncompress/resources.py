"""Resource limits: a recipe that cannot fit this machine is refused before anything is written.

Two checks run when a recipe loads (after validation, before the run folder exists):

* **Memory.** Each stage's peak memory is estimated from the network built on the
  meta device (no memory, no arithmetic): the activations one image produces in one
  timestep (every leaf module's output), times the timesteps ``T`` and the batch, times
  the tensors backpropagation through time keeps per activation, plus the parameters
  with their gradients and Adam moments. The largest estimate is compared with the
  memory available now (the GPU's free memory on CUDA; on the CPU ``MemAvailable``
  of ``/proc/meminfo``, or ``psutil``, or ``os.sysconf``). The dataset is already in
  memory when the check runs, so what is available already excludes it.
* **Counts with no natural limit** (images for calibration, PCA, robustness, SynOps,
  latency repeats, training steps = epochs x batches per epoch) must stay under the
  ceilings :data:`COUNT_CEILINGS` states.

A refusal is one :class:`~snncompress.errors.UserError` line naming the option and the
estimate, e.g. ``model.timesteps: 1000000000 needs about 3.1 TB for train_snn
activations; ...``. ``--ignore-limits`` (or ``ignore=True``) runs the recipe anyway.
All sizes are in bytes unless a name says otherwise.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from .errors import UserError
from .models import build_model

#: bytes of one float32 element
FLOAT_BYTES = 4
#: float tensors a training step keeps per activation element for the backward pass over T steps
#: (a layer's input and its output or surrogate gradient), measured within 1.5x on a convnet (tests/test_limits.py)
SAVED_PER_ACTIVATION = 2
#: parameter copies during training: weights, gradients and Adam's two moments
TRAINING_PARAMETER_COPIES = 4
#: live activation copies of an inference pass (a layer's input and output), no graph kept
INFERENCE_COPIES = 2
#: stages whose training runs the network as an ANN (one step, no time dimension)
ANN_TRAINING = {"train_ann", "train_ann_sparse"}
#: stages that do not run a backward pass through the network (an inference estimate applies)
NO_BACKWARD = {"convert", "evaluate", "export", "load", "quant_sweep", "select_stdp", "train_stdp"}

#: stated ceilings for counts that nothing else bounds: option -> (largest accepted value, what it counts)
COUNT_CEILINGS = {
    "calib_images": (10**7, "images"), "pca_images": (10**7, "images"), "score_images": (10**7, "images"),
    "robustness_images": (10**7, "images"), "ops_images": (10**7, "images"), "verify_images": (10**6, "images"),
    "samples": (10**9, "samples"), "label_samples": (10**8, "samples"),
    "latency_repeats": (10**5, "repeats"), "latency_batch": (10**6, "images"),
    "calib_timesteps": (10**6, "timesteps"), "max_candidates": (10**6, "candidates"),
}
#: training steps (epochs x batches per epoch) a stage may take
MAX_TRAINING_STEPS = 10**8
#: the default of each size option: the one most above its default is named as the cause
SIZE_DEFAULTS = {"model.timesteps": 4, "data.batch_size": 128}


@dataclass(frozen=True)
class NetworkSize:
    """What one image costs the network: ``activations`` elements per timestep, ``params`` elements."""

    activations: int
    params: int


def network_size(arch: str, num_classes: int, in_shape, **build) -> NetworkSize:
    """Count a network's parameters and per-image, per-timestep activations on the meta device.

    The network is built with one timestep and runs spiking on one image, so every leaf module's
    output (a LIF layer's spikes included) is one image's one step. ``build`` goes to
    :func:`~snncompress.models.build_model` (encoding, neuron, family options).
    """
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(arch, num_classes, tuple(in_shape), 1, **build)
        activations = count_activations(model, in_shape)
    return NetworkSize(activations=activations, params=sum(p.numel() for p in model.parameters()))


def count_activations(model, in_shape) -> int:
    """Elements every leaf module of ``model`` outputs for one image in one step (run spiking, T=1)."""
    counted = [0]

    def count(_module, _inputs, output):
        if torch.is_tensor(output):
            counted[0] += output.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    spiking, training, timesteps = model.spiking, model.training, model.timesteps
    try:
        with torch.no_grad():
            model.timesteps = 1
            model.set_spiking(True).eval()(torch.zeros(1, *in_shape, device=next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
        model.timesteps = timesteps
        model.set_spiking(spiking).train(training)
    return counted[0]


def training_bytes(size: NetworkSize, timesteps: int, batch: int) -> tuple[int, int]:
    """``(activation bytes, parameter bytes)`` of one training step: BPTT over ``timesteps`` x ``batch``."""
    activations = size.activations * timesteps * batch * FLOAT_BYTES * SAVED_PER_ACTIVATION
    return activations, size.params * FLOAT_BYTES * TRAINING_PARAMETER_COPIES


def inference_bytes(size: NetworkSize, timesteps: int, batch: int) -> int:
    """Bytes of one forward pass without a graph: ``[T, B, ...]`` activations, input and output of a layer."""
    return size.activations * timesteps * batch * FLOAT_BYTES * INFERENCE_COPIES + size.params * FLOAT_BYTES


@dataclass(frozen=True)
class Estimate:
    """One stage's peak memory ``bytes`` and the option whose size drives it (``option = value``)."""

    stage: str
    what: str
    bytes: int
    option: str
    value: object


def stage_estimate(kind: str, name: str, opts, size: NetworkSize, *, timesteps: int, batch_size: int,
                   test_batch_size: int, train_images: int, test_images: int, options_value) -> Estimate:
    """The peak-memory :class:`Estimate` of one stage (``opts``: its validated options); a batch holds at
    most the split's images."""
    batch, test_batch = min(batch_size, train_images), min(test_batch_size, test_images)
    steps = stage_timesteps(kind, opts, timesteps)
    if kind == "convert":
        chunk = min(getattr(opts, "chunk", 64), getattr(opts, "calib_images", 64))
        calib_t = getattr(opts, "calib_timesteps", steps)
        found = inference_bytes(size, calib_t, chunk)
        option, value = _culprit({"calib_timesteps": (calib_t, 100), "chunk": (chunk, 64)}, name, options_value)
        return Estimate(name, "calibration activations", found, option, value)
    if kind in NO_BACKWARD:
        found = inference_bytes(size, steps, test_batch)
        option, value = _culprit({"model.timesteps": (steps, 4), "data.test_batch_size": (test_batch_size, 512)},
                                 name, options_value)
        return Estimate(name, "inference activations", found, option, value)
    activations, params = training_bytes(size, steps, batch)
    sizes = {"model.timesteps": (steps, 4), "data.batch_size": (batch_size, 128)}
    if kind == "train_snn" and getattr(opts, "timesteps", None):
        sizes = {"timesteps": (steps, 4), "data.batch_size": (batch_size, 128)}
    if params > activations:
        return Estimate(name, "parameters and optimizer state", activations + params, "model.options", options_value)
    option, value = _culprit(sizes, name, options_value)
    return Estimate(name, "activations", activations + params, option, value)


def stage_timesteps(kind: str, opts, timesteps: int) -> int:
    """The T a stage runs: 1 for ANN training, its own ``timesteps`` or schedule's largest, else the model's."""
    if kind in ANN_TRAINING:
        return 1
    schedule = getattr(opts, "schedule", None)
    if schedule:
        return max([timesteps, *schedule])
    return getattr(opts, "timesteps", None) or timesteps


def _culprit(sizes: dict, stage: str, options_value) -> tuple[str, object]:
    """The option among ``sizes`` (name -> (value, default)) most above its default; a stage option is
    named ``stages.<stage>.<option>``; none above: the network's width (``model.options``)."""
    ratio, option, value = max((v / d, k, v) for k, (v, d) in sizes.items())
    if ratio <= 1:
        return "model.options", options_value
    return (option if "." in option else f"stages.{stage}.{option}"), value


def check_counts(stages, train_images: int, batch_size: int, where: str) -> None:
    """Refuse a count option above its :data:`COUNT_CEILINGS` ceiling, or more than
    :data:`MAX_TRAINING_STEPS` training steps in one stage (``stages``: (kind, name, options))."""
    batches = -(-train_images // batch_size)
    for kind, name, opts in stages:
        for option, (ceiling, unit) in COUNT_CEILINGS.items():
            value = getattr(opts, option, None)
            if isinstance(value, int) and value > ceiling:
                raise UserError(f"{where}: {_stage_option(name, option)}: {value} {unit} is above the "
                                f"ceiling of {ceiling} (--ignore-limits runs it anyway)")
        for epochs_option, batches_option in (("epochs", "max_batches"), ("finetune_epochs", "finetune_max_batches"),
                                              ("ann_epochs", None)):
            epochs = getattr(opts, epochs_option, None)
            if not isinstance(epochs, int):
                continue
            cap = getattr(opts, batches_option, None) if batches_option else None
            steps = epochs * min(batches, cap or batches)
            if steps > MAX_TRAINING_STEPS:
                raise UserError(f"{where}: {_stage_option(name, epochs_option)}: {epochs} epochs of "
                                f"{min(batches, cap or batches)} batches are {steps} training steps, above the "
                                f"ceiling of {MAX_TRAINING_STEPS} (--ignore-limits runs it anyway)")


def _stage_option(name: str, option: str) -> str:
    """``stages.<name>.<option>``; the report's measurement: ``measure.<option>``; ``evaluate --set``: ``<option>``."""
    return f"measure.{option}" if name == "measure" else f"stages.{name}.{option}" if name else option


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes of memory free for a run now: the GPU's free memory on CUDA, else the machine's available RAM."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**63  # unknown: nothing is refused for memory


def human_bytes(count: float, binary: bool = False) -> str:
    """``3.1e12`` -> ``"3.1 TB"`` (decimal units); ``binary=True``: ``"23 GiB"``."""
    base, units = (1024, ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]) if binary else \
        (1000, ["B", "kB", "MB", "GB", "TB", "PB", "EB"])
    for unit in units:
        if count < base or unit == units[-1]:
            return f"{count:.2g} {unit}" if count < 10 else f"{count:.0f} {unit}"
        count /= base
    return f"{count:.0f} {units[-1]}"


def check_memory(estimates: list[Estimate], available: int, where: str) -> None:
    """Refuse the largest estimate if it exceeds ``available`` bytes, naming its option and the sizes."""
    if not estimates:
        return
    worst = max(estimates, key=lambda e: e.bytes)
    if worst.bytes > available:
        raise UserError(f"{where}: {worst.option}: {worst.value} needs about {human_bytes(worst.bytes)} for "
                        f"{worst.stage} {worst.what}; this machine has {human_bytes(available, binary=True)} "
                        f"available (--ignore-limits runs it anyway)")


def check_recipe_resources(recipe, stages, *, in_shape, num_classes: int, train_images: int, test_images: int,
                           device,
                           measure: dict | None = None, where: str, ignore: bool = False) -> list[Estimate]:
    """Check a validated recipe's counts and each stage's peak memory against this machine.

    ``stages``: ``(kind, options)`` pairs as the pipeline validated them; ``measure``: the report's
    measurement options (checked as an ``evaluate`` stage). Returns the estimates; raises a
    :class:`UserError` naming the option that does not fit, unless ``ignore``.
    """
    named = [(kind, opts.name, opts) for kind, opts in stages]
    if measure:
        named.append(("evaluate", "measure", _Options(measure)))
    data, model = recipe.data, recipe.model
    if ignore:
        return []
    check_counts(named, train_images, data.batch_size, where)
    try:
        size = network_size(model.arch, num_classes, in_shape, encoding=model.encoding,
                            neuron=model.neuron.model_dump(), **model.options)
    except (RuntimeError, ValueError):
        return []  # recipe.check_model names what does not fit
    estimates = [stage_estimate(kind, name, opts, size, timesteps=model.timesteps, batch_size=data.batch_size,
                                test_batch_size=data.test_batch_size, train_images=train_images, test_images=test_images,
                                options_value=_short_options(model.options))
                 for kind, name, opts in named]
    check_memory(estimates, available_memory(device), where)
    return estimates


def check_checkpoint_command(model, options, *, batch_size: int, device, where: str, train_images: int = 1,
                             train_batch_size: int | None = None, ignore: bool = False) -> None:
    """``snncompress evaluate`` / ``quantize`` on a loaded ``model``: the options' counts and their peak memory.

    ``options``: the command's validated options (a dict or an options model); ``batch_size``: the images of
    one inference batch (a larger ``latency_batch`` counts instead); ``train_batch_size``: the batch of the
    training the command may run (quantization-aware training), checked over ``train_images``.
    """
    if ignore:
        return
    opts = _Options(options) if isinstance(options, dict) else options
    check_counts([("checkpoint", "", opts)], train_images, train_batch_size or 1, where)
    size = NetworkSize(activations=count_activations(model, model.spec["in_shape"]),
                       params=sum(p.numel() for p in model.parameters()))
    batch = max(batch_size, getattr(opts, "latency_batch", 1))
    option = "latency_batch" if batch > batch_size else "batch"
    estimates = [Estimate(where.split()[0], "inference activations", inference_bytes(size, model.timesteps, batch),
                          option, batch)]
    if train_batch_size:
        activations, params = training_bytes(size, model.timesteps, min(train_batch_size, train_images))
        estimates.append(Estimate(where.split()[0], "training activations", activations + params, "batch",
                                  train_batch_size))
    check_memory(estimates, available_memory(device), where)


def _short_options(options: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in options.items()) + "}" if options else "{}"


class _Options:
    """Attribute access to a measurement options dict (as a stage's options model gives it)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
