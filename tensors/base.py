"""What every quantized weight format shares, and the registry of formats.

A format is a `TorchAOBaseTensor` subclass whose state is plain tensors (`tensor_data_names`,
`optional_tensor_data_names`) plus JSON-able attributes (`tensor_attribute_names`). That is all
`discq.save_quantized` needs to write it as safetensors + JSON and to rebuild it without pickle.

What a format declares, and who uses it:
  register_format(name)     the name in checkpoints (discq/io.py reads FORMATS)
  stored_tensors/attributes how it is saved; `from_stored` rebuilds it (+ `validate`)
  linear_call(x, bias, t)   the one op `F.linear(x, W, bias)` lowers to, and its arguments:
                            eager and compiled code call it on the stored tensors, the export
                            pass (passes/export.py) emits the same call on graph nodes
  inference_call(...)       (optional) the op for no-gradient inference views, if another
  dequantize()              the reference decode every test compares against
  rows(idx)                 (optional) decode only the rows `idx`, for embedding lookups
`F.linear`, `aten.linear` and `F.embedding` are implemented once, here, for every subclass.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._torchao import TorchAOBaseTensor, return_and_correct_aliasing

FORMATS: dict[str, type] = {}


def register_format(name: str):
    """Class decorator: make a quantized tensor class saveable/loadable under `name`, and
    known to every path (save/load, compile, export, the conformance tests)."""
    def deco(cls):
        if name in FORMATS and FORMATS[name] is not cls:
            raise ValueError(f"format name {name!r} is taken by {FORMATS[name].__name__}")
        if cls.linear_call is QuantizedTensor.linear_call:
            raise TypeError(f"{cls.__name__} must define linear_call(x, bias, tensors)")
        cls.format_name = name
        FORMATS[name] = cls
        return cls
    return deco


class QuantizedTensor(TorchAOBaseTensor):
    """Base of discq's quantized weights."""

    format_name: str = ""
    # whether `discq.generate` compiles a token step over this format with Inductor's C++
    # wrapper by default (it saves the Python wrapper's ~2 ms a token; a format whose linear is a
    # heavy op with many tensors may not be worth its compile time)
    cpp_wrapper: bool = True

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def linear_call(self, x: Any, bias: Any, t: Mapping[str, Any]) -> tuple[Any, tuple]:
        """(op, args) such that op(*args) = F.linear(x, self, bias). `t` maps the names of
        `stored_tensors()` to the tensors themselves or, in the export pass, to the graph nodes
        standing for them: so build args from `x`, `bias`, `t` and Python attributes only, and
        keep every tensor computation inside the op."""
        raise NotImplementedError

    def inference_call(self, x: Any, bias: Any, t: Mapping[str, Any]) -> tuple[Any, tuple]:
        """(op, args) as `linear_call`, for inference only (no gradient; `discq.inference`'s
        compiled views): a format may name an op with no autograd formula that its device runs
        in one call (args may also hold constant tensors). Default: `linear_call`."""
        return self.linear_call(x, bias, t)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """F.linear(x, self, bias); formats may add an eager fast path."""
        op, args = self.linear_call(x, bias, self.stored_tensors())
        return op(*args)

    @classmethod
    def stack_outputs(cls, weights: list[QuantizedTensor]) -> QuantizedTensor | None:
        """One weight whose output channels are those of `weights` in order (same in_features),
        computing exactly what each computes on its own rows; None where the format cannot (its
        stored tensors do not split by output channel). Lets linears that read the same input
        run as one call (`discq.siblings`)."""
        return None

    def rows(self, idx: Tensor) -> Tensor:
        """Rows `idx` [n] of the dequantized weight: [n, K]. Formats whose rows decode alone
        override this; the default decodes the whole matrix. F.embedding, not [idx]: its
        backward sums a repeated row's gradients in a fixed order, advanced indexing's
        (index_put_ with accumulate) in a thread-dependent one on CPU."""
        return F.embedding(idx, self.dequantize())

    def embedding(self, ids: Tensor) -> Tensor:
        """F.embedding(ids, self): ids [...] -> [..., K] (a quantized table shared with a tied
        output head decodes only the rows looked up)."""
        return self.rows(ids.reshape(-1)).reshape(*ids.shape, self.shape[1])

    def __tensor_flatten__(self):
        """torchao's flatten, minus its cost: compiled code flattens every subclass weight twice
        on every call (Dynamo's metadata guard, AOTAutograd's unwrap), so the answer is computed
        once and kept until a field is reassigned (`__setattr__`)."""
        flat = self.__dict__.get("_flat")
        if flat is None:
            # reading shape/dtype of a subclass goes through __torch_function__ unless it is off
            with torch._C.DisableTorchFunctionSubclass():
                names = list(self.tensor_data_names)
                names += [n for n in getattr(self, "optional_tensor_data_names", ())
                          if getattr(self, n) is not None]
                flat = names, {a: getattr(self, a) for a in self.tensor_attribute_names}
            self.__dict__["_flat"] = flat
        return flat

    def __setattr__(self, name: str, value) -> None:
        self.__dict__.pop("_flat", None)  # a field may have changed: flatten afresh
        super().__setattr__(name, value)

    def storage_bits(self) -> int:
        """Bits this weight costs in memory and on disk (every stored tensor counted)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.stored_tensors().values())

    def stored_tensors(self) -> dict[str, Tensor]:
        names = list(self.tensor_data_names) + list(getattr(self, "optional_tensor_data_names", []))
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def _stable_hash_for_caching(self) -> str:
        """Cache key of compiled graphs: all metadata (attributes and every stored tensor's name,
        dtype, shape and strides), none of the data, which are graph inputs. Strides belong in
        it: compiled code asserts them (a loaded weight is contiguous where a freshly made
        rotation factor may be a transposed view)."""
        parts = [type(self).__name__, repr(sorted(self.attributes().items()))]
        parts += [f"{n}:{t.dtype}:{tuple(t.shape)}:{t.stride()}"
                  for n, t in self.stored_tensors().items()]
        return "|".join(parts)

    def attributes(self) -> dict:
        """JSON-able attributes (shape as a list, dtype as its name)."""
        out = {}
        for n in self.tensor_attribute_names:
            v = getattr(self, n)
            if isinstance(v, torch.Size):
                v = list(v)
            elif isinstance(v, torch.dtype):
                v = str(v).removeprefix("torch.")
            out[n] = v
        return out

    @classmethod
    def from_stored(cls, tensors: dict[str, Tensor], attributes: dict) -> QuantizedTensor:
        """Inverse of (`stored_tensors`, `attributes`)."""
        attrs = dict(attributes)
        attrs["shape"] = torch.Size(attrs["shape"])
        attrs["dtype"] = getattr(torch, attrs["dtype"])
        required = [tensors[n] for n in cls.tensor_data_names]
        optional = {n: tensors.get(n) for n in getattr(cls, "optional_tensor_data_names", [])}
        out = cls(*required, *[attrs[n] for n in cls.tensor_attribute_names], **optional)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ValueError if the stored tensors disagree with the attributes (a corrupted or
        hand-edited checkpoint); formats override this."""


