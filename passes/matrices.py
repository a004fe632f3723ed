"""Every weight matrix of a model, and what `quantize_` does with each.

The matrices discq quantizes (`Matrix`), by the module holding them:
  linear   an `nn.Linear` (weight [N, K])
  conv1d   transformers' `Conv1D` (GPT-2 style: weight [K, N], a transposed linear); while it
           is quantized it becomes the `nn.Linear` it is (weight transposed), and stays one
  experts  one stacked expert weight of a mixture-of-experts layer (`passes/experts.py`), named
           by its parameter: `model.layers.0.mlp.experts.gate_up_proj`
Every other parameter with two or more dimensions (token and position embeddings, routers,
convolutions, a model's own 3-D tensors) stays in full precision, and `Coverage` says which,
why, and what share of the matrix parameters that leaves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from discq.tensors.base import QuantizedTensor
from torch import nn

from .experts import is_experts, is_stack_quantized, stack_names


@dataclass
class Matrix:
    """One quantizable weight matrix: `fqn` is its name in configs and reports (the module's
    name for a linear, `<experts module>.<stack>` for an expert stack)."""

    fqn: str
    module: nn.Module
    kind: str   # "linear" | "conv1d" | "experts"
    param: str  # the parameter's attribute on `module`

    @property
    def param_name(self) -> str:
        return self.fqn if self.kind == "experts" else _join(self.fqn, self.param)

    @property
    def numel(self) -> int:
        return self.module._parameters[self.param].numel()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `pytorch_utils.Conv1D` (y = x W + b with W [in, out]), by its shape."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def routers(model: nn.Module) -> set[nn.Module]:
    """The routing gates of mixture-of-experts layers: the siblings of an experts module whose
    weight has at most one row per expert (top-k routers, Qwen2-MoE's shared-expert gate)."""
    out = set()
    for parent in model.modules():
        experts = [c for c in parent.children() if is_experts(c)]
        for c in parent.children() if experts else ():
            w = c._parameters.get("weight")
            if c not in experts and w is not None and w.dim() == 2 \
                    and w.shape[0] <= experts[0].num_experts:
                out.add(c)
    return out


def candidates(model: nn.Module) -> list[Matrix]:
    """The matrices `quantize_` may quantize (not yet quantized), routers excepted."""
    skip, out = routers(model), []
    for fqn, m in model.named_modules():
        if m in skip:
            continue
        if isinstance(m, nn.Linear) and not isinstance(m.weight, QuantizedTensor):
            out.append(Matrix(fqn, m, "linear", "weight"))
        elif is_conv1d(m):
            out.append(Matrix(fqn, m, "conv1d", "weight"))
        elif is_experts(m):
            out += [Matrix(_join(fqn, s), m, "experts", s) for s in stack_names(m)
                    if not is_stack_quantized(m, s)]
    return out


def router_matrices(model: nn.Module) -> list[Matrix]:
    """Routers as matrices: quantized only when a config dict names them exactly."""
    names = {m: fqn for fqn, m in model.named_modules()}
    return [Matrix(names[m], m, "linear", "weight") for m in routers(model)
            if isinstance(m, nn.Linear) and not isinstance(m.weight, QuantizedTensor)]


# ---- coverage -----------------------------------------------------------------------------

@dataclass
class Coverage:
    """What `quantize_` quantizes, of every matrix parameter (≥ 2 dimensions) of the model."""

    quantized: dict[str, int] = field(default_factory=dict)     # name -> parameters
    kept: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (params, why)
    uncovered: list[str] = field(default_factory=list)  # in the decoder blocks, no rule
    few_tokens: dict[str, int] = field(default_factory=dict)  # expert -> calibration tokens

    @property
    def share(self) -> float:
        total = sum(self.quantized.values()) + sum(n for n, _ in self.kept.values())
        return sum(self.quantized.values()) / total if total else 0.0

    def reasons(self) -> dict[str, tuple[int, int]]:
        """why -> (how many matrices, how many parameters)."""
        out: dict[str, tuple[int, int]] = {}
        for n, why in self.kept.values():
            k, total = out.get(why, (0, 0))
            out[why] = (k + 1, total + n)
        return out

    def describe(self, names: int = 3, verb: str = "quantized") -> str:
        """Lines for a person; `verb`: "would quantize" for a plan."""
        q = sum(self.quantized.values())
        lines = [f"{verb} {len(self.quantized)} weight matrices, {q:,} parameters = "
                 f"{self.share:.1%} of the model's matrix parameters"]
        for why, (k, n) in sorted(self.reasons().items(), key=lambda r: -r[1][1]):
            which = [name for name, (_, w) in self.kept.items() if w == why]
            more = f", ... (+{len(which) - names})" if len(which) > names else ""
            lines.append(f"  kept in full precision: {k} {why} ({n:,} parameters): "
                         f"{', '.join(which[:names])}{more}")
        if self.few_tokens:
            few = [f"{k}: {n}" for k, n in list(self.few_tokens.items())[:names]]
            more = f", ... (+{len(self.few_tokens) - names})" if len(self.few_tokens) > names \
                else ""
            lines.append(f"  {len(self.few_tokens)} experts calibrated on fewer tokens than "
                         f"their input width (Hessian pulled toward their layer's): "
                         f"{', '.join(few)}{more}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"share": round(self.share, 6),
                "quantized_parameters": sum(self.quantized.values()),
                "kept": {why: {"matrices": k, "parameters": n}
                         for why, (k, n) in self.reasons().items()},
                "uncovered": self.uncovered, "few_tokens": self.few_tokens}


def coverage(model: nn.Module, selected: list[Matrix], skipped: dict[str, str]) -> Coverage:
    """The coverage of quantizing `selected` (`skipped`: matrix param name -> why not: the
    filter, a `None` config). Quantized weights already in the model count as quantized."""
    from .capture import find_blocks
    chosen = {id(mx.module._parameters[mx.param]) for mx in selected}
    routed, embeddings = routers(model), _embeddings(model)
    covered = {mx.param_name for mx in candidates(model)} | chosen
    try:
        in_blocks = {id(p) for p in find_blocks(model)[1].parameters()}
    except ValueError:
        in_blocks = set()
    out, seen = Coverage(), set()
    owners = dict(_owners(model))
    for name, p in model.named_parameters(remove_duplicate=False):
        module = owners[name]
        if p.dim() < 2 or id(p) in seen or (is_experts(module) and name.endswith("_bias")):
            continue  # vectors: norms, biases (an experts module's are one row per expert)
        seen.add(id(p))
        if id(p) in chosen or isinstance(p, QuantizedTensor):
            out.quantized[name] = p.numel()
        elif name in skipped:
            out.kept[name] = (p.numel(), skipped[name])
        elif module in routed:
            out.kept[name] = (p.numel(), "routers")
        elif module in embeddings:
            out.kept[name] = (p.numel(), embeddings[module])
        elif name in covered:
            out.kept[name] = (p.numel(), "left out by filter_fn")
        else:
            out.kept[name] = (p.numel(), f"{p.dim()}-D parameters no rule covers")
            if id(p) in in_blocks:
                out.uncovered.append(name)
    return out


def _owners(model: nn.Module):
    for fqn, m in model.named_modules(remove_duplicate=False):
        for pname in m._parameters:
            yield _join(fqn, pname), m


def _embeddings(model: nn.Module) -> dict[nn.Module, str]:
    out = {m: "embeddings" for m in model.modules() if isinstance(m, nn.Embedding)}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(emb, nn.Module):
        out[emb] = "token embeddings"
    return out


def matrix_parameters(model: nn.Module) -> int:
    """Parameters in matrices (≥ 2 dimensions), each tensor once."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.dim() >= 2 and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def tied_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(output head, token embedding) when they share one weight, else None."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return None
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, nn.Module) and isinstance(emb, nn.Module) \
            and getattr(head, "weight", None) is not None and head.weight is emb.weight:
        return head, emb
    return None


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """The nn.Linear a Conv1D is (weight transposed to [N, K], the bias shared)."""
    W = conv.weight.detach()  # [K, N]
    lin = nn.Linear(W.shape[0], W.shape[1], bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(W.t().contiguous() if not W.is_meta
                              else torch.empty(W.shape[1], W.shape[0], dtype=W.dtype,
                                               device="meta"),
                              requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = conv.bias
    lin.discq_from_conv1d = True  # a streaming run reads its weight transposed from disk
    return lin
