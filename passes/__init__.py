"""How a model is transformed: configs, `quantize_`, rounding algorithms, graph passes.

Every module of this package is imported here, so every method registers itself (its
`register_method`/`handles`/`constructs` decorators run): adding a method is adding a module.
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _m in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_m.name}")

from .budget import Bits, bits  # noqa: E402
from .config import GridConfig, QuantConfig  # noqa: E402
from .disc import DiscConfig, disc_config  # noqa: E402
from .export import QuantizeLinearsPass, quantize_exported  # noqa: E402
from .gptq import GPTQConfig, gptq_config  # noqa: E402
from .gptvq import GPTVQConfig, gptvq_config  # noqa: E402
from .inspect import bits_per_weight, quantized_weights  # noqa: E402
from .quantize import is_linear, plan_of, quantize_  # noqa: E402
from .qtip import QtipConfig, qtip_config  # noqa: E402
from .quip_sharp import QuipSharpConfig, quip_sharp_config  # noqa: E402
from .registry import METHODS, register_method  # noqa: E402
from .rotate import rotate_  # noqa: E402
from .rtn import RTNConfig, rtn_config  # noqa: E402

__all__ = [
    "METHODS",
    "Bits",
    "bits",
    "plan_of",
    "DiscConfig",
    "GPTQConfig",
    "GPTVQConfig",
    "GridConfig",
    "QuantConfig",
    "QtipConfig",
    "QuantizeLinearsPass",
    "QuipSharpConfig",
    "RTNConfig",
    "bits_per_weight",
    "disc_config",
    "gptq_config",
    "gptvq_config",
    "is_linear",
    "quantize_",
    "quantize_exported",
    "qtip_config",
    "quantized_weights",
    "quip_sharp_config",
    "register_method",
    "rotate_",
    "rtn_config",
]
