"""Measuring every model (docs/measuring.md): spikes, synaptic operations, energy, footprint, latency, robustness.

Entry point: :func:`measure_model` returns the report contract's metrics dict. The
parts are usable alone:

* :mod:`.ops`: :class:`SpikeMeter`, :class:`SynOpsMeter`, :func:`count_synops`
* :mod:`.energy`: :data:`ENERGY_PRESETS`, :func:`energy_uj`
* :mod:`.footprint`: :func:`footprint`, :func:`count_params`
* :mod:`.latency`: :func:`measure_latency`
* :mod:`.robustness`: :func:`noise_robustness`
"""

from .energy import ENERGY_PRESETS, energy_pj, energy_uj, layer_energy_uj
from ..compress.footprint import SPARSE_FORMATS, count_params, footprint, sparse_format_bits
from .latency import measure_latency
from .measure import measure_model
from .ops import POOLED_SPIKE_CONVENTIONS, SpikeMeter, SynOpsMeter, count_synops
from .robustness import DEFAULT_SIGMAS, noise_robustness, sigma_key

__all__ = ["ENERGY_PRESETS", "energy_pj", "energy_uj", "layer_energy_uj", "SPARSE_FORMATS", "count_params",
           "footprint", "sparse_format_bits", "measure_latency", "measure_model", "POOLED_SPIKE_CONVENTIONS",
           "SpikeMeter", "SynOpsMeter", "count_synops", "DEFAULT_SIGMAS", "noise_robustness", "sigma_key"]
