"""Reusing the outputs of a block's sub-modules that can no longer change.

True-sequential quantization runs each block's forward several times: once per group of linears
(to take that group's Hessian from the already-quantized groups before it), then once more to
compute the block's outputs. Once every target linear inside a direct child of the block (e.g.
`self_attn`) and every target that runs before it is quantized, that child's output on a given
batch is fixed, so the later passes take it from memory instead of recomputing attention. It
costs one stored output per batch for the child (the size of the block's inputs).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map


def _clone(x: Any) -> Any:
    # a clone each way: a caller modifying the output in place must not corrupt the store
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, x)


class FrozenChildren:
    """Memoizes, per calibration batch, the outputs of the block's frozen direct children.

    `events` is the block's call order: the target linears and the direct children, each at its
    first call (from one traced forward). `batch` must be set before each batch's forward."""

    def __init__(self, block: nn.Module, targets: set[nn.Module], events: list[nn.Module]):
        self.block, self.targets, self.batch = block, targets, 0
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

    def freeze(self, done: set[nn.Module]) -> None:
        """Start memoizing every child whose output no longer depends on a target not in `done`."""
        for c in self.candidates():
            if c in self.stores:
                continue
            inside = {m for m in c.modules() if m in self.targets}
            before = {t for t in self.targets if self.first.get(t, -1) < self.first[c]}
            if (inside | before) <= done:
                self._wrap(c)

    def _wrap(self, child: nn.Module) -> None:
        store: dict[int, Any] = {}
        self.stores[child] = store
        if "forward" in vars(child):  # e.g. accelerate's hooks: put back as found
            self.shadowed[child] = vars(child)["forward"]
        original = child.forward

        def forward(*args, **kwargs):
            if self.batch in store:
                return _clone(store[self.batch])
            out = original(*args, **kwargs)
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
