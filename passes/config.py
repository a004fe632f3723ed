"""Config base: typed dataclasses with validation, a `version` and a JSON round trip.

Every config is also a torchao `AOBaseConfig`, so data-free ones work with
`torchao.quantization.quantize_` too. `calibration` (data, not settings) is never serialized,
nor is any field declared with `metadata={"serialize": False}` (e.g. Lightning trainer options).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from discq.tensors._torchao import TorchAOBaseTensor  # noqa: F401  (quiet torchao import first)
from discq.tensors.grid import SCALE_DTYPES, AffineGrid, check_bits, check_group_size
from torchao.core.config import AOBaseConfig

from .registry import METHODS
from .validate import check_bool, check_int

NOT_SERIALIZED = ("calibration",)


@dataclass
class QuantConfig(AOBaseConfig):
    """Base of every discq config."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in NOT_SERIALIZED and f.metadata.get("serialize", True)}
        return {"method": self.method, "version": self.version, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantConfig:
        d = dict(d)
        method, version = d.pop("method", None), d.pop("version", 1)
        if method not in METHODS:
            raise ValueError(f"unknown config method {method!r}; known: {sorted(METHODS)}")
        cls = METHODS[method].config
        if version > cls.version:
            raise ValueError(f"config {method!r} has version {version}, newer than this discq "
                             f"understands ({cls.version}); upgrade discq")
        return cls(**d)

    @staticmethod
    def from_json(s: str) -> QuantConfig:
        return QuantConfig.from_dict(json.loads(s))


@dataclass
class GridConfig(QuantConfig):
    """The fields every config on the uniform affine grid shares."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    group_along: str = "input"
    scale_dtype: str = "float16"

    ALLOWED_GROUP_ALONG: ClassVar[tuple[str, ...]] = ("input", "output")

    def __post_init__(self):
        check_bits(self.bits)
        check_group_size(self.group_size)
        check_bool(symmetric=self.symmetric)
        if self.group_along not in self.ALLOWED_GROUP_ALONG:
            raise ValueError(f"group_along must be one of {self.ALLOWED_GROUP_ALONG}, "
                             f"got {self.group_along!r}")
        if self.scale_dtype not in (*SCALE_DTYPES, "weight"):
            raise ValueError(f"scale_dtype must be one of {(*SCALE_DTYPES, 'weight')} "
                             f"('weight' keeps the weight's dtype), got {self.scale_dtype!r}")

    def grid(self, group_along: str | None = None) -> AffineGrid:
        dtype = None if self.scale_dtype == "weight" else SCALE_DTYPES[self.scale_dtype]
        return AffineGrid(self.bits, self.group_size, self.symmetric,
                          group_along or self.group_along, dtype)


def check_finetune(config) -> None:
    """The fine-tuning switch shared by data-driven configs (`finetune`, `finetune_steps`):
    after rounding, what stays continuous (norms, biases, sign vectors, head) is tuned end to
    end against the original model, codes fixed (discq.training.finetune)."""
    check_bool(finetune=config.finetune)
    check_int(0, finetune_steps=config.finetune_steps)
