"""Export a spiking VGG / convnet to NIR (the Neuromorphic Intermediate Representation) and import it back;
graphs from other frameworks (snnTorch, Norse, Sinabs, Rockpool) become graph networks (:mod:`.graph`).

NIR (``pip install nir``) is the exchange format that snnTorch, SpikingJelly,
Norse, sinabs, Lava and several chips read: a graph of nodes (``Conv2d``,
``Linear``, ``AvgPool2d``, ``Flatten``, ``LIF``, ``IF`` ...) stored as HDF5.
This module writes one node per layer of the model, named after the module
(``features.0``, ``features.1``, ``flatten``, ``classifier.0`` ...), plus
``input`` and ``output``, connected in a chain.

How this package's discrete neuron maps onto NIR's continuous one
-----------------------------------------------------------------

NIR's LIF is the ODE ``tau dv/dt = (v_leak - v) + r I`` with ``z = [v > v_threshold]``
and ``v <- v_reset`` on a spike; NIR's IF is ``dv/dt = r I``. A simulator
discretises it with its own step ``dt``. Forward Euler gives::

    v[t] = (1 - dt/tau) v[t-1] + (dt/tau) r I[t]            (v_leak = 0)

and this package's LIF (:mod:`snncompress.neuron`) is ``u[t] = leak u_hat[t-1] + I[t]``.
The two agree step by step **under the convention that the consumer uses the
``dt`` recorded in the graph** (metadata ``dt``, default 1e-4, the step
snnTorch's importer hard-codes) when

    tau = dt / (1 - leak),   r = tau / dt = 1 / (1 - leak),   v_leak = 0,   v_threshold = thr

so ``1 - dt/tau = leak`` and the input gain ``(dt/tau) r = 1``. A neuron with
``leak == 1`` has no finite ``tau``. With ``leak_one="if"`` (default) a layer whose
leaks are all 1 becomes an ``IF`` node with ``r = 1/dt`` (``v += dt r I = I``:
exact), and a layer whose per-channel leaks mix 1 and values below 1 is refused.
With ``leak_one="lif"`` such neurons are ``LIF`` nodes with ``tau = 1e8 dt`` and
``r = 1e8``: ``1 - dt/tau = 1 - 1e-8``, which is exactly 1.0 in float32 arithmetic
(a float64 consumer leaks 1e-8 per step); this form exists because snnTorch 1.0's
importer cannot run ``IF`` nodes (it asserts ``r == 1`` and substitutes a leak of
0.9), and it also exports mixed layers. Scalar and per-channel leaks and
thresholds are written as per-neuron arrays of the layer's shape (NIR's
parameters are per neuron); the exact float32 leak is kept in the node's
metadata (``leak``), since ``1 - dt/tau`` recomputed in float32 can be one ulp
off.

What NIR cannot say, and what the export does about it
------------------------------------------------------

* **Soft reset** (``u_hat = u - thr``): NIR's LIF/IF reset to ``v_reset``. With
  ``soft_reset="annotate"`` (default) the node is written with ``v_reset = 0`` and
  metadata ``reset = "subtract"``; :func:`import_nir` honours it, a consumer that
  ignores metadata runs a hard reset (more spikes are lost). ``soft_reset="refuse"``
  refuses instead. Hard reset is exact (``v_reset = 0``, metadata ``reset = "zero"``).
* **Spike condition**: this package fires at ``u >= thr`` (``u / thr - 1 >= 0``), NIR
  at ``v > v_threshold``: they differ only when the potential lands exactly on the
  threshold (recorded in metadata ``spike_condition``).
* **Direct input, conv1 once**: the graph's input is the normalised image, fed
  unchanged at every one of the ``T`` steps (metadata ``input``); conv1 is
  stateless, so computing it at every step gives what this package computes once.
  Poisson models expect their already-encoded spike train (``encoding``).
* **Readout**: the last linear layer has no neuron; the logits are the sum of the
  ``output`` node over the ``T`` steps (metadata ``readout``, ``timesteps``).
* **Trainable parameters, surrogate gradients**: NIR holds values, not what is
  trainable; the architecture (``model.spec``, with ``learn_leak``,
  ``learn_threshold``, the surrogate) travels as JSON in the graph metadata
  ``snncompress_spec``, so :func:`import_nir` rebuilds the same trainable model.
* **Pruning**: a physically narrowed model is written in its narrow shapes; masked
  weights are zeros in the node's ``weight`` and the mask is kept as metadata
  ``weight.mask`` (uint8).
* **Quantization**: weights (and quantized leaks / thresholds) are written
  dequantized (``codes * scale``, exactly what the model computes with); the integer
  codes, the scale, the bit width and the quantizer's configuration are metadata
  (``weight.codes``, ``weight.scale``, ``weight.bits``, ``weight.quantizer``).
* **BatchNorm** (eval mode) becomes a 1x1 ``Conv2d`` with a diagonal weight
  ``gamma / sqrt(var + eps)`` and bias ``beta - mean * weight``: the same affine map
  (not a grouped convolution, which nir 1.0's type check mis-sizes); the exact
  running statistics are metadata (``batchnorm.*``) for the round trip.
* **Refused**: ResNets (not yet exported), ANN-mode models, a membrane-state
  quantizer (NIR has no quantized state), mixed IF/LIF leaks in one layer under
  ``leak_one="if"``.

:func:`import_nir` reads only files this module wrote (the spec metadata gives
the architecture); every value it loads comes from the NIR fields (weights,
``v_threshold``, ``tau``/``r``), checked against the metadata, and the model it
returns computes the same logits as the exported one, bit for bit. Files are
read with h5py (HDF5), never unpickled.

Modules: :mod:`.mapping` (constants and the layer walk both directions share), :mod:`.export`,
:mod:`.load` (import), :mod:`.graph` (graphs from other frameworks as graph networks, and back),
:mod:`.harness` (spike counts against snnTorch's importer) and :mod:`.command` (``snncompress export``,
``snncompress import``); this package re-exports their public names.
"""

from __future__ import annotations

from .command import export_command, import_command
from .graph import INTEGRATIONS, RESETS, SUPPORTED_NODES, export_graph, import_graph
from .export import export_nir, export_notes, write_nir
from .harness import layer_spike_counts, snntorch_spike_counts
from .load import import_nir, is_nir_file, load_nir, read_nir
from .mapping import (DEFAULT_DT, HDF5_MAGIC, LEAK_ONE_MODES, LEAK_ONE_TAU_STEPS, LEAK_TOLERANCE, NIR_FORMAT,
                      SOFT_RESET_MODES, Layer, layers, require_nir)

__all__ = [
    "DEFAULT_DT", "HDF5_MAGIC", "LEAK_ONE_MODES", "LEAK_ONE_TAU_STEPS", "LEAK_TOLERANCE", "NIR_FORMAT",
    "SOFT_RESET_MODES", "Layer", "export_command", "import_command", "INTEGRATIONS", "RESETS", "SUPPORTED_NODES",
    "export_graph", "import_graph", "export_nir", "export_notes", "import_nir", "is_nir_file",
    "layer_spike_counts", "layers", "load_nir", "read_nir", "require_nir", "snntorch_spike_counts", "write_nir",
]
