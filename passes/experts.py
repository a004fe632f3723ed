"""Mixture-of-experts layers: their stacked expert weights as linears while a method rounds
them, and as one `ExpertsQuantizedTensor` per stack afterwards.

transformers 5 keeps the routed experts of a layer in one module (`MixtralExperts`,
`Qwen3MoeExperts`, `GptOssExperts`, ...: the classes its experts interface decorates) holding
3-D parameters: `gate_up_proj [E, 2I, H]` (or `up_proj` without a gate) and `down_proj
[E, H, I]`, transposed in some families (gpt-oss: [E, H, 2I]), with optional biases
`<name>_bias [E, N]`. The module's flags (`has_gate`, `has_bias`, `is_transposed`,
`has_post_expert_norm`) and its `_apply_gate` describe the computation.

While `quantize_` runs, such a module is *exploded*: each stack becomes an `nn.ModuleList` of E
`nn.Linear` under the same name (`experts.gate_up_proj.3`), and the module's forward sends each
expert's routed tokens through its linears. Every method then sees experts as it sees any
layer: the block driver's Hessian of an expert comes from the tokens routed to it (or, with
`calibrate_all`, from every token, while the output still follows the router), DiscQuant
relaxes them, fine-tuning trains around them. Afterwards each stack is *restacked*: its E
quantized weights become one `ExpertsQuantizedTensor` parameter under the original name, and
the module's forward runs both projections as `discq::experts_linear` ops (one op per
projection, fixed shapes: it compiles whole and exports).

Both forwards are the module's own class with the forward replaced (a subclass made once per
class), so everything else of the module (`_apply_gate`, `act_fn`, clamping limits) is kept.
"""
from __future__ import annotations

import functools

import torch
from discq.tensors.base import QuantizedTensor
from discq.tensors.experts import ExpertsQuantizedTensor
from torch import Tensor, nn

from .inspect import set_layer_config

STACKS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' names, in call order


def is_experts(module: nn.Module) -> bool:
    """A transformers experts module (3-D expert stacks plus the experts interface's flags)."""
    return hasattr(module, "num_experts") and hasattr(module, "has_gate") and bool(
        stack_names(module))


def stack_names(module: nn.Module) -> list[str]:
    """The expert stacks the module holds (parameters or, exploded, lists of linears)."""
    out = []
    for name in STACKS:
        p = module._parameters.get(name)
        if (p is not None and p.dim() == 3) or isinstance(module._modules.get(name), ExpertLinears):
            out.append(name)
    return out


def is_stack_quantized(module: nn.Module, name: str) -> bool:
    return isinstance(module._parameters.get(name), ExpertsQuantizedTensor)


class ExpertLinears(nn.ModuleList):
    """One stack exploded: expert e's weight as an nn.Linear [N, K] (`transposed`: the stack
    stores [K, N] per expert)."""

    def __init__(self, linears, transposed: bool, original: nn.Parameter,
                 bias: nn.Parameter | None):
        super().__init__(linears)
        self.transposed = transposed
        # what undo() puts back; not submodules or parameters of this list
        self.__dict__["_original"], self.__dict__["_original_bias"] = original, bias


# ---- explode / restack ----------------------------------------------------------------------

def explode(module: nn.Module, names: list[str], calibrate_all: bool = False) -> None:
    """Stacks `names` of an experts module become lists of E linears (views of the stacked
    weights, no copy unless transposed); the module's forward routes through them."""
    transposed = bool(getattr(module, "is_transposed", False))
    for name in names:
        W = module._parameters[name]
        bias = module._parameters.get(f"{name}_bias") if getattr(module, "has_bias", False) \
            else None
        linears = []
        for e in range(W.shape[0]):
            w = W.detach()[e]
            w = w.t().contiguous() if transposed else w  # [N, K]
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach()[e], requires_grad=bias.requires_grad)
            linears.append(lin)
        del module._parameters[name]
        if bias is not None:
            del module._parameters[f"{name}_bias"]
        module._modules[name] = ExpertLinears(linears, transposed, W, bias)
    module.discq_calibrate_all = calibrate_all
    module.__class__ = _variant(_base_class(type(module)), "exploded")


def fill_stack(stack: ExpertLinears, W: Tensor, bias: Tensor | None = None) -> None:
    """Give an exploded stack the weights of the stacked tensor W (and bias) read from disk."""
    for e, lin in enumerate(stack):
        w = W[e].t().contiguous() if stack.transposed else W[e]
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[e], requires_grad=False)
    stack.__dict__["_original"] = nn.Parameter(W, requires_grad=False)
    if bias is not None:
        stack.__dict__["_original_bias"] = nn.Parameter(bias, requires_grad=False)


def restack(module: nn.Module) -> None:
    """Every exploded stack back to one parameter: an `ExpertsQuantizedTensor` where its
    experts were quantized, else the original stacked parameter."""
    for name in [n for n in STACKS if isinstance(module._modules.get(n), ExpertLinears)]:
        _restack(module, name, module._modules.pop(name))
    module.__dict__.pop("discq_calibrate_all", None)
    quantized = any(is_stack_quantized(module, n) for n in STACKS)
    module.__class__ = _variant(_base_class(type(module)), "stacked") if quantized \
        else _base_class(type(module))


