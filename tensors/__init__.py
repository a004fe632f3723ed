"""What a quantized weight is: grids, bit packing, tensor subclasses, kernels."""
from .grid import AffineGrid, SUPPORTED_BITS
from .base import QuantizedTensor, FORMATS
from .affine import AffineQuantizedTensor

__all__ = ["AffineGrid", "SUPPORTED_BITS", "QuantizedTensor", "FORMATS", "AffineQuantizedTensor"]
