"""snncompress: train spiking neural networks and compress them for neuromorphic hardware.

Public entry points::

    snncompress.LIF            the DIET-SNN neuron (trainable leak and threshold)
    snncompress.build_model    a named network (SNN, with its ANN twin)
    snncompress.load           the model stored in a checkpoint
"""

from .checkpoint import load, load_checkpoint, save_checkpoint
from .errors import UserError
from .models import MODEL_NAMES, build_from_spec, build_model
from .neuron import LIF, lif_multistep

__version__ = "0.1.0"

__all__ = ["LIF", "lif_multistep", "build_model", "build_from_spec", "load", "load_checkpoint",
           "save_checkpoint", "MODEL_NAMES", "UserError", "__version__"]
