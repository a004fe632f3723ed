"""Layer-by-layer calibration: Hessians of every linear input, with each block's inputs taken
from the already-quantized blocks before it.

Decoder blocks are found generically: the longest `nn.ModuleList` whose children hold
`nn.Linear` layers. Inside a block, linears that read the same input tensor (q/k/v, or gate/up)
form a group; groups are quantized in execution order ("true sequential"), so o_proj's Hessian
is taken from the outputs of the quantized q/k/v. Only one block's activations for the
calibration set are alive at a time; the model is never copied.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .hessian import HessianAccumulator
QuantizeLayer = Callable[[str, nn.Linear, torch.Tensor], None]


from .hessian import StopForward as _StopForward


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(fqn, blocks) of the longest ModuleList of modules containing nn.Linear."""
    best = None
    for fqn, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(
                any(isinstance(c, nn.Linear) for c in b.modules()) for b in m):
            if best is None or len(m) > len(best[1]):
                best = (fqn, m)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks holding nn.Linear layers;"
                         f" layer-by-layer methods need repeated blocks (decoder layers)")
    return best


def block_inputs(model: nn.Module, blocks: nn.ModuleList, batches) -> list[tuple[list, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in batches:
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _set_hidden(args: list, kwargs: dict, h: torch.Tensor) -> None:
    if args:
        args[0] = h
    else:
        kwargs["hidden_states"] = h


@torch.no_grad()
def run_block(block: nn.Module, inputs, *, update: bool) -> None:
    """Run the block over every batch; with update=True its outputs become the inputs. A
    forward that raises _StopForward (a hook that has seen what it needs) ends that batch."""
    for args, kwargs in inputs:
        try:
            out = _hidden(block(*args, **kwargs))
        except _StopForward:
            continue
        if update:
            _set_hidden(args, kwargs, out)


@torch.no_grad()
def linear_groups(block: nn.Module, targets: dict[nn.Module, str], inputs) -> list[list[nn.Linear]]:
    """The block's target linears grouped by shared input tensor, in execution order."""
    order: list[tuple[torch.Tensor, nn.Linear]] = []  # holding the tensors keeps them distinct
    hooks = [m.register_forward_hook(lambda m, a, o: order.append((a[0], m)))
             for m in block.modules() if m in targets]
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[tuple[torch.Tensor, list[nn.Linear]]] = []
    for x, m in order:
        group = next((g for t, g in groups if t is x), None)
        if group is None:
            groups.append((x, [m]))
        elif m not in group:
            group.append(m)
    return [g for _, g in groups]


def _quantize_group(block, group, targets, inputs, quantize_layer) -> None:
    """The linears of a group read the same input, so one Hessian serves them all, and the
    block's forward can stop as soon as that input exists (the rest of the block is skipped)."""
    acc = HessianAccumulator(group[0], targets[group[0]], stop_after=True)
    try:
        run_block(block, inputs, update=False)
    finally:
        H = acc.remove()
    for m in group:
        quantize_layer(targets[m], m, H)


@torch.no_grad()
def sequential_quantize(model: nn.Module, batches, targets: list[tuple[str, nn.Linear]],
                        quantize_layer: QuantizeLayer, *, true_sequential: bool = True,
                        desc: str = "quantizing") -> None:
    """Call `quantize_layer(fqn, linear, H)` for every target, block by block."""
    by_module = {m: fqn for fqn, m in targets}
    _, blocks = find_blocks(model)
    inputs = block_inputs(model, blocks, batches)
    for block in tqdm(blocks, desc=desc, unit="block"):
        inner = {m: by_module[m] for m in block.modules() if m in by_module}
        if inner:
            groups = linear_groups(block, inner, inputs) if true_sequential else [list(inner)]
            for group in groups:
                _quantize_group(block, group, inner, inputs, quantize_layer)
        run_block(block, inputs, update=True)
    del inputs
    _quantize_outside_blocks(model, blocks, batches, by_module, quantize_layer)


def _quantize_outside_blocks(model, blocks, batches, by_module, quantize_layer) -> None:
    """Linears outside the blocks (e.g. the head): Hessians from a full forward pass of the
    model whose blocks are already quantized."""
    in_blocks = {m for b in blocks for m in b.modules()}
    rest = [m for m in by_module if m not in in_blocks]
    if not rest:
        return
    accs = [HessianAccumulator(m, by_module[m]) for m in rest]
    device = next(model.parameters()).device
    try:
        for ids in batches:
            model(ids.to(device), use_cache=False)
    finally:
        Hs = [a.remove() for a in accs]
    for m, H in zip(rest, Hs):
        quantize_layer(by_module[m], m, H)