def _restack(module: nn.Module, name: str, linears: ExpertLinears) -> None:
    """One stack back: its weight (and config, token counts, biases) on the module."""
    weights = [lin.weight for lin in linears]
    quantized = [isinstance(w, QuantizedTensor) for w in weights]
    if all(quantized):
        module._parameters[name] = nn.Parameter(
            ExpertsQuantizedTensor.stack(weights, linears.transposed), requires_grad=False)
        set_layer_config(module, name, getattr(linears[0], "discq_config", None))
        tokens = [getattr(lin, "discq_tokens", None) for lin in linears]
        if None not in tokens:  # what each expert was calibrated on
            K = linears[0].in_features
            module.__dict__.setdefault("discq_expert_tokens", {})[name] = (K, tokens)
    elif not any(quantized):
        module._parameters[name] = linears._original
    else:
        raise ValueError(f"stack {name!r} has quantized and full-precision experts: the "
                         f"experts of one stack are quantized together")
    if linears._original_bias is not None:  # fine-tuning may have moved the biases
        bias = torch.stack([lin.bias.detach() for lin in linears])
        module._parameters[f"{name}_bias"] = nn.Parameter(
            bias, requires_grad=linears._original_bias.requires_grad)


def undo(module: nn.Module) -> None:
    """Put every exploded stack back exactly as it was (a failed or interrupted run)."""
    for name in [n for n in STACKS if isinstance(module._modules.get(n), ExpertLinears)]:
        linears = module._modules.pop(name)
        module._parameters[name] = linears._original
        if linears._original_bias is not None:
            module._parameters[f"{name}_bias"] = linears._original_bias
    module.__dict__.pop("discq_calibrate_all", None)
    module.__class__ = _base_class(type(module))


def use_stacked_forward(module: nn.Module) -> None:
    """An experts module whose stacks are (or will be, when loading) `ExpertsQuantizedTensor`s
    runs discq's forward."""
    module.__class__ = _variant(_base_class(type(module)), "stacked")


def _base_class(cls: type) -> type:
    return getattr(cls, "_discq_base", cls)


@functools.cache
def _variant(base: type, kind: str) -> type:
    mixin = {"exploded": _ExplodedForward, "stacked": _StackedForward}[kind]
    return type(f"{base.__name__}", (mixin, base), {"_discq_base": base,
                                                    "__module__": base.__module__})


# ---- the two forwards -------------------------------------------------------------------

def _first(module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _activate(module, h: Tensor) -> Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


class _ExplodedForward:
    """Routed tokens through each expert's linears (hooks on them see the expert's inputs).
    Every expert's first projection runs before any expert's second, so a method rounds all
    first projections of the layer before it measures what the second ones receive."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        every = getattr(self, "discq_calibrate_all", False)
        # every expert is called, with no rows if no token is routed to it: the block driver
        # sees each expert's linears in every forward, in the same order
        routes = [(e, *torch.where(top_k_index == e)) for e in range(self.num_experts)]
        first, mids = getattr(self, _first(self)), []
        for e, token, _ in routes:  # every token, or the routed ones
            mids.append(_activate(self, first[e](hidden_states if every else hidden_states[token])))
        for (e, token, pos), h in zip(routes, mids):
            y = self.down_proj[e](h)
            y = y[token] if every else y
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            out.index_add_(0, token, (y * top_k_weights[token, pos, None]).float())
        return out.to(hidden_states.dtype)


class _StackedForward:
    """Both projections as one gathered op each over the (token, expert) pairs: fixed shapes,
    no data-dependent Python, so `torch.compile(fullgraph=True)` and export take it whole."""

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                    top_k_weights: Tensor) -> Tensor:
    """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]: the experts
    interface's contract, for quantized or full-precision stacks."""
    T, k = top_k_index.shape
    ids = top_k_index.reshape(-1)                       # [S = T·k]
    x = hidden_states.repeat_interleave(k, dim=0)       # [S, H]
    h = _activate(module, project(module, _first(module), x, ids))
    y = project(module, "down_proj", h, ids)            # [S, H]
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    return y.view(T, k, -1).float().sum(dim=1).to(hidden_states.dtype)


def project(module: nn.Module, name: str, x: Tensor, ids: Tensor) -> Tensor:
    """x [S, K] through stack `name`, row s by expert ids[s] (plus its bias)."""
    W = getattr(module, name)
    if isinstance(W, ExpertsQuantizedTensor):
        y = W.experts_linear(x, ids)
    else:  # a full-precision stack: gather each row's expert weight
        Wg = W[ids]                                     # [S, N, K] or [S, K, N]
        y = torch.bmm(x.unsqueeze(1), Wg).squeeze(1) if module.is_transposed \
            else torch.bmm(Wg, x.unsqueeze(-1)).squeeze(-1)
    bias = getattr(module, f"{name}_bias", None) if getattr(module, "has_bias", False) else None
    return y if bias is None else y + bias[ids].to(y.dtype)
