"""Model registry: build a network by name, or rebuild one from its spec."""

from __future__ import annotations

from pydantic import ValidationError

from ..encoding import ENCODINGS
from ..neuron import NeuronOptions
from ..errors import UserError, format_validation_error
from .base import NEURON_DEFAULTS, ChannelGroup, FamilyOptions, SpikingNetwork
from .stdp import ARCH as STDP_ARCH
from .stdp import DiehlCookNetwork, DiehlCookOptions, diehl_cook_spec
from .graph import GRAPH_NODE_KINDS, GraphNetwork, GraphOptions
from .resnet import RESNET_LAYOUTS, ResNetOptions, SpikingResNet, resnet_spec
from .vgg import VGG_FEATURES, SpikingVGG, VGGOptions, vgg_spec

#: Every model family, by its name in specs; each class says which archs it builds and how.
FAMILIES: dict[str, type[SpikingNetwork]] = {cls.FAMILY: cls for cls in (SpikingVGG, SpikingResNet, DiehlCookNetwork,
                                                                    GraphNetwork)}
MODEL_NAMES = tuple(name for cls in FAMILIES.values() for name in cls.ARCHS)


def family_of(name: str) -> type[SpikingNetwork]:
    """The family class that builds arch ``name`` (``UserError`` for an unknown name)."""
    for cls in FAMILIES.values():
        if name in cls.ARCHS:
            return cls
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def family_options(name: str) -> type[FamilyOptions]:
    """The options model of the named network's family (what ``model.options`` may hold)."""
    return family_of(name).Options


def build_model(name: str, num_classes: int, in_shape, timesteps: int, *,
                encoding: str = "direct", neuron: dict | None = None, **options) -> SpikingNetwork:
    """Build a named network in SNN mode.

    Args:
        name: one of :data:`MODEL_NAMES` (``vgg5/9/11/16``, ``convnet``, ``resnet20/19``, ``diehl_cook``:
            the unsupervised STDP network of :mod:`.stdp`, which ignores ``encoding`` and ``neuron``).
        num_classes: number of output classes.
        in_shape: ``(C, H, W)`` of the input images.
        timesteps: T, the number of simulation steps.
        encoding: ``"direct"`` (default) or ``"poisson"``.
        neuron: LIF options (``leak``, ``threshold``, ``reset``, ``surrogate``,
            ``learn_leak``, ``learn_threshold``, ``per_channel``, ``backend``).
        **options: family options: VGG ``features``, ``classifier``,
            ``batchnorm``, ``dropout``, ``conv_dropout``; ResNet ``batchnorm``,
            ``dropout``, ``width_mult``.

    Returns:
        a network whose ``forward(images [B, C, H, W])`` returns logits
        ``[B, num_classes]``; ``.ann_twin()`` gives its ReLU twin.
    """
    family_class = family_of(name)
    try:
        family = family_class.make_spec(name, **options)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"bad option for model {name!r}")) from None
    unknown = set(neuron or {}) - set(NeuronOptions.model_fields)
    if unknown:
        raise UserError(f"unknown neuron option(s) {sorted(unknown)}; allowed: {sorted(NeuronOptions.model_fields)}")
    spec = {
        "arch": name, **family, "in_shape": [int(v) for v in in_shape],
        "num_classes": int(num_classes), "timesteps": int(timesteps), "encoding": encoding,
        "neuron": {**NEURON_DEFAULTS, **{k: v for k, v in (neuron or {}).items() if v is not None}},
    }
    if name == STDP_ARCH:
        spec["encoding"] = "poisson"  # its own Poisson input (rates from pixel intensities)
    return build_from_spec(spec)


def build_from_spec(spec: dict) -> SpikingNetwork:
    """Rebuild a network from ``model.spec`` (the architecture as data)."""
    if spec.get("family") not in FAMILIES:
        raise UserError(f"model spec has unknown family {spec.get('family')!r}")
    if int(spec.get("timesteps", 0)) < 1:
        raise UserError(f"timesteps must be >= 1, got {spec.get('timesteps')}")
    if spec.get("encoding", "direct") not in ENCODINGS:
        raise UserError(f"unknown encoding {spec.get('encoding')!r}; choose one of {ENCODINGS}")
    try:
        return FAMILIES[spec["family"]](spec)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model spec is not valid: {exc}") from None


__all__ = ["FAMILIES", "GRAPH_NODE_KINDS", "GraphNetwork", "GraphOptions", "MODEL_NAMES", "ChannelGroup", "DiehlCookNetwork", "DiehlCookOptions", "FamilyOptions",
           "RESNET_LAYOUTS", "ResNetOptions", "STDP_ARCH", "SpikingNetwork", "SpikingResNet", "SpikingVGG",
           "VGGOptions", "VGG_FEATURES", "build_from_spec", "build_model", "diehl_cook_spec", "family_of",
           "family_options", "resnet_spec", "vgg_spec"]