@QuantizedTensor.implements(torch.ops.aten._to_copy.default)
def _to_copy(func, types, args, kwargs):
    """`.to(device)` moves every stored tensor; `.to(dtype)` changes the dtype the weight
    dequantizes to (stored scales keep their dtype). Inherited by every format."""
    self = args[0]
    kw = self._get_to_kwargs(*args[1:], **kwargs)
    tensors = {n: t.to(kw["device"], non_blocking=kw["non_blocking"])
               for n, t in self.stored_tensors().items()}
    attrs = {**self.attributes(), "dtype": str(kw["dtype"]).removeprefix("torch.")}
    return return_and_correct_aliasing(func, args, kwargs, type(self).from_stored(tensors, attrs))


def unwrap_compiled(model):
    """The module a `torch.compile` wrapper holds (its state dict and fqns carry `_orig_mod.`),
    else `model`: saving, loading and quantizing see the same names compiled or not."""
    from torch._dynamo.eval_frame import OptimizedModule
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


# One table for every format: subclasses inherit it (torchao copies the parent's table into
# each subclass), so a format only says what its linear lowers to (`linear_call`).
@QuantizedTensor.implements_torch_function(F.linear)
def _linear_torch_function(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
    return w.linear(x, bias)


@QuantizedTensor.implements(torch.ops.aten.linear.default)
def _linear_aten(func, types, args, kwargs):
    x, w = args[0], args[1]
    return w.linear(x, args[2] if len(args) > 2 else None)


@QuantizedTensor.implements_torch_function(F.embedding)
def _embedding_torch_function(func, types, args, kwargs):
    ids, w = args[0], args[1]
    kw = dict(zip(("padding_idx", "max_norm"), args[2:4])) | (kwargs or {})
    if kw.get("max_norm") is not None:
        raise ValueError("F.embedding(max_norm=...) renormalizes the table in place; a quantized "
                         "table cannot be renormalized")
    return w.embedding(ids)


@QuantizedTensor.implements(torch.ops.aten.embedding.default)
def _embedding_aten(func, types, args, kwargs):
    return args[0].embedding(args[1])
