"""snncompress: train spiking neural networks and compress them for neuromorphic hardware.

Public entry points::

    snncompress.LIF            the DIET-SNN neuron (trainable leak and threshold)
    snncompress.lif_step       one timestep of the LIF equations (typed state LIFState)
    snncompress.build_model    a named network (SNN, with its ANN twin)
    snncompress.load           the model stored in a checkpoint or an exported NIR file

Importing the package registers the fast LIF backends of :mod:`snncompress.kernels`
in :data:`snncompress.neuron.LIF_BACKENDS`; if that module fails to import, LIF
layers run the reference backend and a ``RuntimeWarning`` says why.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .loading import load
from .errors import UserError
from .models import MODEL_NAMES, build_from_spec, build_model
from .neuron import LIF, LIFState, lif_multistep, lif_step

try:
    from . import kernels  # noqa: F401
except Exception as _exc:  # noqa: BLE001
    import warnings

    warnings.warn(f"snncompress.kernels unavailable, LIF uses the reference backend: {_exc!r}",
                  RuntimeWarning, stacklevel=2)

try:  # the installed distribution's version (pyproject.toml is its one source)
    from importlib.metadata import version as _version

    __version__ = _version("snncompress")
except Exception:  # noqa: BLE001 - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["LIF", "LIFState", "lif_step", "lif_multistep", "build_model", "build_from_spec", "load",
           "load_checkpoint", "save_checkpoint", "MODEL_NAMES", "UserError", "__version__"]
