"""`ExpertsQuantizedTensor`: the E experts of a mixture-of-experts layer, one quantized weight
each, stacked as one tensor (transformers 5 stores routed experts as one 3-D parameter,
`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`).

Every expert is a weight of one inner format (affine, E8P lattice, trellis, GGUF blocks, ...)
with the same attributes; each of the inner format's stored tensors gains a leading expert
dimension (`qdata [E, ...]`, `scale [E, ...]`). So the stacked tensor saves, loads, moves and
compiles like any format, `W[e]` is expert e's weight in the inner format (views, nothing
copied), and its codes are the inner format's bytes (GGUF's `ffn_*_exps` tensors are these
rows, expert after expert).

The matmul is `discq::experts_linear(x, ids, ...)`: row s of x through expert ids[s], each
expert's rows by the inner format's own kernel; a single op node for compile and export, whose
Python loop over the experts present runs inside it.

Attributes: `inner` (the inner format's name), `inner_attributes` (its attributes, as JSON),
`parts` (the stored tensors present), `shape` (the parameter's shape as the model declares
it: [E, N, K], or [E, K, N] with `transposed`, e.g. gpt-oss), `dtype`, `transposed`.
"""
from __future__ import annotations

import functools
import json

import torch
from torch import Tensor

from .base import FORMATS, QuantizedTensor, register_format


@register_format("experts")
class ExpertsQuantizedTensor(QuantizedTensor):
    tensor_data_names: list[str] = []  # per instance: the inner format's parts (`parts`)
    tensor_attribute_names = ["inner", "inner_attributes", "parts", "shape", "dtype",
                              "transposed"]

    def __new__(cls, *args):
        tensors, (_, _, _, shape, dtype, _) = args[:-6], args[-6:]
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype,
                                                   device=tensors[0].device, requires_grad=False)

    def __init__(self, *args):
        """ExpertsQuantizedTensor(*stacked parts, inner, inner_attributes, parts, shape, dtype,
        transposed): the tensors in the order of `parts` (torchao rebuilds it this way)."""
        tensors, attrs = args[:-6], args[-6:]
        self.inner, self.inner_attributes, parts, _, _, self.transposed = attrs
        self.parts = tuple(parts)
        self.tensor_data_names = list(self.parts)
        for name, t in zip(self.parts, tensors):
            setattr(self, name, t)

    @classmethod
    def __tensor_unflatten__(cls, tensors, attributes, outer_size, outer_stride):
        return cls(*[tensors[n] for n in attributes["parts"]],
                   *[attributes[n] for n in cls.tensor_attribute_names])

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def stack(cls, experts: list[QuantizedTensor], transposed: bool = False
              ) -> ExpertsQuantizedTensor:
        """One tensor of `experts` (2-D weights [N, K] of one format and the same attributes);
        `transposed`: the model stores each expert as [K, N]."""
        if not experts or not all(isinstance(w, QuantizedTensor) for w in experts):
            raise TypeError("stack takes a non-empty list of discq quantized weights")
        first = experts[0]
        parts = tuple(first.stored_tensors())
        for e, w in enumerate(experts[1:], 1):
            if type(w) is not type(first) or w.attributes() != first.attributes() \
                    or tuple(w.stored_tensors()) != parts:
                raise ValueError(f"expert {e} is {w.format_name} {w.attributes()} but expert 0 is"
                                 f" {first.format_name} {first.attributes()}: the experts of "
                                 f"one stacked tensor share one format and its settings")
        stacked = [torch.stack([w.stored_tensors()[p] for w in experts]) for p in parts]
        N, K = first.shape
        shape = torch.Size([len(experts), K, N] if transposed else [len(experts), N, K])
        return cls(*stacked, first.format_name, json.dumps(first.attributes(), sort_keys=True),
                   parts, shape, first.dtype, bool(transposed))

    @classmethod
    def from_stored(cls, tensors: dict[str, Tensor], attributes: dict) -> ExpertsQuantizedTensor:
        attrs = dict(attributes)
        missing = [p for p in attrs.get("parts", ()) if p not in tensors]
        if missing or set(tensors) - set(attrs.get("parts", ())):
            raise ValueError(f"stored tensors {sorted(tensors)} do not match the parts "
                             f"{attrs.get('parts')} of this stacked weight")
        out = cls(*[tensors[p] for p in attrs["parts"]], attrs["inner"],
                  attrs["inner_attributes"], tuple(attrs["parts"]), torch.Size(attrs["shape"]),
                  getattr(torch, attrs["dtype"]), bool(attrs["transposed"]))
        out.validate()
        return out

    def attributes(self) -> dict:
        out = super().attributes()
        out["parts"] = list(self.parts)
        return out

    # ---- the experts ----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def inner_format(self) -> type:
        fmt = FORMATS.get(self.inner)
        if fmt is None or fmt is ExpertsQuantizedTensor:
            raise ValueError(f"stacked experts of unknown format {self.inner!r}")
        return fmt

    def expert(self, e: int) -> QuantizedTensor:
        """Expert e's weight [N, K] in the inner format (views of the stacked parts)."""
        attrs = json.loads(self.inner_attributes)
        attrs["dtype"] = str(self.dtype).removeprefix("torch.")
        return self.inner_format().from_stored(
            {p: getattr(self, p)[e] for p in self.parts}, attrs)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        W = torch.stack([self.expert(e).dequantize(dtype) for e in range(self.num_experts)])
        return W.transpose(1, 2) if self.transposed else W

    def validate(self) -> None:
        try:
            fmt = self.inner_format()
            attrs = json.loads(self.inner_attributes)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"inner_attributes of a stacked weight are not JSON: {e}") from None
        E = self.shape[0] if len(self.shape) == 3 else -1
        N, K = attrs.get("shape", (None, None))
        want = (E, K, N) if self.transposed else (E, N, K)
        if tuple(self.shape) != want:
            raise ValueError(f"stacked weight of shape {tuple(self.shape)} holds experts of "
                             f"shape {attrs.get('shape')} (transposed={self.transposed})")
        for p in self.parts:
            if getattr(self, p).shape[0] != E:
                raise ValueError(f"part {p!r} holds {getattr(self, p).shape[0]} experts, not {E}")
        if set(self.parts) - {*fmt.tensor_data_names,
                              *getattr(fmt, "optional_tensor_data_names", ())}:
            raise ValueError(f"parts {self.parts} are not all stored tensors of {self.inner}")
        self.expert(0)  # the inner format checks its own parts

    # ---- the matmul ---------------------------------------------------------------------------
    def linear_call(self, x, bias, t):
        raise TypeError("a stacked experts weight is applied with experts_linear(x, ids) (each "
                        "row through its expert), not F.linear")

    def experts_call(self, x, ids, t) -> tuple:
        """(op, args) such that op(*args)[s] = expert ids[s]'s weight applied to x[s]."""
        return torch.ops.discq.experts_linear.default, (
            x, ids, [t[p] for p in self.parts], self.spec())

    def spec(self) -> str:
        """What the op needs besides the tensors, as one string: JSON, hex-encoded (Inductor's
        C++ wrapper writes string arguments into C++ source without escaping quotes)."""
        inner = json.loads(self.inner_attributes)
        inner["dtype"] = str(self.dtype).removeprefix("torch.")
        return json.dumps({"inner": self.inner, "attributes": inner, "parts": self.parts},
                          sort_keys=True).encode().hex()

    def experts_linear(self, x: Tensor, ids: Tensor) -> Tensor:
        """x: [S, K], ids: [S] int -> [S, N]: row s through expert ids[s]."""
        op, args = self.experts_call(x, ids, self.stored_tensors())
        return op(*args)

    def __repr__(self) -> str:
        return (f"ExpertsQuantizedTensor({self.num_experts} experts of {self.inner} "
                f"{self.inner_attributes}, shape={tuple(self.shape)})")


