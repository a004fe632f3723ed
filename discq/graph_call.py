"""A compiled token step called straight through its graph after its first call.

A call of a `torch.compile`d function goes through Dynamo every time: the bytecode before the
graph fetches every tensor the graph reads (each weight of the model, through its chain of module
attributes) and the frame handling around it costs as much again, ~0.6 ms a call for SmolLM2's
~600 tensors, a tenth of a token step on 2 cores. A decoder's step reads the same tensors on
every call (its view's weights, its static cache) and only its arguments change, so after the
first call, which compiles through Dynamo, `GraphCall` calls the compiled graph itself (with
AOTAutograd's wrappers, which apply the cache's in-place updates) on the tensors it was compiled
with, the new arguments put in the old ones' places.

Only a graph that Dynamo called with tensors alone, read each argument from one input and
returns one tensor is called this way; anything else keeps going through Dynamo.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class GraphCall:
    """`torch.compile(fn, fullgraph=True)` without guards, Dynamo skipped after the first call.

    The caller promises what the skipped guards would have checked: later calls pass tensors of
    the first call's shapes, dtypes and devices (None where it passed None), and the tensors that
    `fn` reads besides its arguments stay the same objects."""

    def __init__(self, fn: Callable, name: str, config_patches: dict | None = None):
        from discq.decode import compile_apart
        self._graph: tuple | None = None  # (compiled graph, its inputs, its output count)
        self._direct: Callable | None = None

        def backend(gm, example_inputs, **_):
            from torch._inductor.compile_fx import compile_fx
            compiled = compile_fx(gm, example_inputs, config_patches=config_patches or {})
            out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            # a second graph (a graph break) would not be the whole function: never direct
            self._graph = None if self._graph else (compiled, list(example_inputs), out)
            return compiled

        self.compiled = compile_apart(fn, name, {"guard_filter_fn":
                                                 torch.compiler.skip_all_guards_unsafe}, backend)

    def __call__(self, *args: Tensor | None) -> Tensor:
        if self._direct is not None:
            return self._direct(args)
        y = self.compiled(*args)
        self._direct = self._bind(args)
        return y

    def _bind(self, args: tuple) -> Callable | None:
        """The direct call of the graph, or None when it does not qualify (module docstring)."""
        if self._graph is None:
            return None
        compiled, inputs, out = self._graph
        if not all(isinstance(t, Tensor) for t in inputs) or not (
                isinstance(out, (tuple, list)) and len(out) == 1):
            return None
        slots = []  # (argument index, input index)
        for a, arg in enumerate(args):
            found = [k for k, t in enumerate(inputs) if t is arg]
            if arg is not None and len(found) != 1:
                return None
            if arg is not None:
                slots.append((a, found[0]))

        def direct(call_args: tuple) -> Tensor:
            flat = list(inputs)
            for a, k in slots:
                flat[k] = call_args[a]
            return compiled(*flat)[0]
        return direct
