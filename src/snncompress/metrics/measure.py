"""Measure one model: every number of the report contract's metrics dict (except ``checkpoint``).

:func:`measure_model` runs, on a private copy of the model (the caller's model
is not moved or changed):

1. accuracy over the whole test loader, with spikes counted on the way
   (:class:`~snncompress.metrics.ops.SpikeMeter`); the ANN references' accuracy;
2. synaptic operations on the first ``ops_images`` test images
   (:class:`~snncompress.metrics.ops.SynOpsMeter`); the ANN references' dense MACs;
3. energy for the chosen preset (:mod:`~snncompress.metrics.energy`);
4. memory footprint (:mod:`~snncompress.compress.footprint`);
5. latency (:mod:`~snncompress.metrics.latency`);
6. robustness to Gaussian input noise, SNN and ANN references
   (:mod:`~snncompress.metrics.robustness`).

Two ANN references, each named for what it is:

* the **ReLU twin** (``model.ann_twin()``: the SNN's own weights with ReLU in
  place of each LIF), always measured; keys ``ann_accuracy``,
  ``ann_energy_uj``, ``ann_energy_per_layer_uj``, ``ann_synops``,
  ``energy_ratio``, ``robustness_ann`` (the ``ann_`` names are kept for the
  report contract (docs/reference/report.md); they always mean the ReLU twin);
* the **trained ANN** of the run (``reference_ann``: the ANN the user trained,
  possibly wider than the SNN, e.g. before pruning), measured only when
  given; keys ``trained_ann_accuracy``, ``trained_ann_energy_uj``,
  ``trained_ann_energy_per_layer_uj``, ``trained_ann_synops``,
  ``energy_ratio_trained_ann``, ``robustness_trained_ann``. Without a
  reference these keys are absent (not None).

Both references are counted alike: accuracy on the whole test loader, energy
= all Dense MACs of one forward pass x E_MAC of the same preset, robustness on
the same noisy images as the SNN. Both energy ratios are reference / SNN (how
many times less energy the SNN spends).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError
from .energy import ENERGY_PRESETS, dense_ann_energy, energy_uj, layer_energy_uj, preset_costs
from ..compress.footprint import count_params, footprint
from .latency import LATENCY_FORMS, latency_images, measure_latency
from .ops import POOLED_SPIKE_CONVENTIONS, SpikeMeter, SynOpsMeter, count_synops
from .robustness import DEFAULT_SIGMAS, limited_batches, noise_robustness


def _check_options(energy_preset: str, pooled_spikes: str, latency_batch: int, latency_repeats: int,
                   latency_form: str) -> None:
    """Reject option values a recipe can get wrong, naming the option and what is allowed."""
    preset_costs(energy_preset)
    if pooled_spikes not in POOLED_SPIKE_CONVENTIONS:
        raise UserError(f"pooled_spikes must be one of {POOLED_SPIKE_CONVENTIONS}, got {pooled_spikes!r}")
    if latency_batch < 1 or latency_repeats < 1:
        raise UserError(f"latency_batch and latency_repeats must be >= 1, got {latency_batch}, {latency_repeats}")
    if latency_form not in LATENCY_FORMS:
        raise UserError(f"latency_form must be one of {LATENCY_FORMS}, got {latency_form!r}")


def accuracy_and_spikes(model: nn.Module, loader, device) -> tuple[float, SpikeMeter]:
    """Top-1 accuracy (0-1) over every batch of ``loader``, and the spikes counted meanwhile."""
    correct = total = 0
    with torch.inference_mode(), SpikeMeter(model) as spikes:
        for images, labels in limited_batches(loader, None):
            images, labels = images.to(device), labels.to(device)
            correct += int((model(images).argmax(1) == labels).sum())
            total += labels.shape[0]
    if total == 0:
        raise ValueError("the test loader yielded no images")
    return correct / total, spikes


def synops_over_loader(model: nn.Module, loader, max_images: int | None, device, *,
                       conv1_per_timestep: bool = False, pooled_spikes: str = "mac") -> dict:
    """Synaptic operations per image over the first ``max_images`` test images (None: all)."""
    with torch.no_grad(), SynOpsMeter(model, conv1_per_timestep=conv1_per_timestep,
                                      pooled_spikes=pooled_spikes) as meter:
        for images, _ in limited_batches(loader, max_images):
            model(images.to(device))
    return meter.per_image()


def _energy_metrics(synops: dict, ann_synops: dict, preset: str) -> dict:
    """Energy of the SNN (its MACs and ACs) and of the ReLU twin (all its dense MACs), in µJ per image."""
    snn_uj = energy_uj(synops["mac"], synops["ac"], preset)
    twin = dense_ann_energy(ann_synops, preset)
    e_mac, e_ac = ENERGY_PRESETS[preset]
    return {
        "energy_uj": snn_uj, "ann_energy_uj": twin["energy_uj"], "energy_preset": preset,
        "energy_ratio": twin["energy_uj"] / snn_uj if snn_uj > 0 else None,
        "energy_pj_per_op": {"mac": e_mac, "ac": e_ac},
        "energy_per_layer_uj": layer_energy_uj(synops["per_layer"], preset),
        "ann_energy_per_layer_uj": twin["energy_per_layer_uj"],
        "ann_synops": twin["synops"],
        "synops_alt": {**synops["alternative"],
                       "energy_uj": energy_uj(synops["alternative"]["mac"], synops["alternative"]["ac"], preset)},
    }


def _trained_ann_metrics(reference: nn.Module, accuracy: float, one_image: torch.Tensor, snn_uj: float,
                         robustness: dict[str, float], preset: str) -> dict:
    """The ``trained_ann_*`` keys: accuracy (0-1), dense energy (µJ per image) and its ratio to the SNN's.

    ``one_image`` ``[1, C, H, W]`` is the test image the ReLU twin's MACs are counted on.
    """
    energy = dense_ann_energy(count_synops(reference, one_image), preset)
    return {
        "trained_ann_accuracy": accuracy,
        "trained_ann_energy_uj": energy["energy_uj"],
        "trained_ann_energy_per_layer_uj": energy["energy_per_layer_uj"],
        "trained_ann_synops": energy["synops"],
        "energy_ratio_trained_ann": energy["energy_uj"] / snn_uj if snn_uj > 0 else None,
        "robustness_trained_ann": robustness,
    }


def _footprint_metrics(model: nn.Module, include_state: bool, state_bits: int,
                       neurons: dict[str, int], baseline_footprint: int | None) -> dict:
    fp = footprint(model, include_state=include_state, state_bits=state_bits, neurons_per_layer=neurons)
    params, nonzero = count_params(model)
    return {
        "params": params, "nonzero_params": nonzero, "footprint_bytes": fp["bytes"],
        "footprint_format": fp["format"], "footprint_include_state": include_state,
        "footprint_state_bytes": fp["state_bytes"],
        "footprint_bits_by_kind": fp["by_kind"],
        "footprint_tensor_formats": {k: v["format"] for k, v in fp["tensors"].items() if v["format"] != "dense"},
        "compression_ratio": (baseline_footprint / fp["bytes"]) if baseline_footprint and fp["bytes"] else None,
    }


def measure_model(model, test_loader, *, baseline_footprint: int | None = None,
                  energy_preset: str = "fp32", conv1_per_timestep: bool = False,
                  noise_sigmas=DEFAULT_SIGMAS, robustness_images: int | None = 2000,
                  ops_images: int | None = 512, latency_batch: int = 1, latency_repeats: int = 20,
                  device="cpu", include_state: bool = False, pooled_spikes: str = "mac",
                  state_bits: int = 32, latency_warmup: int = 3, latency_form: str = "plan", build_plan=None,
                  seed: int = 0, reference_ann: nn.Module | None = None) -> dict:
    """Every report-contract metric of ``model`` (all but ``checkpoint``, which the caller adds).

    Args:
        model: a snncompress network (SNN, or an ANN twin for ANN stages).
        test_loader: re-iterable, yields ``(images [B, C, H, W] float normalised, labels [B] int64)``.
        baseline_footprint: bytes of the baseline model; gives ``compression_ratio``.
        energy_preset: ``"fp32"``, ``"int32"`` or ``"int8"`` (pJ per MAC / AC).
        conv1_per_timestep: count conv1 on direct input T times instead of once.
        noise_sigmas: Gaussian noise levels (normalised-input units) for robustness.
        robustness_images: first N test images for robustness (None: all).
        ops_images: first N test images for synaptic operations (None: all).
        latency_batch / latency_repeats / latency_warmup / latency_form: latency protocol
            (:mod:`~snncompress.metrics.latency`).
        build_plan: the inference-plan builder that latency form ``"plan"`` times
            (:func:`snncompress.deploy.build_inference_plan`; handed in from the layer that owns it).
        device: where to run (the model is copied there).
        include_state: count membrane potentials in ``footprint_bytes``.
        pooled_spikes: ``"mac"`` (NeuroBench, default) or ``"ac"``; see
            :mod:`snncompress.metrics.ops`.
        state_bits: bits per membrane potential of a LIF without a ``state_quantizer``.
        seed: seed of the robustness noise.
        reference_ann: the trained ANN of the run (a network in ANN mode, ``spiking == False``,
            same input ``[B, C, H, W]`` and classes as ``model``, any widths), measured as a second
            reference beside the ReLU twin; ``None``: no ``trained_ann_*`` keys. Copied, not changed.

    Returns:
        the metrics dict: ``accuracy, timesteps, params, nonzero_params,
        footprint_bytes, spikes_per_image, firing_rate, synops {ac, mac, dense},
        energy_uj, ann_energy_uj, energy_preset, latency_ms, latency_batch,
        robustness`` plus ``ann_accuracy, robustness_ann, energy_ratio,
        synops_per_layer, energy_per_layer_uj, footprint_format, latency_threads,
        latency_device, ...`` (see the README's measurement section). The ``ann_*`` keys,
        ``energy_ratio`` and ``robustness_ann`` are the ReLU twin's. With ``reference_ann`` also
        ``trained_ann_accuracy`` (0-1, whole test loader), ``trained_ann_energy_uj`` (µJ per image,
        all Dense MACs x E_MAC), ``trained_ann_energy_per_layer_uj`` ``{layer: µJ}``,
        ``trained_ann_synops`` ``{mac, dense}`` (per image), ``energy_ratio_trained_ann``
        (``trained_ann_energy_uj / energy_uj``; None when the SNN spends no energy) and
        ``robustness_trained_ann`` ``{sigma_key: accuracy}`` on the SNN's noisy images.

    Raises:
        ValueError: ``reference_ann`` is in SNN mode (``spiking == True``).
    """
    _check_options(energy_preset, pooled_spikes, latency_batch, latency_repeats, latency_form)
    if latency_form == "plan" and build_plan is None:
        raise ValueError("latency_form 'plan' needs build_plan (snncompress.deploy.build_inference_plan)")
    if reference_ann is not None and getattr(reference_ann, "spiking", False):
        raise ValueError("reference_ann must be the trained ANN in ANN mode (spiking == False), "
                         "got a network in SNN mode")
    device = torch.device(device)
    snn = copy.deepcopy(model).to(device).eval()
    spiking = bool(getattr(snn, "spiking", False))
    ann = snn.ann_twin().eval() if spiking else snn
    trained = copy.deepcopy(reference_ann).to(device).eval() if reference_ann is not None else None

    accuracy, spikes = accuracy_and_spikes(snn, test_loader, device)
    ann_accuracy = accuracy_and_spikes(ann, test_loader, device)[0] if spiking else accuracy
    synops = synops_over_loader(snn, test_loader, ops_images, device,
                                conv1_per_timestep=conv1_per_timestep, pooled_spikes=pooled_spikes)
    one_image = latency_images(test_loader, 1).to(device)
    ann_synops = count_synops(ann, one_image)
    robust_models = {"snn": snn, "ann": ann} if spiking else {"snn": snn}
    if trained is not None:
        robust_models["trained_ann"] = trained
    robustness = noise_robustness(robust_models, test_loader, noise_sigmas, max_images=robustness_images,
                                  device=device, seed=seed)
    energy = _energy_metrics(synops, ann_synops, energy_preset)
    reference = {} if trained is None else _trained_ann_metrics(
        trained, accuracy_and_spikes(trained, test_loader, device)[0], one_image, energy["energy_uj"],
        robustness["trained_ann"], energy_preset)
    latency = measure_latency(snn, latency_images(test_loader, latency_batch), repeats=latency_repeats,
                              warmup=latency_warmup, device=device, form=latency_form,
                              build_plan=build_plan)
    return {
        "accuracy": accuracy, "ann_accuracy": ann_accuracy,
        "timesteps": int(snn.timesteps) if spiking else 1, "spiking": spiking,
        "encoding": getattr(snn, "spec", {}).get("encoding", "direct"),
        **_footprint_metrics(snn, include_state, state_bits, spikes.neurons(), baseline_footprint),
        "spikes_per_image": spikes.spikes_per_image(), "spikes_per_layer": spikes.layer_spikes_per_image(),
        "firing_rate": spikes.firing_rates(),
        "synops": {k: synops[k] for k in ("ac", "mac", "dense")}, "synops_per_layer": synops["per_layer"],
        "synops_images": synops["images"],
        "synops_conventions": {"conv1": "per_timestep" if conv1_per_timestep else "once",
                               "pooled_spikes": pooled_spikes},
        **energy,
        **latency,
        "robustness": robustness["snn"], "robustness_ann": robustness.get("ann", robustness["snn"]),
        "robustness_images": spikes.images if robustness_images is None else min(spikes.images, robustness_images),
        "test_images": spikes.images,
        **reference,
    }

