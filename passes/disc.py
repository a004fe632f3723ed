"""DiscQuant (Chee et al., 2025): choose, for every weight, its lower or upper grid point by
distilling the original model's next-token distribution.

Each weight W gets a variable x ∈ [0, 1] between its grid neighbours: Ŵ = down + x·(up − down),
the grid fitted once on W. The loss is the forward KL from the original model to the relaxed one,
divided by δ̄² (the mean RTN rounding noise, 12·‖RTN(W) − W‖²/numel, averaged over layers). The
update direction is g = −(2y − 1) + clamp(ρ·∇ₓ(KL/δ̄²), −c, c), y the fractional position of W
between its neighbours: the first term pulls x to the vertex RTN would pick, so the KL term only
moves weights whose rounding matters. After each step x is projected onto [0, 1]; at the end
x ≥ ½ picks up. This file holds the math; `discq.training` runs it with Lightning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.hadamard import rotate, rotate_weight, unrotate
from discq.tensors.incoherent import IncoherentQuantizedTensor
from discq.tensors.grid import (AffineGrid, expand_groups, fit_groups, from_rows, neighbours,
                                resolved_group_size, to_rows, zero_of)

from .config import GridConfig, register_config


@register_config("disc")
@dataclass
class DiscConfig(GridConfig):
    """DiscQuant on the affine grid; see `disc_config`."""

    calibration: Any = field(default=None, repr=False, compare=False)
    steps: int = 1024
    lr: float = 0.05
    batch_size: int = 8
    clamp: float = 1.0
    rho: float = 200.0
    warmup: int = 128
    seed: int = 0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    init: str = "uniform"
    gradient_checkpointing: bool = True
    incoherence: bool = False
    checkpoint_dir: str | None = None
    trainer_kwargs: dict | None = field(default=None, repr=False, compare=False,
                                        metadata={"serialize": False})

    handler_module: ClassVar[str] = "discq.training.disc_handler"

    def __post_init__(self):
        super().__post_init__()
        _positive_int(steps=self.steps, batch_size=self.batch_size)
        _non_negative(warmup=self.warmup, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
                      seed=self.seed)
        _positive(lr=self.lr, clamp=self.clamp, rho=self.rho)
        if self.init not in ("uniform", "rtn"):
            raise ValueError(f"init must be 'uniform' (the paper) or 'rtn', got {self.init!r}")
        for name in ("gradient_checkpointing", "incoherence"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            self.checkpoint_dir = str(self.checkpoint_dir)
        if self.trainer_kwargs is not None and not isinstance(self.trainer_kwargs, dict):
            raise TypeError(f"trainer_kwargs must be a dict of lightning.Trainer arguments, got "
                            f"{type(self.trainer_kwargs).__name__}")


def _positive_int(**kw):
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


def _non_negative(**kw):
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{k} must be a number >= 0, got {v!r}")


def _positive(**kw):
    for k, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{k} must be a number > 0, got {v!r}")


def disc_config(bits: int = 3, group_size: int | None = 64, symmetric: bool = False,
                group_along: str = "input", incoherence: bool = False, calibration=None,
                steps: int = 1024, lr: float = 0.05, batch_size: int = 8, clamp: float = 1.0,
                rho: float = 200.0, warmup: int = 128, seed: int = 0,
                checkpoint_dir: str | None = None, trainer_kwargs: dict | None = None,
                kl_weight: float = 1.0, ce_weight: float = 0.0, init: str = "uniform",
                gradient_checkpointing: bool = True, scale_dtype: str = "float16") -> DiscConfig:
    """DiscQuant. `calibration`: token batches (`discq.data.calibration_batches`), cycled for
    `steps` optimizer steps of `batch_size` sequences. `checkpoint_dir`: Lightning checkpoints
    every ≤ 50 steps; calling again with the same arguments resumes from the last one.
    `trainer_kwargs` go to `lightning.Trainer` (e.g. devices=2, strategy="ddp")."""
    return DiscConfig(incoherence=incoherence, bits=bits, group_size=group_size, symmetric=symmetric,
                      group_along=group_along, scale_dtype=scale_dtype, calibration=calibration,
                      steps=steps, lr=lr, batch_size=batch_size, clamp=clamp, rho=rho,
                      warmup=warmup, seed=seed, checkpoint_dir=checkpoint_dir,
                      trainer_kwargs=trainer_kwargs, kl_weight=kl_weight, ce_weight=ce_weight,
                      init=init, gradient_checkpointing=gradient_checkpointing)


class RelaxedLinear(nn.Module):
    """Stands in for an nn.Linear during DiscQuant. Holds the original weight (the same
    Parameter, not a copy), the grid fitted on it, and x. `teacher=True` computes with W.
    With `rotation` = (s_in, s_out, q_in, q_out) the grid lives in the incoherent basis:
    W̃ = R_out W R_inᵀ is kept (one weight-sized buffer) and activations are rotated."""

    def __init__(self, linear: nn.Linear, grid: AffineGrid, generator: torch.Generator,
                 init: str, rotation: tuple[Tensor, ...] | None = None):
        super().__init__()
        self.original = linear
        self.grid = grid
        self.rotation = rotation
        W = linear.weight.detach()
        if rotation is not None:
            s_in, s_out, q_in, q_out = rotation
            self.register_buffer("W_rot", rotate_weight(W.float(), s_out, s_in, q_out, q_in)
                                 .to(W.dtype), persistent=False)
        scale, zero = fit_groups(to_rows(self.target(), grid), grid, grid.scale_dtype or W.dtype)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        y = self.fraction()
        x0 = (y >= 0.5).float() if init == "rtn" else torch.rand(y.shape, generator=generator)
        self.x = nn.Parameter(x0)
        self.teacher = False

    def target(self) -> Tensor:
        """The weight being rounded: W, or W̃ in the incoherent basis."""
        return self.original.weight.detach() if self.rotation is None else self.W_rot

    def _row_params(self) -> tuple[Tensor, Tensor | float]:
        """Per-weight scale and zero in row form [R, C]."""
        C = to_rows(self.target(), self.grid).shape[1]
        g = resolved_group_size(self.grid, C)
        s = expand_groups(self.scale.float(), g, C)
        z = zero_of(None if self.zero is None else expand_groups(self.zero, g, C), self.grid)
        return s, z

    @torch.no_grad()
    def bounds(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """down, up codes and values in weight orientation [N, K]. Recomputed, not stored:
        two extra weight-sized tensors per layer would cost more than this arithmetic."""
        s, z = self._row_params()
        Wr = to_rows(self.target(), self.grid).float()
        down, up = neighbours(Wr, s, None if self.zero is None else z, self.grid)
        return (from_rows(down, self.grid), from_rows(up, self.grid),
                from_rows((down.float() - z) * s, self.grid), from_rows((up.float() - z) * s, self.grid))

    @torch.no_grad()
    def fraction(self) -> Tensor:
        """y = (W − down)/(up − down), ½ where up = down. [N, K]"""
        _, _, lo, hi = self.bounds()
        W = self.target().float()
        gap = hi - lo
        return torch.where(gap > 0, (W - lo) / gap.clamp(min=1e-30), torch.full_like(W, 0.5))

    def weight_hat(self) -> Tensor:
        _, _, lo, hi = self.bounds()
        return (lo + self.x * (hi - lo)).to(self.original.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.teacher:
            return F.linear(x, self.original.weight, self.original.bias)
        if self.rotation is None:
            return F.linear(x, self.weight_hat(), self.original.bias)
        s_in, s_out, q_in, q_out = self.rotation
        y = unrotate(F.linear(rotate(x, s_in, q_in), self.weight_hat()), s_out, q_out)
        return y if self.original.bias is None else y + self.original.bias

    @torch.no_grad()
    def rounded(self) -> AffineQuantizedTensor:
        down, up, _, _ = self.bounds()
        codes = torch.where(self.x >= 0.5, up, down)
        q = AffineQuantizedTensor.from_codes(codes, self.scale, self.zero, self.grid,
                                             self.original.weight.dtype)
        if self.rotation is None:
            return q
        s_in, s_out, q_in, q_out = self.rotation
        return IncoherentQuantizedTensor.wrap(q, s_in, s_out, q_in, q_out)


def rtn_noise(W: Tensor, grid: AffineGrid) -> float:
    """12·‖RTN(W) − W‖²/numel: the rounding noise relative to a uniform error of one step."""
    Wq = AffineQuantizedTensor.from_hp(W, grid).dequantize(torch.float32)
    return 12 * float((Wq - W.float()).pow(2).mean())


@torch.no_grad()
def pull_gradient(layer: RelaxedLinear, rho: float, clamp: float) -> None:
    """x.grad ← −(2y − 1) + clamp(ρ·x.grad, −c, c)."""
    g = layer.x.grad if layer.x.grad is not None else torch.zeros_like(layer.x)
    layer.x.grad = (1 - 2 * layer.fraction()) + (rho * g).clamp(-clamp, clamp)


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Σ p_t (log p_t − log p_s) averaged over positions. logits: [B, S, V]."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def frac_at_vertex(layers: list[RelaxedLinear], tol: float = 1e-3) -> float:
    n = sum(l.x.numel() for l in layers)
    at = sum(int(((l.x < tol) | (l.x > 1 - tol)).sum()) for l in layers)
    return at / max(n, 1)


def mean_noise(layers: list[RelaxedLinear]) -> float:
    return sum(rtn_noise(l.target(), l.grid) for l in layers) / len(layers)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
