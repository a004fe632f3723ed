"""DiscQuant onto llama.cpp's codebook i-quants (IQ2_XXS … IQ3_S, `gguf=` a type or mixture
that gives a layer one of them): each 8 weights choose between two codes.

The block scales are fitted once on W (`GGUFGrid.fit`). For every 8 weights y (in units of
their scale) the two candidates are the nearest codes — the signs llama.cpp's rounding gives
them and each codeword nearest — and the runner-up: the same signs with the one codeword that
loses least switched to its second nearest. One variable x ∈ [0, 1] per 8 weights:
ŷ = down + x·(up − down), the pull term from y's position projected on that segment, as for
GPTVQ's codebooks (`disc_vq.py`), so that with no KL weight every x goes to the nearer end:
round to nearest.
"""
from __future__ import annotations

import torch
from discq.tensors.gguf import GGUFGrid, GGUFQuantizedTensor
from torch import Tensor, nn

from .disc import Relaxation


class RelaxedCodebookLinear(Relaxation):
    """Stands in for an nn.Linear whose grid is a codebook i-quant during DiscQuant (forward
    and pull term from `Relaxation`). Buffers: the scale per weight's group [N, K / group],
    the two candidates' codes [N, K / 8] (int64) and values [N, K] (fp16: grid values times
    ±1, exact), the pull [N, K / 8]."""

    rotation = None

    def __init__(self, linear: nn.Linear, grid: GGUFGrid, init: str,
                 generator: torch.Generator):
        super().__init__()
        self.original, self.grid, self.teacher = linear, grid, False
        W = linear.weight.detach().float()  # [N, K]
        scale, _, headers = grid.fit(W)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("headers", headers, persistent=False)
        x0 = self._fit_candidates(W)
        if init == "uniform":
            x0 = torch.rand(x0.shape, generator=generator).to(x0.device)
        self.x = nn.Parameter(x0)  # [N, K / 8] fp32

    @torch.no_grad()
    def _fit_candidates(self, W: Tensor) -> Tensor:
        N, K = W.shape
        y = (W / self._per_weight()).reshape(-1, 8)  # [N·K/8, 8] in scale units
        down_code, down = self.grid.round_vectors(y)
        up_code, up = self.grid.round_vectors(y, runner_up=True)
        diff = up - down
        n2 = diff.pow(2).sum(-1)
        t = ((y - down) * diff).sum(-1) / n2.clamp(min=1e-12)
        for name, v in (("down_code", down_code), ("up_code", up_code)):
            self.register_buffer(name, v.view(N, -1), persistent=False)
        for name, v in (("down", down), ("up", up)):
            self.register_buffer(name, v.view(N, K).half(), persistent=False)
        self.register_buffer("pull", torch.where(n2 > 0, 1 - 2 * t, 0.0).view(N, -1).half(),
                             persistent=False)
        self.rtn_noise = 12 * float((down.view(N, K) * self._per_weight() - W).pow(2).mean())
        return torch.zeros(N, K // 8, device=W.device)

    def _per_weight(self) -> Tensor:
        return self.scale.float().repeat_interleave(self.grid.group_size, dim=1)  # [N, K]

    def weight_hat(self) -> Tensor:
        """Ŵ(x) [N, K], differentiable in x."""
        x = self.x_now().repeat_interleave(8, dim=1)  # [N, K]
        down = self.down.float()
        return ((down + x * (self.up.float() - down)) * self._per_weight()).to(
            self.original.weight.dtype)

    @torch.no_grad()
    def rounded(self) -> GGUFQuantizedTensor:
        codes = torch.where(self.x >= 0.5, self.up_code, self.down_code)
        return self.grid.pack(codes, self.headers, self.original.weight.dtype)
