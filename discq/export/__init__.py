"""Files for the engines people deploy, one module each:

  gguf.py        `to_gguf`: a GGUF file llama.cpp runs, for every family in `gguf_archs.ARCHS`
                 (the table of llama.cpp architectures: one entry per transformers family),
                 with its tensors (`gguf_tensors.py`, blocks from `gguf_blocks.py`) and key-values
                 (`gguf_metadata.py`)
  compressed.py  `to_compressed_tensors`: a `pack-quantized` directory vLLM and transformers load
  imatrix.py     `to_imatrix`: llama.cpp's importance matrix from calibration tokens, for its own
                 quantizer
"""
from .compressed import to_compressed_tensors
from .gguf import to_gguf
from .imatrix import to_imatrix

__all__ = ["to_compressed_tensors", "to_gguf", "to_imatrix"]
