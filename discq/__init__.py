"""discq: 2–4 bit weight quantization for PyTorch models.

    from discq import quantize_, rtn_config
    quantize_(model, rtn_config(bits=3, group_size=64))
"""
import importlib.metadata

from discq import export  # noqa: F401  (discq.export.to_gguf)
from discq.decode import generate
from discq.io import load_quantized, save_quantized
from discq.passes import (
    METHODS,
    Bits,
    bits,
    plan_of,
    DiscConfig,
    GPTQConfig,
    GPTVQConfig,
    QtipConfig,
    QuantConfig,
    QuipSharpConfig,
    RTNConfig,
    bits_per_weight,
    disc_config,
    gptq_config,
    gptvq_config,
    quantize_,
    qtip_config,
    quantized_weights,
    quip_sharp_config,
    rotate_,
    rtn_config,
)
from discq.tensors import AffineGrid, AffineQuantizedTensor, QuantizedTensor
from discq.tensors.gptvq import VectorQuantizedTensor
from discq.tensors.lattice import LatticeQuantizedTensor
from discq.tensors.qtip import TrellisQuantizedTensor
from discq.pipeline import quantize_head_  # noqa: E402  (needs discq.passes first)

__version__ = "0.1.0"

# registers quant_method "discq" with transformers (save_pretrained / from_pretrained); it builds
# on the quantizer load operations of transformers 5; with an older one, save_quantized only
if int(importlib.metadata.version("transformers").split(".")[0]) >= 5:
    from discq import hf  # noqa: F401
    from discq.stream import quantize_pretrained  # writes the transformers layout
else:
    hf = None

__all__ = [
    "METHODS",
    "Bits",
    "bits",
    "plan_of",
    "AffineGrid",
    "AffineQuantizedTensor",
    "DiscConfig",
    "GPTQConfig",
    "GPTVQConfig",
    "gptvq_config",
    "VectorQuantizedTensor",
    "QuantConfig",
    "QuantizedTensor",
    "LatticeQuantizedTensor",
    "QuipSharpConfig",
    "quip_sharp_config",
    "QtipConfig",
    "qtip_config",
    "TrellisQuantizedTensor",
    "RTNConfig",
    "bits_per_weight",
    "disc_config",
    "generate",
    "gptq_config",
    "quantize_head_",
    "quantize_pretrained",
    "load_quantized",
    "quantize_",
    "quantized_weights",
    "rotate_",
    "rtn_config",
    "save_quantized",
]
