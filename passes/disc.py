"""DiscQuant (Chee et al., 2025): choose, for every weight, its lower or upper grid point by
distilling the original model's next-token distribution. This file holds the config and the
math; `discq.training` runs it with Lightning.

The grid (scales, zero points) is fitted once on W. Each weight gets a variable x ∈ [0, 1]
between its two grid neighbours, Ŵ(x) = (1 − x)·down + x·up. The loss is the forward KL from the
original model to the relaxed one, divided by δ̄² (the mean RTN rounding noise
12·‖RTN(W) − W‖²/numel over layers). The update direction is
    g = −(2y − 1) + clamp(ρ·∇ₓ(KL/δ̄²), −c, c),
y the fractional position of W between its neighbours: the first term is the gradient of a
linear objective that pulls x to the vertex RTN would pick, so the KL term only moves the
weights whose rounding matters. After each step x is projected onto [0, 1]; at the end x ≥ ½
picks up.

Memory per quantized weight: x, its gradient and AdamW's two moments in fp32 (16 bytes), plus
the down code (uint8), a has-a-distinct-upper-neighbour flag (uint8) and the pull term 1 − 2y
(fp16): 20 bytes beside the original weight, which is kept once because it is the teacher.
x is fp32, not bf16: late in the cosine schedule AdamW's steps are far below bf16's spacing of
2⁻⁸ near 1, so a bf16 x would freeze, and the final x ≥ ½ test needs more than 8 bits.
Ŵ is recomputed from these codes at every forward instead of being stored (see RelaxedLinear).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from discq.tensors.affine import AffineQuantizedTensor
from discq.tensors.gguf import GGUFGrid
from discq.tensors.grid import (
    AffineGrid,
    decode,
    encode,
    expand_groups,
    fit_groups,
    from_rows,
    neighbours,
    resolved_group_size,
    storage_dtype,
    to_rows,
    zero_of,
)
from discq.tensors.hadamard import (
    layer_rotation,
    layer_seed,
    rotate,
    rotate_weight,
    unrotate,
)
from discq.tensors.incoherent import IncoherentQuantizedTensor
from torch import Tensor, nn

from .config import GridConfig, check_finetune
from .registry import constructs, handles, register_method
from .sharding import is_sharded, local, rows_held
from .validate import check_bool, check_dir, check_int, check_number


@dataclass(frozen=True)
class Codebook:
    """How DiscQuant rounds onto one weight format: `relax(linear, config, fqn, generator)`
    returns the `Relaxation` that stands in for the layer (its two candidates per weight or per
    vector, the variables x, and `rounded()`: the format's tensor); `check(config)` refuses
    settings the format cannot hold."""

    relax: Any
    check: Any = None


INITS = ("uniform", "rtn", "gptq", "kl")  # disc_config(init=...)
RELAXATIONS: dict[str, Codebook] = {}  # disc_config(codebook=name) -> its Codebook


def register_codebook(name: str, relax, check=None) -> None:
    """Make `disc_config(codebook=name)` round onto a format (see `Codebook`)."""
    RELAXATIONS[name] = Codebook(relax, check)


@register_method("disc",
                 summary="DiscQuant: each weight's grid neighbour chosen by KL distillation",
                 paper="Chee et al., DiscQuant (2025), arXiv:2501.06417",
                 data_driven=True, order=20, end_to_end=True)
@dataclass
class DiscConfig(GridConfig):
    """DiscQuant on the affine grid; see `disc_config`. `calibration` and `trainer_kwargs` are
    run-time inputs, not settings: neither is written by `to_dict` (trainer_kwargs may hold
    callbacks or strategy objects, which JSON cannot hold)."""

    calibration: Any = field(default=None, repr=False, compare=False)
    incoherence: bool = False
    codebook: str = "affine"
    vector_dim: int = 2
    codebook_group_size: int | None = None
    steps: int = 1024
    lr: float = 0.05
    batch_size: int = 8
    clamp: float = 1.0
    rho: float = 200.0
    warmup: int = 128
    seed: int = 0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    init: str = "uniform"
    keep_best: bool = True
    teacher_topk: int = 128
    compile_step: bool = False
    gradient_checkpointing: bool | None = None
    finetune: bool = False
    finetune_steps: int = 100
    checkpoint_dir: str | None = None
    trainer_kwargs: dict | None = field(default=None, repr=False, compare=False,
                                        metadata={"serialize": False})

    def __post_init__(self):
        super().__post_init__()
        check_int(1, steps=self.steps, batch_size=self.batch_size)
        check_int(0, warmup=self.warmup, seed=self.seed, teacher_topk=self.teacher_topk)
        check_number(positive=True, lr=self.lr, clamp=self.clamp, rho=self.rho)
        check_number(positive=False, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
                      hidden_weight=self.hidden_weight)
        check_finetune(self)
        if self.codebook not in RELAXATIONS:
            raise ValueError(f"codebook must be one of {sorted(RELAXATIONS)} ('affine': the grid "
                             f"of bits/group_size; 'e8p': QuIP#'s lattice; 'gptvq': k-means "
                             f"vector codebooks), got {self.codebook!r}")
        if RELAXATIONS[self.codebook].check:
            RELAXATIONS[self.codebook].check(self)
        if self.init not in INITS:
            raise ValueError(f"init must be 'uniform' (x ~ U[0, 1], the paper), 'rtn' (x at "
                             f"the RTN vertex), 'gptq' (GPTQ's codes, relaxed around the "
                             f"weights GPTQ rounded) or 'kl' (the same with GPTQ on KL "
                             f"Hessians), got {self.init!r}")
        if self.init in ("gptq", "kl") and (self.codebook != "affine" or self.gguf is not None):
            raise ValueError(f"init={self.init!r} starts from GPTQ's codes on the affine grid of "
                             f"bits/group_size; with codebook={self.codebook!r}"
                             f"{f', gguf={self.gguf!r}' if self.gguf else ''} use init='rtn' "
                             f"or 'uniform'")
        check_bool(incoherence=self.incoherence, keep_best=self.keep_best,
                   compile_step=self.compile_step)
        if self.gradient_checkpointing is not None:
            check_bool(gradient_checkpointing=self.gradient_checkpointing)
        self.checkpoint_dir = check_dir("checkpoint_dir", self.checkpoint_dir)
        if self.trainer_kwargs is not None and not isinstance(self.trainer_kwargs, dict):
            raise TypeError(f"trainer_kwargs must be a dict of lightning.Trainer arguments "
                            f"(e.g. dict(devices=2, strategy='ddp')), got "
                            f"{type(self.trainer_kwargs).__name__}")


@constructs(DiscConfig)
def disc_config(bits: int = 3, group_size: int | None = 64, symmetric: bool = False,
                group_along: str = "input", incoherence: bool = False, calibration=None,
                steps: int = 1024, lr: float = 0.05, batch_size: int = 8, clamp: float = 1.0,
                rho: float = 200.0, warmup: int = 128, seed: int = 0,
                checkpoint_dir: str | None = None, trainer_kwargs: dict | None = None,
                kl_weight: float = 1.0, ce_weight: float = 0.0, init: str = "uniform",
                scale_dtype: str = "float16", gradient_checkpointing: bool | None = None,
                finetune: bool = False, finetune_steps: int = 100,
                codebook: str = "affine", hidden_weight: float = 0.0,
                gguf: str | None = None, vector_dim: int = 2,
                codebook_group_size: int | None = None, keep_best: bool = True,
                teacher_topk: int = 128, compile_step: bool = False) -> DiscConfig:
    """DiscQuant. `calibration`: token batches (`discq.data.calibration_batches`); their
    sequences are reshuffled (seeded) into `steps` optimizer steps of `batch_size` sequences.
    `clamp`/`rho`: the KL gradient is scaled by ρ and clipped to ±clamp (0.05 suits
    `incoherence=True`). `warmup`: linear warm-up steps of the cosine schedule. `init`:
    'uniform' (paper), 'rtn' (x starts at the RTN vertex; converges faster in short runs) or
    'gptq' (GPTQ runs first on the same calibration; each weight then chooses between the grid
    neighbours of the value GPTQ rounded, starting at GPTQ's choice, on GPTQ's grid: the
    start that makes a short run worth it; affine grid only) or 'kl' (the same from GPTQ with
    KL Hessians, `gptq_config(hessian="kl")`). `keep_best`: score the rounded
    point on held-out calibration sequences (an eighth, at most 32) at the start, every
    quarter and the end, and return the best (so the result is never worse than the start
    by that measure; one process only: DDP and FSDP runs hold no sequence out and return the
    last step's point). `teacher_topk`: where sequences repeat across steps, the original
    model's distribution is computed once and kept as each position's `teacher_topk` most
    likely tokens' log-probabilities (the rest of its mass one bucket; 0 keeps all), in memory
    or, when large, in a memory-mapped temporary file (training/teacher.py). `compile_step`:
    each decoder block's forward and backward compiled by `torch.compile` (one compilation
    shared by the blocks; pays off over long runs, see the README).
    `checkpoint_dir`: Lightning checkpoints every ≤ 50 steps; calling again with the same
    arguments resumes from the last one and gives the uninterrupted result. `trainer_kwargs`
    go to `lightning.Trainer` (e.g. devices=2, strategy="ddp", accelerator="cpu").
    `gradient_checkpointing`: recompute each decoder block's activations in the backward pass
    (None: where a step's activations would exceed 1 GiB, as at the default 8x512 tokens; a
    step of 2x128 tokens on a 135M model keeps them and saves a forward pass).
    `kl_weight`/`ce_weight`/`hidden_weight`: weights of the KL, next-token cross-entropy and
    intermediate-layer (relative MSE of every decoder layer's hidden state) terms.
    `finetune=True`: after rounding, tune norms/biases/sign vectors for `finetune_steps` steps
    (codes fixed; see discq.training.finetune). `codebook="e8p"`: round to QuIP#'s E8P lattice
    (in its randomized-Hadamard basis) instead of the affine grid, choosing for each block of
    8 weights between its two candidate lattice points (passes/disc_lattice.py);
    group_size/symmetric/group_along/incoherence do not apply there. `codebook="gptvq"`:
    int8 k-means codebooks of 2^(bits·vector_dim) points per group of about
    `codebook_group_size` weights (default: 0.125 bits a weight of codebook, as GPTVQ), each
    vector of `vector_dim` weights choosing between its two nearest codewords
    (passes/disc_vq.py). `gguf="Q4_K"` or a
    llama.cpp mixture `gguf="Q4_K_M"`: choose between neighbours on llama.cpp's block grid
    (fitted once on W) instead of bits/group_size."""
    return DiscConfig(bits=bits, group_size=group_size, symmetric=symmetric,
                      group_along=group_along, scale_dtype=scale_dtype, incoherence=incoherence,
                      calibration=calibration, steps=steps, lr=lr, batch_size=batch_size,
                      clamp=clamp, rho=rho, warmup=warmup, seed=seed,
                      checkpoint_dir=checkpoint_dir, trainer_kwargs=trainer_kwargs,
                      kl_weight=kl_weight, ce_weight=ce_weight, init=init,
                      gradient_checkpointing=gradient_checkpointing, finetune=finetune,
                      finetune_steps=finetune_steps, codebook=codebook,
                      hidden_weight=hidden_weight, gguf=gguf, vector_dim=vector_dim,
                      codebook_group_size=codebook_group_size, keep_best=keep_best,
                      teacher_topk=teacher_topk, compile_step=compile_step)


@handles(DiscConfig)
def _disc_model(model: nn.Module, config: DiscConfig, targets) -> None:
    from discq.training.disc_handler import (
        disc_quantize,  # Lightning: loaded on first use
    )
    disc_quantize(model, config, targets)


class Relaxation(nn.Module):
    """What every relaxed layer shares: the teacher switch, the forward through Ŵ(x) (in the
    rotated basis when `rotation` is set) and the pull term. Subclasses hold `original`, `x`,
    `pull` and the (s_in, s_out, q_in, q_out) `rotation` or None, and define `weight_hat()`
    and `rounded()`."""

    teacher: bool
    hard = False  # forward through the rounded point (x ≥ ½), not the relaxed one

    def x_now(self) -> Tensor:
        """x, or with `hard` set its rounding (what `rounded()` would store)."""
        return (self.x >= 0.5).to(self.x.dtype) if self.hard else self.x

    def forward(self, x: Tensor) -> Tensor:
        if self.teacher:
            return F.linear(x, self.original.weight, self.original.bias)
        if self.rotation is None:
            return F.linear(x, self.weight_hat(), self.original.bias)
        s_in, s_out, q_in, q_out = self.rotation
        y = unrotate(F.linear(rotate(x, s_in, q_in), self.weight_hat()), s_out, q_out)
        return y if self.original.bias is None else y + self.original.bias

    @torch.no_grad()
    def apply_pull(self, rho: float, clamp: float) -> None:
        """x.grad ← (1 − 2y) + clamp(ρ·x.grad, −c, c), in place (x.grad holds ∇ₓ(loss); y is
        the weight's position between its two candidates, 1 − 2y is stored as `pull`)."""
        pull = rows_held(self.pull, self.x)  # sharded x (FSDP): the rows this process holds
        if self.x.grad is None:
            self.x.grad = _like_x(pull.float(), self.x)
        else:
            local(self.x.grad).mul_(rho).clamp_(-clamp, clamp).add_(pull)


class RelaxedLinear(Relaxation):
    """Stands in for an nn.Linear during DiscQuant. Keeps the original module (its weight is the
    teacher and is not copied), the grid fitted on it, and the variables x in row form [R, C].

    Buffers (row form): `down` uint8 codes, `gap` uint8 (1 where the upper neighbour differs:
    not on a grid point, not clipped), `pull` fp16 = 1 − 2y (0 where gap = 0). Ŵ is rebuilt
    from them at every forward, (down + x·gap − zero)·scale with the scales broadcast over
    groups; the alternative of storing Ŵ's two neighbours in fp32 costs 8 bytes per weight
    instead of 2 (measured in benchmarks/results/disc_smollm2.md).
    With `rotation` = layer_rotation(...) the grid lives in the incoherent basis
    W̃ = R_out W R_inᵀ (W̃ is only needed while fitting) and activations are rotated."""

    def __init__(self, linear: nn.Linear, grid: AffineGrid, init: str,
                 generator: torch.Generator, rotation: tuple[Tensor, ...] | None = None,
                 start=None):
        super().__init__()
        self.original, self.grid, self.teacher = linear, grid, False
        self.rotated = rotation is not None
        W = linear.weight.detach()
        if self.rotated:  # buffers, so that they follow the module to its device
            for name, t in zip(("s_in", "s_out", "q_in", "q_out"), rotation):
                self.register_buffer(name, t.to(W.device), persistent=False)
            W = rotate_weight(W.float(), self.s_out, self.s_in, self.q_out, self.q_in).to(W.dtype)
        headers = None
        if start is not None:  # another method's grid and the weights it rounded (disc_init)
            Wr = to_rows(start.W.to(W.device), grid).float()  # [R, C]
            scale, zero = start.scale.to(W.device), start.zero
            zero = None if zero is None else zero.to(W.device)
        elif isinstance(grid, GGUFGrid):  # zero fp32 (-b/a); headers [R, C / block, P] uint8
            Wr = to_rows(W, grid).float()
            scale, zero, headers = grid.fit(Wr)
        else:
            Wr = to_rows(W, grid).float()
            scale, zero = fit_groups(Wr, grid, storage_dtype(grid, W.dtype))
        self.register_buffer("scale", scale, persistent=False)  # [R, G]
        self.register_buffer("zero", zero, persistent=False)    # [R, G] uint8 or None
        self.register_buffer("headers", headers, persistent=False)
        x0 = self._fit_codes(Wr)
        if init == "uniform":
            x0 = torch.rand(x0.shape, generator=generator).to(x0.device)
        self.x = nn.Parameter(x0.contiguous())  # [R, C] fp32 (see the module docstring)

    @property
    def rotation(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """(s_in, s_out, q_in, q_out) of the incoherent basis, or None."""
        return (self.s_in, self.s_out, self.q_in, self.q_out) if self.rotated else None

    def _per_weight(self, t: Tensor | None, C: int) -> Tensor | None:
        return None if t is None else expand_groups(t, resolved_group_size(self.grid, C), C)

    @torch.no_grad()
    def _fit_codes(self, Wr: Tensor) -> Tensor:
        """Sets down, gap, pull and the RTN noise from Wr [R, C]; returns the RTN vertex."""
        C = Wr.shape[1]
        s, z = self._per_weight(self.scale, C), self._per_weight(self.zero, C)
        self.levels = getattr(self.grid, "levels", None)  # IQ4_NL/IQ4_XS: code q is levels[q]
        if self.levels is None:
            down, up = neighbours(Wr, s, z, self.grid)
            y = Wr / s.float() + zero_of(z, self.grid) - down.float()  # as encode computes
            rtn = encode(Wr, s, z, self.grid)
        else:  # neighbours on the level table, y the fraction of the level gap
            t = Wr / s.float() + zero_of(z, self.grid)
            down, up, y = self.grid.bracket(t)
            rtn = self.grid.nearest(t)
        gap = up > down
        # contiguous row form, whatever the layout of Wr (a transposed view for output groups)
        self.register_buffer("down", down.contiguous(), persistent=False)
        self.register_buffer("gap", gap.to(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("pull", torch.where(gap, 1 - 2 * y, 0.0).half().contiguous(),
                             persistent=False)
        rtn_w = decode(rtn, s, z, self.grid) if self.levels is None else \
            self._dequantize_rows(self.levels.to(rtn.device)[rtn.long()])
        self.rtn_noise = 12 * float((rtn_w - Wr).pow(2).mean())
        return (rtn > down).float()

    def _values(self, t: Tensor) -> Tensor:
        """t = x·gap [R, C] -> grid values between the neighbours: down + t on the affine
        grid; on a level table, levels[down] + t·(levels[down + 1] − levels[down])."""
        if self.levels is None:
            return self.down + t
        lv, down = self.levels.to(t.device), self.down.long()
        lo = lv[down]
        return lo + t * (lv[(down + 1).clamp(max=len(lv) - 1)] - lo)

    def _dequantize_rows(self, q: Tensor) -> Tensor:
        """(q − zero)·scale for real-valued codes q [R, C]; scales broadcast over groups
        without a per-weight copy when the group size divides the row."""
        R, C = q.shape
        g = resolved_group_size(self.grid, C)
        if C % g:
            return (q - zero_of(self._per_weight(self.zero, C), self.grid)) * \
                self._per_weight(self.scale, C).float()
        z = zero_of(self.zero, self.grid)
        z = z.unsqueeze(-1) if isinstance(z, Tensor) else z
        return ((q.view(R, C // g, g) - z) * self.scale.float().unsqueeze(-1)).view(R, C)

    def weight_hat(self) -> Tensor:
        """Ŵ(x) in weight orientation [N, K], differentiable in x."""
        q = self._values(self.x_now() * self.gap)  # [R, C] fp32
        return from_rows(self._dequantize_rows(q), self.grid).to(self.original.weight.dtype)

    @torch.no_grad()
    def neighbour_values(self) -> tuple[Tensor, Tensor]:
        """The two grid points around each weight, (down, up) values in weight orientation."""
        lo = self._dequantize_rows(self._values(torch.zeros_like(self.x)))
        hi = self._dequantize_rows(self._values(self.gap.float()))
        return from_rows(lo, self.grid), from_rows(hi, self.grid)

    @torch.no_grad()
    def codes(self) -> Tensor:
        """round(x): down or up, in weight orientation [N, K] uint8."""
        up = (self.x >= 0.5).to(torch.uint8) & self.gap
        return from_rows(self.down + up, self.grid).contiguous()

    @torch.no_grad()
    def rounded(self) -> AffineQuantizedTensor:
        """The packed quantized weight of round(x)."""
        if self.headers is not None:
            return self.grid.pack(self.codes(), self.headers, self.original.weight.dtype)
        q = AffineQuantizedTensor.from_codes(self.codes(), self.scale, self.zero, self.grid,
                                             self.original.weight.dtype)
        if self.rotation is None:
            return q
        return IncoherentQuantizedTensor.wrap(q, *self.rotation)


def _like_x(t: Tensor, x) -> Tensor:
    """`t` (this process's rows) as a gradient for x: a shard like x's when x is sharded."""
    if not is_sharded(x):
        return t
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(t, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())


def hidden_mse(teacher_hidden, student_hidden) -> Tensor:
    """The intermediate-layer term: relative squared error of every layer's hidden state,
    ‖h_s − h_t‖² / ‖h_t‖², averaged over layers (the embeddings' output, identical in both,
    is skipped). Each item: [B, S, D]."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp(min=1e-12)
             for t, s in zip(teacher_hidden[1:], student_hidden[1:])]
    return torch.stack(terms).mean()


def next_token_ce(student_logits: Tensor, ids: Tensor) -> Tensor:
    """Cross-entropy of the data's next tokens. logits: [B, S, V], ids: [B, S]."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def frac_at_vertex(layers: list[RelaxedLinear], tol: float = 1e-3) -> float:
    """Fraction of the variables within `tol` of 0 or 1."""
    xs = [local(l.x) for l in layers]  # sharded: this process's part (a progress figure)
    n = sum(x.numel() for x in xs)
    at = sum(int(((x - 0.5).abs() >= 0.5 - tol).sum()) for x in xs)
    return at / max(n, 1)


def mean_noise(layers: list[RelaxedLinear]) -> float:
    """δ̄²: the RTN rounding noise 12·‖RTN(W) − W‖²/numel, averaged over layers."""
    return sum(l.rtn_noise for l in layers) / len(layers)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor at optimizer step `step`: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _relax_affine(linear: nn.Linear, config: DiscConfig, fqn: str, generator,
                  start=None) -> RelaxedLinear:
    """The affine grid of `config` (in the layer's seeded rotated basis with incoherence); with
    a `start` (passes/disc_init.py), its grid, around the weights it rounded."""
    grid = config.grid(fqn=fqn)
    if isinstance(grid, GGUFGrid) and grid.type.vector:  # a codebook i-quant: codes of 8
        from .disc_codebook import RelaxedCodebookLinear
        return RelaxedCodebookLinear(linear, grid, config.init, generator)
    rot = layer_rotation(*linear.weight.shape, layer_seed(fqn)) if config.incoherence else None
    return RelaxedLinear(linear, grid, config.init, generator, rot, start)


register_codebook("affine", _relax_affine)
