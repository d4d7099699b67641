"""Memory footprint: the bits a deployed model has to store (docs/measuring.md, tinySNN's memory).

Every tensor of the model's ``state_dict`` is costed at the bit width it is
actually stored with:

* weights (conv / linear ``weight`` and ``bias``): 32 bits per value (the
  tensor's own element size) unless a quantizer is attached to the tensor
  (:mod:`snncompress.compress.quantizers`): then ``b`` bits per value (its
  integer codes) plus 32 bits per value of its ``scale``;
* neuron parameters (LIF ``leak`` and ``threshold``, and those of modules marked ``is_neuron``
  such as the Diehl & Cook population's adaptive thresholds): the same rule;
* normalisation (BatchNorm weight, bias, running mean and variance): the
  same rule; integer bookkeeping buffers (``num_batches_tracked``) are not
  stored for inference and cost nothing;
* membrane state (only with ``include_state``): one potential per neuron,
  at ``state_bits`` (default 32), or at the bit width of that layer's
  ``state_quantizer``.

Sparse weights: a tensor with a pruning mask (:mod:`snncompress.compress.masks`) is stored in whichever of three formats is cheapest for
that tensor (``nnz`` = kept positions, ``b`` = value bits, the tensor viewed
as ``rows = shape[0]`` by ``cols = numel / rows``):

* ``dense``:  ``numel x b``
* ``bitmap``: ``numel x 1`` (one presence bit per position) ``+ nnz x b``
* ``csr``:    ``nnz x (b + ceil(log2 cols))`` (value + column index)
  ``+ (rows + 1) x ceil(log2(nnz + 1))`` (row pointers)

Unmasked tensors are dense. Totals round up to whole bytes. The checkpoint
(:mod:`snncompress.checkpoint`) stores exactly these bits, each packed array
rounded up to whole bytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .state import StoredTensor, stored_tensors
from ..neuron import LIF

SPARSE_FORMATS = ("dense", "bitmap", "csr")
SCALE_BITS = 32
SPARSE_SCHEME = "per masked tensor, cheapest of dense | bitmap (1 bit/position + values) | csr (values + column indices + row pointers)"
KINDS = ("weight", "neuron", "norm", "other", "state")


def index_bits(count: int) -> int:
    """Bits of an unsigned index able to address ``count`` distinct values (at least 1)."""
    return max(1, math.ceil(math.log2(max(count, 2))))


def sparse_format_bits(shape: tuple[int, ...], kept: int, value_bits: int) -> dict[str, int]:
    """Bits of a tensor of ``shape`` with ``kept`` stored values in each of :data:`SPARSE_FORMATS`."""
    numel = math.prod(shape)
    rows = shape[0] if shape else 1
    cols = max(numel // max(rows, 1), 1)
    return {
        "dense": numel * value_bits,
        "bitmap": numel + kept * value_bits,
        "csr": kept * (value_bits + index_bits(cols)) + (rows + 1) * index_bits(kept + 1),
    }


def _tensor_kind(owner: nn.Module | None) -> str:
    if isinstance(owner, LIF) or getattr(owner, "is_neuron", False):
        return "neuron"
    if isinstance(owner, nn.modules.conv._ConvNd | nn.Linear):
        return "weight"
    if isinstance(owner, nn.modules.batchnorm._NormBase):
        return "norm"
    return "other"


def tensor_cost(stored: StoredTensor) -> dict:
    """Cost of one stored tensor: ``{"kind", "numel", "stored", "value_bits", "format", "bits"}``."""
    q = stored.quantizer
    value_bits = q.bits if q is not None else stored.values.element_size() * 8
    scale_bits = SCALE_BITS * q.scale.numel() if q is not None else 0
    numel = stored.values.numel()
    fmt, kept, bits = "dense", numel, numel * value_bits
    if stored.mask is not None and numel > 0:
        kept = int(stored.mask.sum())
        options = sparse_format_bits(tuple(stored.values.shape), kept, value_bits)
        fmt = min(SPARSE_FORMATS, key=lambda f: options[f])  # ties keep the simpler format
        bits = options[fmt]
    return {"kind": _tensor_kind(stored.owner), "numel": numel, "stored": kept, "value_bits": value_bits,
            "format": fmt, "bits": bits + scale_bits}


def _state_costs(model: nn.Module, state_bits: int, neurons: dict[str, int]) -> dict[str, dict]:
    """Cost of one membrane potential per neuron of each LIF layer, ``{"<lif>.membrane": cost}``."""
    modules = dict(model.named_modules())
    costs = {}
    for name, count in neurons.items():
        quantizer = getattr(modules.get(name), "state_quantizer", None)
        bits = int(quantizer.bits) if quantizer is not None else int(state_bits)
        costs[f"{name}.membrane"] = {"kind": "state", "numel": count, "stored": count, "value_bits": bits,
                                     "format": "dense", "bits": count * bits}
    return costs


def footprint(model: nn.Module, *, include_state: bool = False, state_bits: int = 32,
              neurons_per_layer: dict[str, int] | None = None) -> dict:
    """Memory footprint of ``model`` as its checkpoint stores it (see the module docstring for the rules).

    Args:
        model: the network; masks and quantizers are read from its tensors
            (:mod:`snncompress.compress`).
        include_state: add the membrane potentials (one per neuron) to the total.
        state_bits: bits per membrane potential of a LIF layer without a state quantizer.
        neurons_per_layer: ``{lif_name: neurons per image}`` (from
            :class:`~snncompress.metrics.ops.SpikeMeter`); needed for the state.

    Returns:
        ``{"bytes", "bits", "by_kind": {kind: bits}, "state_bytes", "format", "tensors":
        {name: cost}, "include_state"}``; ``bytes`` includes the state only with ``include_state``.
    """
    stored = stored_tensors(model)
    tensors = {t.name: tensor_cost(t) for t in stored}
    state = _state_costs(model, state_bits, neurons_per_layer or {})
    by_kind = {k: 0 for k in KINDS}
    for cost in [*tensors.values(), *state.values()]:
        by_kind[cost["kind"]] += cost["bits"]
    stored_bits = sum(v for k, v in by_kind.items() if k != "state")
    total_bits = stored_bits + (by_kind["state"] if include_state else 0)
    return {
        "bytes": math.ceil(total_bits / 8), "bits": total_bits, "by_kind": by_kind,
        "state_bytes": math.ceil(by_kind["state"] / 8),
        "format": SPARSE_SCHEME if any(t.mask is not None for t in stored) else "dense",
        "tensors": {**tensors, **(state if include_state else {})}, "include_state": bool(include_state),
    }


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) over ``model.parameters()`` (pruned weights are zero)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
