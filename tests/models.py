"""Small randomly initialized models for tests (real-model tests use the trained fixture)."""
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM


def tiny_random_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def tiny_quantized_llama(seed: int) -> LlamaForCausalLM:
    """tiny_random_llama with its MLP on the symmetric 4-bit grid and the attention on the
    asymmetric 3-bit grid (groups of 32): both zero-point paths of the affine kernels."""
    import discq
    model = tiny_random_llama(seed=seed)
    discq.quantize_(model, {"re:.*mlp.*": discq.rtn_config(4, 32, symmetric=True),
                            "_default": discq.rtn_config(3, 32)})
    return model


def tiny_random_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64,
                     architectures=["BertModel"])
    return BertModel(cfg).eval()
