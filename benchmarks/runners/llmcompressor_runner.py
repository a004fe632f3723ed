"""llm-compressor's GPTQ (`llmcompressor.oneshot` with a `GPTQModifier`), on CPU, with the
arguments of compressed-tensors' documented W4A16_ASYM preset (int, asymmetric, groups of 128,
int8 zero points) and the modifier's defaults (static activation order, dampening 0.01, block
128); other widths change only `num_bits` and `group_size`. Asymmetric, not the symmetric W4A16
preset: at 3 bits the symmetric grid measured far worse here (perplexity 128 against 73 for
3-bit g64, 8x512 tokens), and each peer gets its best documented choice. Scales in fp16
(`scale_dtype`), as a compressed-tensors checkpoint stores them. The head is ignored (kept
fp32), as for every row."""
from __future__ import annotations

import torch
from runners._common import stopwatch, target_linears


def _dataset(calib: torch.Tensor):
    from datasets import Dataset
    return Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})


def _weights(m) -> torch.Tensor:
    """The weight as the quantized model computes with it: q(W) with the module's own scale."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    args = m.quantization_scheme.weights
    zero = getattr(m, "weight_zero_point", None)
    return fake_quantize(m.weight.data, m.weight_scale.data, zero, args).float()


def quantize(inputs, spec: dict) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    bits, g = spec["bits"], spec["group_size"]
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": g, "scale_dtype": torch.float16}
    targets = target_linears(inputs.model)
    head = [n for n, m in inputs.model.named_modules()
            if isinstance(m, torch.nn.Linear) and n not in targets]
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=head, block_size=128, dampening_frac=0.01, actorder="static")
    n = inputs.calib.shape[0]
    with stopwatch() as t:
        oneshot(model=inputs.model, dataset=_dataset(inputs.calib), recipe=recipe,
                num_calibration_samples=n, max_seq_length=inputs.calib.shape[1],
                shuffle_calibration_samples=False, batch_size=1)
    tensors, bits_total, numel = {}, 0, 0
    for name, m in targets.items():
        W = _weights(m)
        bits_total += W.numel() * bits + (W.numel() // g) * (16 + 8)  # fp16 scale, int8 zero
        numel += W.numel()
        tensors[f"{name}.weight"] = W
    return {"tensors": tensors, "bits": bits_total, "numel": numel, "seconds": t["seconds"],
            "config": {"llmcompressor.GPTQModifier": {
                "config_groups": {"group_0": {"targets": ["Linear"],
                                              "weights": {**weights, "scale_dtype": "float16"}}},
                "ignore": head, "block_size": 128, "dampening_frac": 0.01,
                "actorder": "static"},
                "oneshot": {"num_calibration_samples": n, "max_seq_length":
                            inputs.calib.shape[1], "shuffle_calibration_samples": False}}}
