"""llama.cpp's own quantizer (`llama_model_quantize` through llama-cpp-python, as
`llama-quantize` runs it without an importance matrix: the bindings do not carry llama.cpp's
`llama-imatrix` tool) on an F32 GGUF of the same weights; embedding and head kept F32 as for
every row. The file's linear weights are dequantized with the `gguf` package's reference
decoders; bits per weight are the file's bytes for those tensors."""
from __future__ import annotations

import numpy as np
import torch
from runners._common import stopwatch, target_linears

from discq.llamacpp import quantize as llama_quantize

# GGUF tensor names of a Llama block -> transformers' (q/k rows are permuted by the converter)
_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


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
    tensors, bits, numel, types = {}, 0, 0, {}
    for tensor in GGUFReader(out).tensors:
        parts = tensor.name.split(".")  # blk.<i>.<name>.weight
        if parts[0] != "blk" or parts[2] not in _NAMES:
            continue
        name = f"model.layers.{parts[1]}.{_NAMES[parts[2]]}"
        W = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
        if parts[2] in heads:
            W = _unpermute(W, heads[parts[2]])
        tensors[f"{name}.weight"] = torch.from_numpy(W.copy())
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
