"""H = 2/N Σ x xᵀ over the calibration tokens seen by a linear layer (running mean in fp32)."""
from __future__ import annotations

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook that has captured what it needs, to skip the rest of a forward pass."""


class HessianAccumulator:
    """Forward pre-hook collecting the input second moment of one nn.Linear. With
    stop_after=True it then raises StopForward: the layer's output is not needed."""

    def __init__(self, module: nn.Linear, name: str = "", stop_after: bool = False):
        K = module.in_features
        self.H = torch.zeros(K, K, dtype=torch.float32, device=module.weight.device)
        self.n = 0
        self.name = name
        self.stop_after = stop_after
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [T, K]
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration activations entering layer {self.name!r} contain "
                             f"NaN/Inf; check the model in fp32 and the calibration data")
        m = x.shape[0]
        if m == 0:  # an expert no token was routed to in this batch
            if self.stop_after:
                raise StopForward
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)
        if self.stop_after:
            raise StopForward

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.H
