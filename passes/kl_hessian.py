"""Kronecker factors of the Hessian of the whole model's KL to the original (YAQA, Sketch B).

For a linear y = W x inside the model (W: [N, K]), the Hessian of KL(p_original ‖ p_W) with
respect to W, at the original W, is the Fisher information E[vec(G) vec(G)ᵀ] of
G = ∇_W log p(y | ids), the targets y drawn from the original model's own next-token
distribution (Tseng, Sun, De Sa 2025). It is sketched as H_out ⊗ H_in:
    H_in = E[Gᵀ G] / N   [K, K]        H_out = E[G Gᵀ] / K   [N, N]
one step of the power iteration for the nearest Kronecker product, started from the identity on
both sides, in one pass over the calibration sequences (the paper's "Sketch B"). For one
sequence (a piece of at most PIECE tokens of a calibration sequence) G = Δᵀ X (X: [T, K] the
layer's inputs, Δ: [T, N] the gradients at its outputs), so
    Gᵀ G = Xᵀ (Δ Δᵀ) X,   G Gᵀ = Δᵀ (X Xᵀ) Δ
cost T²(N + K) + T(N² + K²) per layer and sequence, never an N×K gradient (GPTQ's XᵀX: T K²).
GPTQ's H = XᵀX is the input side alone, every token's gradient alike.

One pass of forward + backward (gradients for activations only, never for weights) per chunk of
layers whose factors fit `max_bytes`; each finished chunk can be kept on disk, and a run started
again with the same directory skips the chunks already there.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .capture import _forward_model


MAX_BYTES = 4 << 30  # factors held in memory per pass (fp32)
# Tokens per sketched sequence: calibration sequences are cut into pieces of this length. Each
# piece is one sample G of the gradient, so 4x more samples than 512-token sequences for the
# same tokens, and the T×T products cost a quarter (SmolLM2, 3-bit g64: KL 0.382 in pieces of
# 128 against 0.402 from whole 512-token sequences)
PIECE = 128


def factor_bytes(module: nn.Linear, output_side: bool = True) -> int:
    N, K = module.weight.shape
    return 4 * (N * N * output_side + K * K)


def chunks(targets: list[tuple[str, nn.Linear]], max_bytes: int, output_side: bool = True
           ) -> list[list]:
    """Consecutive targets whose factors together fit `max_bytes` (one layer at least)."""
    out, size = [[]], 0
    for fqn, m in targets:
        b = factor_bytes(m, output_side)
        if out[-1] and size + b > max_bytes:
            out.append([])
            size = 0
        out[-1].append((fqn, m))
        size += b
    return [c for c in out if c]


class _Collector:
    """Hooks on the chunk's linears: each call's input X and output gradient Δ for the current
    batch of B sequences; `close_batch` folds them into the running factor sums, sequence by
    sequence (a linear called on a flat [T, K] of routed tokens, an expert, needs B = 1)."""

    def __init__(self, layers: list[tuple[str, nn.Linear]], output_side: bool = True):
        self.layers = layers
        self.H_in = {fqn: torch.zeros(m.in_features, m.in_features) for fqn, m in layers}
        self.H_out = {fqn: torch.zeros(m.out_features, m.out_features) if output_side else None
                      for fqn, m in layers}
        self.X: dict[str, list[Tensor]] = {fqn: [] for fqn, _ in layers}
        self.D: dict[str, dict[int, Tensor]] = {fqn: {} for fqn, _ in layers}  # call -> Δ
        self.B = 1
        self.layers_N = {fqn: m.out_features for fqn, m in layers}
        self.handles = [m.register_forward_hook(self._hook(fqn)) for fqn, m in layers]

    def _per_sequence(self, t: Tensor) -> Tensor:
        """[B, T, C] from a call's input or gradient ([B, T, C], or flat [T, C] when B = 1)."""
        if t.dim() == 3 and t.shape[0] == self.B:
            return t.float()
        if self.B != 1:
            raise RuntimeError("internal error: a linear saw tokens of several sequences mixed")
        return t.reshape(1, -1, t.shape[-1]).float()

    def _hook(self, fqn: str):
        def seen(module, args, out):
            x = args[0].detach()
            if x.numel() == 0 or not out.requires_grad:  # an expert no token was routed to
                return
            call = len(self.X[fqn])
            self.X[fqn].append(self._per_sequence(x))  # [B, T, K]

            def grad(g, call=call):
                self.D[fqn][call] = self._per_sequence(g)  # [B, T, N]
            out.register_hook(grad)
        return seen

    def close_batch(self) -> None:
        for fqn, _ in self.layers:
            if self.X[fqn]:
                X = torch.cat(self.X[fqn], dim=1)  # [B, T, K]: every call's tokens
                N = self.layers_N[fqn]
                D = torch.cat([self.D[fqn].get(i, x.new_zeros(*x.shape[:2], N))  # none: 0
                               for i, x in enumerate(self.X[fqn])], dim=1)  # [B, T, N]
                _accumulate(self.H_in[fqn], self.H_out[fqn], X, D)
            self.X[fqn], self.D[fqn] = [], {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _accumulate(H_in: Tensor, H_out: Tensor | None, X: Tensor, D: Tensor) -> None:
    """H_in += Σ_b G_bᵀ G_b (and H_out += Σ_b G_b G_bᵀ) for G_b = D_bᵀ X_b, X: [B, T, K],
    D: [B, T, N]: through T×T products or through G, whichever costs fewer multiply-adds."""
    T, (N, K) = X.shape[1], (D.shape[-1], X.shape[-1])
    out = H_out is not None
    through_T = T * T * (N + K) * (1 + out) + T * K * K + out * T * N * N
    through_G = N * T * K + K * K * N + out * N * N * K
    if through_T < through_G:
        H_in.addmm_(X.reshape(-1, K).t(), (D @ D.transpose(1, 2) @ X).reshape(-1, K))
        if out:
            H_out.addmm_(D.reshape(-1, N).t(), (X @ X.transpose(1, 2) @ D).reshape(-1, N))
    else:
        G = D.transpose(1, 2) @ X  # [B, N, K]
        H_in.addmm_(G.reshape(-1, K).t(), G.reshape(-1, K))  # Σ_b G_bᵀ G_b
        if out:
            Gt = G.transpose(1, 2).reshape(-1, N)  # [B·K, N]
            H_out.addmm_(Gt.t(), Gt)  # Σ_b G_b G_bᵀ


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = _forward_model(model, ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple) else out
    return logits


class _EmbeddingLeaf:
    """The embeddings' output made the leaf that gradients are taken for: every layer after
    it gets its output gradient, and no weight gets one."""

    def __init__(self, model: nn.Module):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            raise ValueError(f"hessian='kl' needs a language model with input embeddings and "
                             f"logits (a transformers causal LM); {type(model).__name__} has no "
                             f"get_input_embeddings(): use hessian='inputs'")
        self.leaf: Tensor | None = None
        self.handle = emb.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self.leaf = out.detach().requires_grad_()
        return self.leaf


def _pieces(batches, B: int) -> list[Tensor]:
    """The calibration sequences cut into pieces of at most PIECE tokens, stacked B at a time
    where they have the same length: [b ≤ B, T] each, one gradient G per row."""
    pieces = [p for b in batches for row in b for p in row.split(PIECE)]
    by_length: dict[int, list[Tensor]] = {}
    for p in pieces:
        by_length.setdefault(len(p), []).append(p)
    return [torch.stack(same[i:i + B]) for same in by_length.values()
            for i in range(0, len(same), B)]


def draw(p: Tensor, gen: torch.Generator) -> Tensor:
    """One token per row of p: [S, V] (inverse CDF: torch.multinomial's exponential draws cost
    a third of a backward pass at SmolLM2's 49k-token vocabulary)."""
    c = p.double().cumsum(-1).cpu()  # [S, V]
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64) * c[:, -1:]
    return torch.searchsorted(c, u)[:, 0].clamp_(max=p.shape[1] - 1).to(p.device)