@ExpertsQuantizedTensor.implements(torch.ops.aten.select.int)
def _select(func, types, args, kwargs):
    """W[e]: expert e's weight in the inner format, as the model stores it ([N, K]; a transposed
    stack's experts are [K, N] to the model, so W[e] there is the transposed view's twin and is
    only offered for dim 0 of an untransposed stack)."""
    self, dim, index = args
    if dim != 0 or self.transposed:
        raise TypeError("a stacked experts weight selects experts (W[e]) on untransposed stacks;"
                        " use W.expert(e) for the [N, K] weight of any stack")
    return self.expert(index)


@functools.lru_cache(maxsize=256)
def _decode(spec: str) -> dict:
    return json.loads(bytes.fromhex(spec))


def _expert_of(tensors: list[Tensor], spec: str, e: int) -> QuantizedTensor:
    """Expert e of the op's arguments."""
    d = _decode(spec)
    return FORMATS[d["inner"]].from_stored(dict(zip(d["parts"], (t[e] for t in tensors))),
                                           dict(d["attributes"]))


@torch.library.custom_op("discq::experts_linear", mutates_args=())
def experts_linear(x: Tensor, ids: Tensor, tensors: list[Tensor], spec: str) -> Tensor:
    """y[s] = W_{ids[s]} x[s] for x: [S, K], ids: [S]; each expert present runs its rows through
    the inner format's own op (its kernel). `spec`: `ExpertsQuantizedTensor.spec()`."""
    y = x.new_zeros(x.shape[0], _decode(spec)["attributes"]["shape"][0])
    for e in torch.unique(ids).tolist():
        if not 0 <= e < tensors[0].shape[0]:
            continue  # expert-parallel sentinels: routed nowhere on this process
        rows = (ids == e).nonzero().squeeze(1)
        y[rows] = torch.nn.functional.linear(x[rows], _expert_of(tensors, spec, e)).to(y.dtype)
    return y


@experts_linear.register_fake
def _experts_linear_fake(x, ids, tensors, spec):
    return x.new_empty(x.shape[0], _decode(spec)["attributes"]["shape"][0])


def _setup_context(ctx, inputs, output):
    x, ids, tensors, spec = inputs
    ctx.save_for_backward(ids, *tensors)
    ctx.spec = spec


def _backward(ctx, grad_y):
    """The activations' gradient (codes are not trained): row s gets grad[s] · W_{ids[s]}."""
    ids, *tensors = ctx.saved_tensors
    grad_x = grad_y.new_zeros(grad_y.shape[0], _decode(ctx.spec)["attributes"]["shape"][1])
    for e in torch.unique(ids).tolist():
        if not 0 <= e < tensors[0].shape[0]:
            continue
        rows = (ids == e).nonzero().squeeze(1)
        W = _expert_of(tensors, ctx.spec, e).dequantize(grad_y.dtype)  # [N, K]
        grad_x[rows] = grad_y[rows] @ W
    return grad_x, None, [None] * len(tensors), None


experts_linear.register_autograd(_backward, setup_context=_setup_context)
