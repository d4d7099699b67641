"""Compute energy from synaptic operation counts (docs/measuring.md).

    energy = Effective_MACs x E_MAC + Effective_ACs x E_AC

with per-operation energies in picojoules (Horowitz, ISSCC 2014, 45 nm):

=========  ========  =======  ==========================================
preset     E_MAC pJ  E_AC pJ  used by
=========  ========  =======  ==========================================
``fp32``   4.6       0.9      DIET-SNN, STP (32-bit float)
``int32``  3.2       0.1      AGC (32-bit integer)
``int8``   0.23      0.03     8-bit integer hardware
=========  ========  =======  ==========================================

An ANN's energy (:func:`dense_ann_energy`) is all its dense MACs x E_MAC (no
zero skipping, no ACs). :func:`~snncompress.metrics.measure_model` applies it
to two references of the SNN, both counted the same way (one forward pass on a
test image, the ``Dense`` count of :func:`~snncompress.metrics.count_synops`):

* the ReLU twin (``model.ann_twin()``: the SNN's own weights with ReLU in place
  of each LIF), keys ``ann_energy_uj`` / ``ann_energy_per_layer_uj``;
* the trained ANN of the run, when given (it may be wider than the SNN, e.g.
  before pruning), keys ``trained_ann_energy_uj`` / ``trained_ann_energy_per_layer_uj``.
"""

from __future__ import annotations

from ..errors import UserError

#: name -> (E_MAC, E_AC) in picojoules per operation.
ENERGY_PRESETS: dict[str, tuple[float, float]] = {
    "fp32": (4.6, 0.9),
    "int32": (3.2, 0.1),
    "int8": (0.23, 0.03),
}

PJ_PER_UJ = 1e6


def preset_costs(preset: str) -> tuple[float, float]:
    """(E_MAC, E_AC) in pJ of a named preset; a :class:`UserError` names the allowed presets."""
    if preset not in ENERGY_PRESETS:
        raise UserError(f"energy_preset {preset!r} is unknown; choose one of {', '.join(ENERGY_PRESETS)}")
    return ENERGY_PRESETS[preset]


def energy_pj(macs: float, acs: float, preset: str = "fp32") -> float:
    """Energy in picojoules of ``macs`` multiply-accumulates and ``acs`` accumulates."""
    e_mac, e_ac = preset_costs(preset)
    return float(macs) * e_mac + float(acs) * e_ac


def energy_uj(macs: float, acs: float, preset: str = "fp32") -> float:
    """Energy in microjoules of ``macs`` multiply-accumulates and ``acs`` accumulates."""
    return energy_pj(macs, acs, preset) / PJ_PER_UJ


def layer_energy_uj(per_layer: dict[str, dict], preset: str = "fp32") -> dict[str, dict[str, float]]:
    """Per-layer energy split ``{layer: {"mac": uJ, "ac": uJ}}`` from ``{layer: {"mac", "ac", ...}}``."""
    e_mac, e_ac = preset_costs(preset)
    return {name: {"mac": ops.get("mac", 0.0) * e_mac / PJ_PER_UJ, "ac": ops.get("ac", 0.0) * e_ac / PJ_PER_UJ}
            for name, ops in per_layer.items()}


def dense_ann_energy(ann_synops: dict, preset: str = "fp32") -> dict:
    """Energy of an ANN run densely: every Dense MAC x E_MAC, no ACs.

    Args:
        ann_synops: per-image counts of the ANN, ``{"dense": float, "per_layer": {layer: {"dense": float}}}``
            (the output of :func:`~snncompress.metrics.count_synops` on the ANN).
        preset: energy preset name.

    Returns:
        ``{"energy_uj": µJ per image, "energy_per_layer_uj": {layer: µJ per image},
        "synops": {"mac": Dense MACs, "dense": Dense MACs}}``.
    """
    dense = float(ann_synops["dense"])
    return {"energy_uj": energy_uj(dense, 0.0, preset),
            "energy_per_layer_uj": {name: energy_uj(ops["dense"], 0.0, preset)
                                    for name, ops in ann_synops["per_layer"].items()},
            "synops": {"mac": dense, "dense": dense}}
