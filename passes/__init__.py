"""How a model is transformed: configs, `quantize_`, rounding algorithms, graph passes."""
from .config import QuantConfig, GridConfig, CONFIGS
from .quantize import quantize_, is_linear
from .inspect import bits_per_weight, quantized_weights
from .rtn import RTNConfig, rtn_config
from .gptq import GPTQConfig, gptq_config
from .disc import DiscConfig, disc_config
from .export import QuantizeLinearsPass, quantize_exported

__all__ = ["QuantConfig", "GridConfig", "CONFIGS", "quantize_", "is_linear", "bits_per_weight",
           "quantized_weights", "RTNConfig", "rtn_config", "GPTQConfig", "gptq_config",
           "DiscConfig", "disc_config", "quantize_exported", "QuantizeLinearsPass"]
