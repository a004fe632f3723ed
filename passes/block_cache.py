"""Reusing the outputs of a block's sub-modules that can no longer change.

True-sequential quantization runs each block's forward several times: once per group of linears
(to take that group's Hessian from the already-quantized groups before it), then once more to
compute the block's outputs. Once every target linear inside a direct child of the block (e.g.
`self_attn`) and every target that runs before it is quantized, that child's output on a given
batch is fixed, so the later passes take it from memory instead of recomputing attention. It
costs one stored output per batch for the child (the size of the block's inputs).

A child that returns the output of one of its target linears L (attention ends in o_proj, the
MLP in down_proj) is cheaper still: the pass that takes L's Hessian stops at L's input, which is
kept, and once L is rounded the child's output is L(input): attention's q/k/v and scores are not
computed again for the MLP's Hessians, nor gate/up for the block's outputs. The kept input is
dropped when the child's output is stored (the MLP's, kept for the final pass only, is up to
the largest layer input's width per token: what the memory plan counts for calibration).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map


def hidden_state(out) -> torch.Tensor:
    """The hidden state in what a block (or a child) returns: a tensor, or a tuple with it
    first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def like(template, h: torch.Tensor):
    """h in the container `template` is (a tensor, or a tuple with the hidden state first)."""
    return (h, *template[1:]) if isinstance(template, (tuple, list)) else h


def returns_linear_output(out, linear_outputs: dict) -> nn.Module | None:
    """The linear whose output `out` (a child's output) is, if the rest of it is None (an
    attention's weights when not asked for): then the child's output is that linear's."""
    if isinstance(out, (tuple, list)) and any(o is not None for o in out[1:]):
        return None
    h = hidden_state(out)
    return next((m for m, o in linear_outputs.items() if o is h), None)


def _clone(x: Any) -> Any:
    # a clone each way: a caller modifying the output in place must not corrupt the store
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, x)


class FrozenChildren:
    """Memoizes, per calibration batch, the outputs of the block's frozen direct children.

    `events` is the block's call order: the target linears and the direct children, each at its
    first call (from one traced forward). `batch` must be set before each batch's forward."""

    def __init__(self, block: nn.Module, targets: set[nn.Module], events: list[nn.Module],
                 produced: dict | None = None):
        self.block, self.targets, self.batch = block, targets, 0
        # child -> (L, the child's output with None for L's): the child returns L's output
        self.produced: dict[nn.Module, tuple[nn.Module, Any]] = produced or {}
        self.inputs: dict[nn.Module, dict[int, torch.Tensor]] = {}  # L -> batch -> L's input
        self.calls = {m: events.count(m) for m in block.children()}
        self.first: dict[nn.Module, int] = {}
        for i, m in enumerate(events):
            self.first.setdefault(m, i)
        self.stores: dict[nn.Module, dict[int, Any]] = {}
        self.shadowed: dict[nn.Module, Any] = {}  # a forward already set on the instance

    def candidates(self) -> list[nn.Module]:
        """Children worth memoizing: called once per forward, holding linears, not one itself."""
        return [c for c in self.block.children() if self.calls.get(c) == 1
                and not isinstance(c, nn.Linear)
                and any(isinstance(m, nn.Linear) for m in c.modules())]

    def freeze(self, done: set[nn.Module], last: bool = False) -> None:
        """Start memoizing every child whose output no longer depends on a target not in `done`.
        `last`: only the block's outputs remain to be computed, so only children whose output
        comes from a kept input are taken over (and their outputs are not stored)."""
        for c in self.candidates():
            if c in self.stores or (last and not self._kept(c)):
                continue
            inside = {m for m in c.modules() if m in self.targets}
            before = {t for t in self.targets if self.first.get(t, -1) < self.first[c]}
            if (inside | before) <= done:
                self._wrap(c, keep=not last)

    def _kept(self, child: nn.Module) -> dict[int, torch.Tensor]:
        """The kept inputs (per batch) of the linear whose output `child` returns."""
        L = self.produced.get(child, (None, None))[0]
        return self.inputs.get(L, {}) if L is not None else {}

    def record_inputs(self, first: nn.Module):
        """Keep `first`'s input per batch when a child returns `first`'s output; the hook's
        handle, or None. Register it before the Hessian's hook, which stops the forward."""
        if not any(L is first for L, _ in self.produced.values()):
            return None
        kept = self.inputs.setdefault(first, {})

        def keep(module, args):
            kept[self.batch] = args[0].detach().clone()

        return first.register_forward_pre_hook(keep)

    def _wrap(self, child: nn.Module, keep: bool = True) -> None:
        store: dict[int, Any] = {}
        self.stores[child] = store
        if "forward" in vars(child):  # e.g. accelerate's hooks: put back as found
            self.shadowed[child] = vars(child)["forward"]
        original = child.forward
        L, template = self.produced.get(child, (None, None))
        kept = self._kept(child)

        def forward(*args, **kwargs):
            if self.batch in store:
                return _clone(store[self.batch])
            if self.batch in kept:  # the child's output is L(input): the rest is skipped
                out = like(template, L(kept.pop(self.batch)))
            else:
                out = original(*args, **kwargs)
            if keep:
                store[self.batch] = _clone(out)
            return out

        child.forward = forward  # instance attribute: shadows the class's forward until close()

    def close(self) -> None:
        """Restore the children's own forward and free the stored outputs."""
        for c in self.stores:
            if c in self.shadowed:
                c.forward = self.shadowed[c]
            else:
                del c.forward
        self.stores.clear()
        self.shadowed.clear()
        self.inputs.clear()
