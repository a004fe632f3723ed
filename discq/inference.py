"""An inference view of a quantized model whose compiled programs check few guards.

Under `torch.compile`, every quantized weight (a tensor subclass) is guarded in Python on each
call (its flattened metadata), ~10 µs a weight: 2 ms a token for SmolLM2's 211 linears, as much
as a fifth of a decode step. `plain_linears(model)` returns a view of the model, sharing every
parameter and buffer, in which each `nn.Linear` with a quantized weight is a `PlainLinear`: the
weight's stored tensors as plain buffers and the format's op called on them directly (what
`F.linear` with the weight lowers to, from the format's `linear_call`, or the format's
`inference_call` where it has one: QTIP's and QuIP#'s whole CPU linear as one C++ op, which the
compiled program calls without Python), so the compiled program guards plain tensors in C++.
The view computes what the model computes (up to float summation order).

`plain_linears(model, int8_activations=True)` instead calls each format's 8-bit-activation twin
where it has one (`discq.tensors.ops.INT8_ACTIVATIONS`: the affine grid's
`discq::affine_linear_q8`, activations rounded per block of 32 as llama.cpp's Q8_0, integer dot
products): faster on CPU, at a small, measured cost in accuracy. Other formats, and layers whose
input is not whole blocks of 32, keep float activations.
"""
from __future__ import annotations

import copy
import itertools

from torch import Tensor, nn

from discq.tensors.base import QuantizedTensor
from discq.tensors.ops import INT8_ACTIVATIONS


class _Slot:
    """A placeholder in linear_call's argument template: x, bias or a stored tensor."""

    def __init__(self, name: str):
        self.name = name


class PlainLinear(nn.Module):
    """`F.linear(x, W, bias)` for a quantized W, as its format's op over plain tensors."""

    def __init__(self, weight: QuantizedTensor, bias: Tensor | None,
                 int8_activations: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.int8_activations = int8_activations
        if bias is None or isinstance(bias, nn.Parameter):
            self.bias = bias  # the model's own parameter, shared
        else:
            self.register_buffer("bias", bias, persistent=False)
        self.source = (weight,)  # for discq.siblings (in a tuple: not a registered parameter)
        for n, t in weight.stored_tensors().items():
            self.register_buffer(n, t, persistent=False)
        # the op and its arguments, with placeholders for x, bias and each stored tensor
        self.op, args = weight.inference_call(_Slot("x"), _Slot("bias"),
                                              {n: _Slot(n) for n in weight.stored_tensors()})
        if int8_activations and self.in_features % 32 == 0:  # whole blocks of 32 inputs
            self.op = INT8_ACTIVATIONS.get(self.op, self.op)  # the same arguments
        for i, a in enumerate(args):  # a constant tensor (a format's table) becomes a buffer
            if isinstance(a, Tensor):
                self.register_buffer(f"constant_{i}", a, persistent=False)
        # (is a slot, its name or the constant itself)
        self.args = tuple((True, a.name) if isinstance(a, _Slot) else
                          (True, f"constant_{i}") if isinstance(a, Tensor) else (False, a)
                          for i, a in enumerate(args))

    def forward(self, x: Tensor) -> Tensor:
        args = []
        for slot, a in self.args:
            args.append(x if a == "x" else self.bias if a == "bias" else getattr(self, a)
                        if slot else a)
        return self.op(*args)


def shared_copy(model: nn.Module, leave_out: tuple = ()) -> nn.Module:
    """A copy of the module tree sharing every tensor (parameters, buffers and the weights the
    PlainLinears were made from); attributes in `leave_out` (objects) become None in the copy."""
    tensors = itertools.chain(model.parameters(), model.buffers(),
                              (m.source[0] for m in model.modules() if isinstance(m, PlainLinear)))
    memo = {id(t): t for t in tensors}
    memo.update({id(o): None for o in leave_out})
    return copy.deepcopy(model, memo)


def plain_linears(model: nn.Module, leave_out: tuple = (), int8_activations: bool = False
                  ) -> nn.Module:
    """A copy of the module tree sharing every tensor, quantized linears made `PlainLinear`
    (with `int8_activations`, on their formats' 8-bit-activation ops where they have one);
    attributes in `leave_out` (objects) are not copied (they become None in the view)."""
    view = shared_copy(model, leave_out)
    for name, m in list(view.named_modules()):
        if isinstance(m, nn.Linear) and isinstance(m.weight, QuantizedTensor):
            parent, _, leaf = name.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, leaf,
                    PlainLinear(m.weight, m.bias, int8_activations))
    return view
