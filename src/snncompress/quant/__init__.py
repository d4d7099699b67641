"""Weight quantization: :func:`quantize_symmetric` (uniform, symmetric, per tensor) and helpers."""

from .uniform import dequantize, max_int, quantizable_weights, quantize_symmetric, quantize_weights_

__all__ = ["dequantize", "max_int", "quantizable_weights", "quantize_symmetric", "quantize_weights_"]
