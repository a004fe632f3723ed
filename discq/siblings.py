"""Quantized linears that read the same input, run as one kernel call (q/k/v, gate/up).

A decode step on a few CPU cores is ~200 kernel calls of tens of microseconds, each with fixed
costs beside its weight bytes: the dispatch, a parallel region and its barrier, rounding the
activations. A transformer layer reads its normed input with three projections (q, k, v) and
its MLP input with two (gate, up): `fuse_siblings` makes each such run of calls one call over
the weights stacked along the output channels (the format's `stack_outputs`), so SmolLM2's 7
calls a layer become 4, with longer weight streams for the threads to share.

Which linears share an input is found by running the model once (`run`) with a hook on every
`PlainLinear`: consecutive calls on the same tensor, unchanged between them, form a group. The
model's code is not touched: the group's first call computes every member's output and keeps
the parts until the last member has taken its own. The outputs are those of the separate calls
(bit for bit with 8-bit activations, whose kernel computes each output channel on its own; up
to the order of float sums otherwise). The stacked weights are copies: the view holds them
besides the model's own tensors (the decoder's views share one set).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor, nn

from discq.inference import PlainLinear


class SiblingGroup(nn.Module):
    """The stacked linear of a group and, during one forward, its input and output parts."""

    def __init__(self, fused: PlainLinear, sizes: list[int]):
        super().__init__()
        self.fused, self.sizes = fused, sizes
        self.x: Tensor | None = None
        self.parts: tuple[Tensor, ...] | None = None


class SiblingLinear(nn.Module):
    """Member `i` of a group: its slice of the group's one call."""

    def __init__(self, group: SiblingGroup, i: int, in_features: int):
        super().__init__()
        self.group, self.i = group, i
        self.in_features, self.out_features = in_features, group.sizes[i]

    def forward(self, x: Tensor) -> Tensor:
        g = self.group
        if g.x is not x:  # the first member called on this input computes them all
            g.x, g.parts = x, g.fused(x).split(g.sizes, dim=-1)
        y = g.parts[self.i]
        if self.i == len(g.sizes) - 1:  # the last member: nothing stays referenced
            g.x = g.parts = None
        return y


def _calls(view: nn.Module, run: Callable[[nn.Module], object]) -> list[tuple[str, Tensor, int]]:
    """(name, input, its version) of every PlainLinear call of run(view), in order."""
    calls, hooks = [], []
    for name, m in view.named_modules():
        if isinstance(m, PlainLinear):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, args, name=name: calls.append((name, args[0], args[0]._version))))
    try:
        with torch.no_grad():
            run(view)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _groups(calls: list[tuple[str, Tensor, int]]) -> list[list[str]]:
    """Runs of consecutive calls on one unchanged input, of linears called once each."""
    once = {n for n, k in Counter(n for n, *_ in calls).items() if k == 1}
    groups, prev = [], None
    for name, x, version in calls:
        if prev is not None and x is prev[1] and version == prev[2] and name in once:
            groups[-1].append(name)
        else:
            groups.append([name] if name in once else [])
        prev = (name, x, version)
    return [g for g in groups if len(g) > 1]


def _stacked_bias(members: list[PlainLinear]) -> Tensor | None:
    if all(m.bias is None for m in members):
        return None
    like = next(m.bias for m in members if m.bias is not None)
    return torch.cat([m.bias.detach() if m.bias is not None
                      else like.new_zeros(m.out_features) for m in members])


def fuse_siblings(view: nn.Module, run: Callable[[nn.Module], object]) -> int:
    """In place on an inference view (`discq.inference.plain_linears`): each group of
    PlainLinears that `run(view)` calls one after another on the same input becomes one call,
    where the format can stack the weights and the members agree on their op. Returns the
    number of groups fused."""
    fused = 0
    for names in _groups(_calls(view, run)):
        members = [view.get_submodule(n) for n in names]
        weights = [m.source[0] for m in members]
        W = type(weights[0]).stack_outputs(weights)
        if W is None or len({(type(m.source[0]), m.op) for m in members}) != 1:
            continue
        group = SiblingGroup(PlainLinear(W, _stacked_bias(members),
                                         members[0].int8_activations),
                             [m.out_features for m in members])
        for i, name in enumerate(names):
            parent, _, leaf = name.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, leaf,
                    SiblingLinear(group, i, members[i].in_features))
        fused += 1
    return fused
