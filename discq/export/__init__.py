"""Files for the engines people deploy, one module each:

  gguf.py        `to_gguf`: a GGUF file llama.cpp runs, for every family in `gguf_archs.ARCHS`
                 (the table of llama.cpp architectures: one entry per transformers family),
                 with its tensors (`gguf_tensors.py`, blocks from `gguf_blocks.py`) and key-values
                 (`gguf_metadata.py`)
  compressed.py  `to_compressed_tensors`: a `pack-quantized` directory vLLM and transformers load
"""
from .compressed import to_compressed_tensors
from .gguf import to_gguf

__all__ = ["to_compressed_tensors", "to_gguf"]
