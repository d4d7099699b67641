"""Memory footprint: the bits a deployed model has to store (SPEC §6, tinySNN's memory).

Every tensor of the model's ``state_dict`` is costed at the bit width it is
actually stored with:

* weights (conv / linear ``weight`` and ``bias``): 32 bits per value (the
  tensor's own element size) unless the checkpoint stores them quantized:
  ``quant[name] = {"bits": b, "int": ..., "scale": ...}`` costs ``b`` bits
  per value plus 32 bits per value of ``scale``;
* neuron parameters (LIF ``leak`` and ``threshold``): the same rule;
* normalisation (BatchNorm weight, bias, running mean and variance): the
  same rule; integer bookkeeping buffers (``num_batches_tracked``) are not
  stored for inference and cost nothing;
* membrane state (only with ``include_state``): one potential per neuron,
  at ``state_bits`` (default 32), or at ``quant["<lif>.membrane"]["bits"]``
  for that layer.

Sparse weights: a weight with a pruning mask (``model.masks[name]``, or the
``masks`` argument) is stored in whichever of three formats is cheapest for
that tensor (``nnz`` = kept positions, ``b`` = value bits, the tensor viewed
as ``rows = shape[0]`` by ``cols = numel / rows``):

* ``dense``:  ``numel x b``
* ``bitmap``: ``numel x 1`` (one presence bit per position) ``+ nnz x b``
* ``csr``:    ``nnz x (b + ceil(log2 cols))`` (value + column index)
  ``+ (rows + 1) x ceil(log2(nnz + 1))`` (row pointers)

Unmasked tensors are dense. Totals round up to whole bytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


def _clean_name(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (torch parametrize naming)."""
    return name.replace(".parametrizations.", ".").replace(".original", "")


def _tensor_kind(owner: nn.Module | None) -> str:
    if isinstance(owner, LIF):
        return "neuron"
    if isinstance(owner, nn.modules.conv._ConvNd | nn.Linear):
        return "weight"
    if isinstance(owner, nn.modules.batchnorm._NormBase):
        return "norm"
    return "other"


def _owner(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    path = name.rsplit(".", 1)[0] if "." in name else ""
    path = path.split(".parametrizations")[0]
    return modules.get(path)


def _tensor_cost(name: str, tensor: torch.Tensor, kind: str, quant: dict, mask: torch.Tensor | None) -> dict:
    """Cost of one stored tensor: ``{"kind", "numel", "stored", "value_bits", "format", "bits"}``."""
    q = quant.get(name)
    value_bits = int(q["bits"]) if q else tensor.element_size() * 8
    scale_bits = SCALE_BITS * int(torch.as_tensor(q.get("scale", 1.0)).numel()) if q else 0
    numel = tensor.numel()
    fmt, kept, bits = "dense", numel, numel * value_bits
    if mask is not None and numel > 0:
        kept = int(mask.bool().sum())
        options = sparse_format_bits(tuple(tensor.shape), kept, value_bits)
        fmt = min(SPARSE_FORMATS, key=lambda f: options[f])  # ties keep the simpler format
        bits = options[fmt]
    return {"kind": kind, "numel": numel, "stored": kept, "value_bits": value_bits, "format": fmt,
            "bits": bits + scale_bits}


def _state_costs(quant: dict, state_bits: int, neurons: dict[str, int]) -> dict[str, dict]:
    """Cost of one membrane potential per neuron of each LIF layer, ``{"<lif>.membrane": cost}``."""
    costs = {}
    for name, count in neurons.items():
        q = quant.get(f"{name}.membrane")
        bits = int(q["bits"]) if q else int(state_bits)
        costs[f"{name}.membrane"] = {"kind": "state", "numel": count, "stored": count, "value_bits": bits,
                                     "format": "dense", "bits": count * bits}
    return costs


def footprint(model: nn.Module, quant: dict | None = None, *, masks: dict | None = None,
              include_state: bool = False, state_bits: int = 32,
              neurons_per_layer: dict[str, int] | None = None) -> dict:
    """Memory footprint of ``model`` as stored (see the module docstring for the rules).

    Args:
        model: the network; ``model.masks`` is used when ``masks`` is None.
        quant: ``{name: {"bits": b, "scale": tensor, ...}}`` of quantized tensors.
        include_state: add the membrane potentials (one per neuron) to the total.
        state_bits: bits per membrane potential when ``quant`` names none for the layer.
        neurons_per_layer: ``{lif_name: neurons per image}`` (from
            :class:`~snncompress.metrics.ops.SpikeMeter`); needed for the state.

    Returns:
        ``{"bytes", "bits", "by_kind": {kind: bits}, "state_bytes", "format", "tensors":
        {name: cost}, "include_state"}``; ``bytes`` includes the state only with ``include_state``.
    """
    quant = quant or {}
    masks = getattr(model, "masks", {}) if masks is None else masks
    modules = dict(model.named_modules())
    tensors = {}
    for raw_name, tensor in model.state_dict().items():
        if not torch.is_floating_point(tensor):
            continue  # integer bookkeeping (num_batches_tracked) is not needed at inference
        name = _clean_name(raw_name)
        kind = _tensor_kind(_owner(modules, raw_name))
        tensors[name] = _tensor_cost(name, tensor, kind, quant, masks.get(name))
    state = _state_costs(quant, state_bits, neurons_per_layer or {})
    by_kind = {k: 0 for k in KINDS}
    for cost in [*tensors.values(), *state.values()]:
        by_kind[cost["kind"]] += cost["bits"]
    stored_bits = sum(v for k, v in by_kind.items() if k != "state")
    total_bits = stored_bits + (by_kind["state"] if include_state else 0)
    return {
        "bytes": math.ceil(total_bits / 8), "bits": total_bits, "by_kind": by_kind,
        "state_bytes": math.ceil(by_kind["state"] / 8),
        "format": SPARSE_SCHEME if any(name in masks for name in tensors) else "dense",
        "tensors": {**tensors, **(state if include_state else {})}, "include_state": bool(include_state),
    }


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) over ``model.parameters()`` (pruned weights are zero)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
