"""torchao's weight-only integer quantization on CPU: `IntxWeightOnlyConfig` (int1-int8 in
groups, the config torchao's README gives for CPU weight-only), asymmetric, with its affine
(min/max, i.e. RTN) or HQQ scale-only parameter choice."""
from __future__ import annotations

import torch
from runners._common import stopwatch, target_linears


def quantize(inputs, spec: dict) -> dict:
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm)
    bits, g = spec["bits"], spec["group_size"]
    algorithm = IntxChooseQParamsAlgorithm(spec["algorithm"])
    # HQQ scale-only fits a scale per group around a fixed zero: torchao pairs it with the
    # symmetric mapping; affine (RTN) is asymmetric, min/max per group
    mapping = MappingType.SYMMETRIC if spec["algorithm"] == "hqq_scale_only" \
        else MappingType.ASYMMETRIC
    cfg = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                               granularity=PerGroup(g), mapping_type=mapping,
                               scale_dtype=torch.float16, intx_choose_qparams_algorithm=algorithm)
    targets = target_linears(inputs.model)
    chosen = set(targets.values())
    with stopwatch() as t:
        quantize_(inputs.model, cfg, filter_fn=lambda m, fqn: m in chosen)
    tensors, bits_total, numel = {}, 0, 0
    for name, m in targets.items():
        w = m.weight
        groups = w.numel() // g
        zero_bits = 8 if mapping == MappingType.ASYMMETRIC else 0  # stored as int8
        bits_total += w.numel() * bits + groups * (16 + zero_bits)
        numel += w.numel()
        tensors[f"{name}.weight"] = w.dequantize().float()
    return {"tensors": tensors, "bits": bits_total, "numel": numel, "seconds": t["seconds"],
            "config": {"torchao.IntxWeightOnlyConfig": {
                "weight_dtype": f"torch.int{bits}", "granularity": f"PerGroup({g})",
                "mapping_type": mapping.name, "scale_dtype": "torch.float16",
                "intx_choose_qparams_algorithm": algorithm.value}}}
