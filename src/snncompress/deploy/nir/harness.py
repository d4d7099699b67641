"""Spike counts per layer, ours and snnTorch's (its own NIR importer), to compare an exported graph across frameworks."""

from __future__ import annotations

import torch

from ...metrics.ops import SpikeMeter
from ...models import SpikingNetwork


@torch.no_grad()
def layer_spike_counts(model: SpikingNetwork, images: torch.Tensor) -> tuple[dict[str, int], torch.Tensor]:
    """``({LIF name: spikes over all steps and images}, logits [B, classes])`` of ``model`` on ``images``."""
    with SpikeMeter(model) as meter:
        logits = model.eval()(images)
    return {name: int(spikes) for name, spikes in meter.spikes.items()}, logits


@torch.no_grad()
def snntorch_spike_counts(graph, images: torch.Tensor, timesteps: int) -> tuple[dict[str, int], torch.Tensor]:
    """Run ``graph`` through snnTorch's own NIR importer (``snntorch.import_nir.import_from_nir``).

    The images are fed one at a time, each unchanged at every one of ``timesteps`` steps
    (snnTorch's importer turns NIR's ``Flatten(start_dim=0)`` into ``torch.nn.Flatten(0)``, which
    would merge a batch). Returns ``({NIR node name: spikes}, logits [B, classes])`` where the
    logits are the output summed over the steps. Raises what snnTorch raises for nodes it refuses.
    """
    import copy
    import contextlib
    import io

    import snntorch
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):  # the importer prints progress lines
        net = import_from_nir(copy.deepcopy(graph))
    sanitized = {name.replace(".", "_"): name for name in graph.nodes}
    neurons = {sanitized.get(name, name): m for name, m in net.named_modules() if isinstance(m, snntorch.Leaky)}
    counts = {name: 0 for name in neurons}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: counts.__setitem__(name, counts[name] + int(o.sum())))
             for name, m in neurons.items()]
    logits = []
    try:
        for image in images:
            for m in neurons.values():
                m.mem = torch.zeros(0)  # fresh state: Leaky re-creates zeros of the input's shape
            total = 0
            for _ in range(int(timesteps)):
                out = net(image.unsqueeze(0))
                total = total + (out[0] if isinstance(out, tuple) else out)
            logits.append(torch.as_tensor(total).reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    return counts, torch.stack(logits)
