"""What a quantized weight is: grids, bit packing, tensor subclasses, kernels."""
from .affine import AffineQuantizedTensor
from .base import FORMATS, QuantizedTensor
from .grid import SUPPORTED_BITS, AffineGrid

__all__ = ["FORMATS", "SUPPORTED_BITS", "AffineGrid", "AffineQuantizedTensor", "QuantizedTensor"]
