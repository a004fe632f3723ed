"""What a quantized weight is: grids, bit packing, tensor subclasses, kernels.

Every module of this package is imported here, so each format registers itself (its
`register_format` decorator runs) without a line of its own in any `__init__`: adding a format is
adding a module. Kernel modules that need optional packages (Triton) live in `kernels/` and are
imported where they are used.
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    if not _m.ispkg:
        _importlib.import_module(f"{__name__}.{_m.name}")

from .affine import AffineQuantizedTensor  # noqa: E402
from .base import FORMATS, QuantizedTensor, register_format  # noqa: E402
from .grid import SUPPORTED_BITS, AffineGrid  # noqa: E402

__all__ = ["FORMATS", "SUPPORTED_BITS", "AffineGrid", "AffineQuantizedTensor", "QuantizedTensor",
           "register_format"]