def _one_batch(model: nn.Module, ids: Tensor, gens: list[torch.Generator],
               leaf: _EmbeddingLeaf) -> None:
    """Forward, each sequence's targets drawn from the model's own distribution (its own
    generator), backward to the embeddings. ids: [B, S]."""
    with torch.enable_grad():
        logits = _logits(model, ids).float()  # [B, S, V]
        with torch.no_grad():
            y = torch.stack([draw(torch.softmax(row, -1), g) for row, g in zip(logits, gens)])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                 reduction="sum")
        torch.autograd.grad(loss, [leaf.leaf])


def batch_size(model: nn.Module, layers) -> int:
    """Sequences per forward: 8, or 1 where a layer is an expert (it sees the routed tokens of
    every sequence flattened together, so one gradient per sequence needs one sequence)."""
    from .experts import ExpertLinears
    experts = {id(m) for lst in model.modules() if isinstance(lst, ExpertLinears) for m in lst}
    return 1 if any(id(m) in experts for _, m in layers) else 8


def collect(model: nn.Module, batches, layers: list[tuple[str, nn.Linear]], *, seed: int = 0,
            output_side: bool = True, desc: str = "KL Hessians"
            ) -> dict[str, tuple[Tensor, Tensor | None]]:
    """{fqn: (H_in [K, K], H_out [N, N])} of `layers` from one pass over `batches`
    (`output_side=False`: H_out is None, and its cost, about half, is not paid)."""
    collector, leaf = _Collector(layers, output_side), _EmbeddingLeaf(model)
    stacks = _pieces(batches, batch_size(model, layers))
    was_training = model.training
    model.eval()  # dropout off: the Hessian of the model as it is used
    grads = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grads:  # no weight gradient is computed, only the activations'
        p.requires_grad_(False)
    n, device = 0, next(model.parameters()).device
    try:
        for ids in tqdm(stacks, desc=desc, unit="batch", leave=False):
            # each sequence its own draws (the same in every chunk, whatever the batching)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + n + i)
                    for i in range(len(ids))]
            collector.B = len(ids)
            _one_batch(model, ids.to(device), gens, leaf)
            collector.close_batch()
            n += len(ids)
    finally:
        collector.remove()
        leaf.handle.remove()
        model.train(was_training)
        for p, requires in grads:
            p.requires_grad_(requires)
    H_out = collector.H_out
    return {fqn: (collector.H_in[fqn] / (n * m.out_features),
                  None if H_out[fqn] is None else H_out[fqn] / (n * m.in_features))
            for fqn, m in layers}


