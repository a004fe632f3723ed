"""llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python, as
`llama-quantize` runs it without an importance matrix: the bindings do not carry llama.cpp's
`llama-imatrix` tool) on an F32 GGUF of the same weights; embedding and head kept F32 as for
every row. The file's linear weights are dequantized with the `gguf` package's reference
decoders; bits per weight are the file's bytes for those tensors."""
from __future__ import annotations

import numpy as np
import torch
from runners._common import stopwatch, target_linears

from discq.export.gguf_tensors import gguf_names
from discq.llamacpp import quantize as llama_quantize

def _unpermute(W: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows per head for its rotary layout; undo it."""
    n = W.shape[0]
    return W.reshape(heads, n // heads // 2, 2, -1).swapaxes(1, 2).reshape(W.shape)


def quantize(inputs, spec: dict) -> dict:
    from gguf import GGUFReader
    from gguf.quants import dequantize
    out = inputs.work / f"llama-{spec['type']}.gguf"
    with stopwatch() as t:
        llama_quantize(inputs.work / "f32.gguf", out, spec["type"], overwrite=True,
                       token_embedding_type="F32", output_tensor_type="F32")
    cfg = inputs.model.config
    targets = target_linears(inputs.model)
    ours = {f"{n}.weight" for n in targets}  # the GGUF names of the linears every row rounds
    by_gguf = {g: (n, rope) for n, (g, rope) in gguf_names(inputs.model).items() if n in ours}
    tensors, bits, numel, types = {}, 0, 0, {}
    for tensor in GGUFReader(out).tensors:
        if tensor.name not in by_gguf:
            continue
        name, rope = by_gguf[tensor.name]
        W = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if rope:
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            W = _unpermute(W, heads)
        tensors[name] = torch.from_numpy(W.copy())
        bits += int(tensor.n_bytes) * 8
        numel += int(tensor.n_elements)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    if len(tensors) != len(targets):
        raise RuntimeError(f"found {len(tensors)} of the {len(targets)} linears in {out.name}")
    out.unlink()
    return {"tensors": tensors, "bits": bits, "numel": numel, "seconds": t["seconds"],
            "config": {"llama_model_quantize": {"ftype": f"LLAMA_FTYPE_MOSTLY_{spec['type']}",
                                                "allow_requantize": True, "imatrix": None,
                                                "token_embedding_type": "F32",
                                                "output_tensor_type": "F32"},
                       "tensor_types": types}}
