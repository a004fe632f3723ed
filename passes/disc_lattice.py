"""DiscQuant on the E8P lattice (`disc_config(codebook="e8p")`): the same relaxation as on the
affine grid, with "down/up" the two candidate lattice points of each block of 8 weights.

In the rotated, scaled basis (as QuIP#: ỹ = R_out W R_inᵀ / scale, blocks of 8 along a row),
  down = the nearest codebook point to ỹ (what nearest-point rounding picks),
  up   = the nearest codebook point to 2ỹ − down (down reflected through ỹ: the best point on
         the far side of ỹ, the lattice analogue of the other grid neighbour).
One variable x ∈ [0, 1] per block: Ŵ̃ = down + x·(up − down). The pull term uses the position
of ỹ projected on the segment, t = ⟨ỹ − down, up − down⟩ / ‖up − down‖², exactly as y on the
affine grid, so with zero KL weight every x goes to the nearer end: nearest-point rounding.
Memory per block of 8 weights: x, its gradient and AdamW's moments (16 bytes), the two
candidate codes (int32 per stage) and the fp16 pull: about 3 bytes a weight at 2 bits.
"""
from __future__ import annotations

import torch
from discq.tensors import e8p_residual
from discq.tensors.hadamard import layer_rotation, layer_seed, rotate_weight
from discq.tensors.lattice import WEIGHT_RMS, LatticeQuantizedTensor, check_shape

from .disc import DiscConfig, Relaxation, register_codebook
from torch import Tensor, nn


class RelaxedLatticeLinear(Relaxation):
    """Stands in for an nn.Linear during DiscQuant on the lattice (forward and pull term from
    `Relaxation`, like RelaxedLinear). The rotation is the one
    `LatticeQuantizedTensor.from_hp(W, bits, seed)` uses, so zero KL weight reproduces it."""

    def __init__(self, linear: nn.Linear, bits: int, seed: int, init: str,
                 generator: torch.Generator):
        super().__init__()
        self.original, self.bits, self.teacher = linear, bits, False
        W = linear.weight.detach()
        N, K = W.shape
        check_shape(N, K)
        rot = layer_rotation(N, K, seed)
        for name, t in zip(("s_in", "s_out", "q_in", "q_out"), rot):
            self.register_buffer(name, t.to(W.device), persistent=False)
        Wt = rotate_weight(W.float(), self.s_out, self.s_in, self.q_out, self.q_in)
        self.scale = float(Wt.pow(2).mean().sqrt().clamp(min=1e-12) / WEIGHT_RMS[bits])
        x0 = self._fit_candidates((Wt / self.scale).reshape(N, K // 8, 8))
        if init == "uniform":
            x0 = torch.rand(x0.shape, generator=generator).to(x0.device)
        self.x = nn.Parameter(x0)  # [N, K/8] fp32

    @torch.no_grad()
    def _fit_candidates(self, y: Tensor) -> Tensor:
        """Sets the candidate codes, the pull 1 − 2t and the RTN noise from ỹ [N, B, 8];
        returns x at nearest-point rounding (all zeros: down is the nearest point)."""
        down, c_down = e8p_residual.quantize(y, self.bits)
        up, c_up = e8p_residual.quantize(2 * y - down, self.bits)
        d = up - down  # [N, B, 8]
        n2 = d.pow(2).sum(-1)
        t = ((y - down) * d).sum(-1) / n2.clamp(min=1e-12)
        self.register_buffer("codes_down", c_down.to(torch.int32), persistent=False)
        self.register_buffer("codes_up", c_up.to(torch.int32), persistent=False)
        self.register_buffer("pull", torch.where(n2 > 0, 1 - 2 * t, 0.0).half(),
                             persistent=False)
        # the affine grid's normalization: 12·E[(rounded − W)²], here in the original scale
        self.rtn_noise = 12 * float((down - y).pow(2).mean()) * self.scale ** 2
        return torch.zeros(y.shape[:2], device=y.device)

    def weight_hat(self) -> Tensor:
        """scale·Ŵ̃(x) in the rotated basis, [N, K], differentiable in x."""
        down = e8p_residual.decode(self.codes_down, self.bits)  # [N, B, 8]
        up = e8p_residual.decode(self.codes_up, self.bits)
        W = down + self.x_now().unsqueeze(-1) * (up - down)
        return (W.flatten(1) * self.scale).to(self.original.weight.dtype)

    @property
    def rotation(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.s_in, self.s_out, self.q_in, self.q_out

    @torch.no_grad()
    def rounded(self) -> LatticeQuantizedTensor:
        """The lattice weight of round(x): each block's down or up code."""
        pick = (self.x >= 0.5).unsqueeze(-1)  # [N, B, 1]
        codes = torch.where(pick, self.codes_up, self.codes_down).long()
        return LatticeQuantizedTensor.from_codes(codes, self.scale, self.s_in, self.s_out,
                                                 self.q_in, self.q_out, self.bits,
                                                 self.original.weight.dtype)


def _check_lattice(config: DiscConfig) -> None:
    if config.bits not in (2, 3, 4):
        raise ValueError(f"codebook='e8p' codes 2, 3 or 4 bits per weight, got "
                         f"bits={config.bits!r}")


def _relax_lattice(linear: nn.Linear, config: DiscConfig, fqn: str, generator
                   ) -> RelaxedLatticeLinear:
    """E8P in the layer's seeded rotated basis (the rotation QuIP# gives the same layer)."""
    return RelaxedLatticeLinear(linear, config.bits, layer_seed(fqn, config.seed), config.init,
                                generator)


register_codebook("e8p", _relax_lattice, _check_lattice)
