"""discq's methods, by their registered names (rtn, gptq, gptvq, disc, quip-sharp, qtip)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from runners._common import calibration_list, stopwatch, target_linears

import discq
from discq.methods import METHODS, build_config


def _calibration(inputs, spec: dict):
    if not METHODS[spec["method"]].data_driven:
        return None
    seq = spec.get("seq_len")
    ids = inputs.calib
    if seq:  # DiscQuant's short sequences: the same tokens cut into pieces
        ids = ids[:, : ids.shape[1] // seq * seq].reshape(-1, seq)
    return calibration_list(ids, spec.get("batch_size", 8))


def _effective(m) -> torch.Tensor:
    """The weight the layer computes with, dequantized; checked against the layer's own forward
    (a rotated or otherwise transformed format must dequantize into the original basis)."""
    W = m.weight.dequantize().float()  # [N, K]
    x = torch.randn(4, W.shape[1], generator=torch.Generator().manual_seed(0))  # [4, K]
    y = F.linear(x, m.weight)  # [4, N]
    err = ((y - x @ W.T).norm() / y.norm()).item()
    if not err < 1e-3:
        raise RuntimeError(f"dequantize() disagrees with the layer's forward ({err:.2e})")
    return W


def _config(inputs, spec: dict):
    settings = {k: v for k, v in spec.items() if k not in ("method", "bits", "group_size",
                                                            "seq_len")}
    return build_config(spec["method"], bits=spec["bits"], group_size=spec["group_size"],
                        calibration=_calibration(inputs, spec), **settings)


def _run(inputs, spec: dict, only):
    """Quantize with one config, or with `spec["budget"]` bits per weight among
    `spec["candidates"]` (mixed widths); returns the config as the table records it."""
    if "budget" not in spec:
        cfg = _config(inputs, spec)
        discq.quantize_(inputs.model, cfg, filter_fn=only)
        return {k: v for k, v in cfg.to_dict().items() if k != "calibration"}
    configs = [_config(inputs, c) for c in spec["candidates"]]
    calib = calibration_list(inputs.calib, 8)
    discq.quantize_(inputs.model, budget=discq.bits(spec["budget"], calibration=calib),
                    candidates=configs, filter_fn=only)
    plan = discq.plan_of(inputs.model)
    return {"budget": spec["budget"], "candidates": [c.to_dict() for c in configs],
            "plan": {lab: list(plan.layers.values()).count(lab) for lab in plan.candidates},
            "predicted_kl": plan.predicted_kl}


def quantize(inputs, spec: dict) -> dict:
    targets = target_linears(inputs.model)
    chosen = set(targets.values())
    with stopwatch() as t:
        config = _run(inputs, spec, lambda m, fqn: m in chosen)
    bits = numel = 0
    tensors = {}
    for name, m in targets.items():
        w = m.weight
        bits, numel = bits + w.storage_bits(), numel + w.numel()
        tensors[f"{name}.weight"] = _effective(m)
    return {"tensors": tensors, "bits": bits, "numel": numel, "seconds": t["seconds"],
            "config": {"discq": config}}
