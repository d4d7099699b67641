"""The library of compression parts; it knows nothing of stages, recipes or files.

=================  ==================================================================
module             what
=================  ==================================================================
``masks``          pruning masks as buffers beside the weight (parametrizations),
                   enforced in the forward pass and on gradients
``quantizers``     quantizers attached to weights / threshold / leak (uniform,
                   fixed-point Q(i.f), rounding modes, straight-through gradient);
                   ``export()`` gives integer codes + scale
``state``          what a compressed model stores (one enumeration for the
                   footprint and the checkpoint)
``footprint``      the bits a compressed model stores (the checkpoint's storage model)
``structure``      channel surgery into a physically narrower model (the groups come from the
                   model's family)
``importance``     one interface: scores per channel group (magnitude, BatchNorm gamma,
                   criticality, PCA significance)
``pca``            PCA of membrane potentials: significant dimensions (STP)
``criticality``    closeness of membrane potentials to threshold (CRIT)
``pruning``        global magnitude pruning, regeneration, IMP (CRIT)
``slimming``       L1 on BatchNorm gamma and channel selection (structured CRIT)
``sparse_momentum`` fixed-density sparse learning (AGC); ``attention``: attention transfer (AGC)
``exploration``    tinySNN's design-space search and the one Pareto front
``temporal``       timestep reduction schedule (STP)
=================  ==================================================================
"""

from .masks import enforce_masks_, get_mask, get_masks, remove_mask, remove_masks, set_mask, set_masks
from .quantizers import (FixedPointQuantizer, Quantizer, UniformQuantizer, attach_quantizer, get_quantizer,
                         get_quantizers, quantize_weights, remove_quantizer)

__all__ = ["set_mask", "set_masks", "get_mask", "get_masks", "remove_mask", "remove_masks", "enforce_masks_",
           "Quantizer", "UniformQuantizer", "FixedPointQuantizer", "attach_quantizer", "get_quantizer",
           "get_quantizers", "remove_quantizer", "quantize_weights"]
