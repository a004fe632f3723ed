"""What every quantized weight format shares, and the registry of formats.

A format is a `TorchAOBaseTensor` subclass whose state is plain tensors (`tensor_data_names`,
`optional_tensor_data_names`) plus JSON-able attributes (`tensor_attribute_names`). That is all
`discq.save_quantized` needs to write it as safetensors + JSON and to rebuild it without pickle.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._torchao import TorchAOBaseTensor, return_and_correct_aliasing

FORMATS: dict[str, type] = {}


def register_format(name: str):
    """Class decorator: make a quantized tensor class saveable/loadable under `name`."""
    def deco(cls):
        cls.format_name = name
        FORMATS[name] = cls
        return cls
    return deco


class QuantizedTensor(TorchAOBaseTensor):
    """Base of discq's quantized weights."""

    format_name: str = ""

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

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
        dtype and shape), none of the data, which are graph inputs."""
        parts = [type(self).__name__, repr(sorted(self.attributes().items()))]
        parts += [f"{n}:{t.dtype}:{tuple(t.shape)}" for n, t in self.stored_tensors().items()]
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