class KLFactors:
    """Every target's factors, pass by pass: `pop(fqn)` returns (H_in, H_out). With `directory`
    each chunk's factors are written there when its pass ends (atomically) and read back when
    first needed, so only one chunk is in memory; a chunk already there from an earlier run
    with the same `settings` is not computed again."""

    def __init__(self, model: nn.Module, batches, targets, *, seed: int = 0,
                 output_side: bool = True, directory: str | Path | None = None,
                 settings: str = "", max_bytes: int = MAX_BYTES):
        self.model, self.batches, self.seed = model, batches, seed
        self.output_side = output_side
        self.chunks = chunks(list(targets), max_bytes, output_side)
        self.directory = None if directory is None else Path(directory)
        self.settings = hashlib.sha256(
            f"{settings}|{seed}|{output_side}".encode()).hexdigest()[:16]
        self.where = {fqn: i for i, c in enumerate(self.chunks) for fqn, _ in c}
        self.held: dict[str, tuple[Tensor, Tensor]] = {}

    def compute(self) -> KLFactors:
        """Run every chunk's pass now, while the model is still the original: with several
        chunks each is written to disk (a temporary directory without `directory`)."""
        if self.directory is None and len(self.chunks) > 1:
            self._tmp = tempfile.TemporaryDirectory(prefix="discq-kl-")
            self.directory = Path(self._tmp.name)
        for i in range(len(self.chunks)):
            self.held = self._chunk(i)
        return self

    def pop(self, fqn: str) -> tuple[Tensor, Tensor | None]:
        if fqn not in self.held:
            self.held = self._chunk(self.where[fqn])
        return self.held.pop(fqn)

    def get(self, fqn: str) -> tuple[Tensor, Tensor | None]:
        """`fqn`'s factors, kept for another reader (copies: methods damp H in place)."""
        if fqn not in self.held:
            self.held = self._chunk(self.where[fqn])
        H_in, H_out = self.held[fqn]
        return H_in.clone(), None if H_out is None else H_out.clone()

    def shared(self) -> Shared:
        """A view whose `pop` leaves the factors here, for several runs over the same layers."""
        return Shared(self)

    def _chunk(self, i: int) -> dict[str, tuple[Tensor, Tensor]]:
        layers = self.chunks[i]
        path = None if self.directory is None else self.directory / f"chunk-{i:04d}.safetensors"
        if path is not None and path.exists():
            found = _read(path, self.settings, [fqn for fqn, _ in layers])
            if found is not None:
                return found
        desc = "KL Hessians" + (f" ({i + 1}/{len(self.chunks)})" if len(self.chunks) > 1 else "")
        out = collect(self.model, self.batches, layers, seed=self.seed,
                      output_side=self.output_side, desc=desc)
        if path is not None:
            _write(path, out, self.settings)
        return out


class Shared:
    """`KLFactors` read by several methods in turn (mixed widths: every candidate rounds every
    layer with the same factors): `pop` copies instead of removing."""

    def __init__(self, factors: KLFactors):
        self.factors = factors

    @property
    def output_side(self) -> bool:
        return self.factors.output_side

    def covers(self, targets) -> bool:
        return all(fqn in self.factors.where for fqn, _ in targets)

    def pop(self, fqn: str) -> tuple[Tensor, Tensor | None]:
        return self.factors.get(fqn)


def _write(path: Path, factors: dict, settings: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for fqn, (H_in, H_out) in factors.items():
        tensors[f"{fqn}:in"] = H_in.contiguous()
        if H_out is not None:
            tensors[f"{fqn}:out"] = H_out.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"settings": settings,
                                           "layers": json.dumps(sorted(factors))})
    os.replace(tmp, path)  # a crash leaves no half-written chunk


def _read(path: Path, settings: str, names: list[str]) -> dict | None:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("settings") != settings or json.loads(meta.get("layers", "[]")) != sorted(names):
        return None  # another run's factors: computed again
    t = load_file(str(path))
    return {fqn: (t[f"{fqn}:in"], t.get(f"{fqn}:out")) for fqn in names}
