"""AutoRound (`auto-round`, Cheng et al. 2023): sign-gradient descent on each weight's rounding
and the group scales, block by block, against the block's fp32 outputs. Its preset schemes
(W2A16G64, W3A16, W4A16: symmetric int, fp16/bf16 scales) with the documented
"auto-round-light" recipe (50 iterations instead of the default 200: 200 would take ~30 minutes
a width on 2 cores), on the same calibration tokens as every row (`nsamples` x 512, batch 8).
After `quantize()` the model's weights are AutoRound's quantize-dequantize values."""
from __future__ import annotations

import torch
from runners._common import stopwatch, target_linears


def _scheme(bits: int, g: int) -> str:
    return f"W{bits}A16" + ("" if g == 128 else f"G{g}")


def _check_grid(W: torch.Tensor, bits: int, g: int) -> None:
    """Each full group holds at most 2^bits distinct values (else the weights are not the
    quantized ones)."""
    K = W.shape[1] // g * g
    groups = W[:, :K].reshape(-1, g)[:64]
    worst = max(len(torch.unique(row)) for row in groups)
    if worst > 2 ** bits:
        raise RuntimeError(f"a group has {worst} distinct values after AutoRound ({bits} bits)")


def quantize(inputs, spec: dict) -> dict:
    from auto_round import AutoRound
    from transformers import AutoTokenizer
    bits, g, iters = spec["bits"], spec["group_size"], spec.get("iters", 50)
    calib = inputs.calib
    data = [{"input_ids": calib[i:i + 1], "attention_mask": torch.ones_like(calib[i:i + 1])}
            for i in range(calib.shape[0])]
    settings = {"scheme": _scheme(bits, g), "iters": iters, "nsamples": calib.shape[0],
                "seqlen": calib.shape[1], "batch_size": min(8, calib.shape[0]),
                "device_map": "cpu"}
    with stopwatch() as t:
        ar = AutoRound(inputs.model, tokenizer=AutoTokenizer.from_pretrained(inputs.model_dir),
                       dataset=data, **settings)
        ar.quantize()
    tensors, bits_total, numel = {}, 0, 0
    for name, m in target_linears(inputs.model).items():
        W = m.weight.detach().float()
        _check_grid(W, bits, g)
        groups = m.scale.numel()  # one 16-bit scale per group, symmetric: no zero point
        bits_total += W.numel() * bits + groups * 16
        numel += W.numel()
        tensors[f"{name}.weight"] = W
    return {"tensors": tensors, "bits": bits_total, "numel": numel, "seconds": t["seconds"],
            "config": {"auto_round.AutoRound": {**settings, "recipe": "auto-round-light"
                                                if iters == 50 else f"{iters} iterations"}}}
