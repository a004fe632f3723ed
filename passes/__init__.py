"""How a model is transformed: configs, `quantize_`, rounding algorithms, graph passes."""
from .config import CONFIGS, GridConfig, QuantConfig
from .disc import DiscConfig, disc_config
from .export import QuantizeLinearsPass, quantize_exported
from .gptq import GPTQConfig, gptq_config
from .inspect import bits_per_weight, quantized_weights
from .quantize import is_linear, quantize_
from .rtn import RTNConfig, rtn_config

__all__ = [
           "CONFIGS",
           "DiscConfig",
           "GPTQConfig",
           "GridConfig",
           "QuantConfig",
           "QuantizeLinearsPass",
           "RTNConfig",
           "bits_per_weight",
           "disc_config",
           "gptq_config",
           "is_linear",
           "quantize_",
           "quantize_exported",
           "quantized_weights",
           "rtn_config",
]

# QuIP# (issue 6)
from .quip_sharp import QuipSharpConfig, quip_sharp_config

__all__ += ["QuipSharpConfig", "quip_sharp_config"]
