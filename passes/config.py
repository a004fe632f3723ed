"""Config base: typed dataclasses with validation, a `version` and a JSON round trip.

Every config is also a torchao `AOBaseConfig`, so data-free ones work with
`torchao.quantization.quantize_` too. `calibration` (data, not settings) is never serialized,
nor is any field declared with `metadata={"serialize": False}` (e.g. Lightning trainer options).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from discq.tensors._torchao import TorchAOBaseTensor  # noqa: F401  (quiet torchao import first)
from discq.tensors.gguf import GGUFGrid
from discq.tensors.gguf_layout import TYPES
from discq.tensors.grid import SCALE_DTYPES, AffineGrid, check_bits, check_group_size
from torchao.core.config import AOBaseConfig

from .gguf_mixture import MIXTURES, layer_types
from .registry import METHODS
from .validate import check_bool, check_int

NOT_SERIALIZED = ("calibration",)


@dataclass
class QuantConfig(AOBaseConfig):
    """Base of every discq config."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def bind(self, model, targets) -> tuple[QuantConfig, list]:
        """This config as it applies to `targets` [(fqn, module)] of `model`, and the targets
        it quantizes; `quantize_` calls it before the handler (a mixture resolves per layer)."""
        return self, targets

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
    gguf: str | None = None
    layer_types: dict = field(default_factory=dict, repr=False, compare=False,
                              metadata={"serialize": False})

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
        if self.gguf is not None:
            check_gguf(self)

    def grid(self, group_along: str | None = None, fqn: str = ""):
        """The grid the layer `fqn` is rounded onto: the affine grid of bits/group_size/…, or
        with `gguf` set, the GGML block type's (a mixture's type for this layer)."""
        if self.gguf is not None:
            ggml_type = self.layer_types.get(fqn, self.gguf)
            if ggml_type not in TYPES:
                raise ValueError(f"the mixture {self.gguf!r} gives each layer its own type: "
                                 f"quantize through quantize_(model, config) so that it is "
                                 f"resolved for {fqn or 'this layer'!r}")
            return GGUFGrid(ggml_type)
        dtype = None if self.scale_dtype == "weight" else SCALE_DTYPES[self.scale_dtype]
        return AffineGrid(self.bits, self.group_size, self.symmetric,
                          group_along or self.group_along, dtype)

    def bind(self, model, targets):
        return (self, targets) if self.gguf is None else bind_gguf(self, model, targets)


def check_gguf(config) -> None:
    """`gguf`: a GGML block type ("Q4_K") or a llama.cpp mixture ("Q4_K_M"); it decides bits
    and groups, so only the options that hold on its grid are allowed with it."""
    if not isinstance(config.gguf, str) or (config.gguf not in TYPES
                                            and config.gguf not in MIXTURES):
        raise ValueError(f"gguf must be a GGML block type {tuple(TYPES)} or a llama.cpp mixture "
                         f"{MIXTURES}, got {config.gguf!r}")
    if config.group_along not in ("input", "auto"):
        raise ValueError("gguf grids group along the input dimension (llama.cpp's blocks run "
                         "along rows); leave group_along='input'")
    if getattr(config, "codebook", "affine") != "affine":
        raise ValueError("gguf grids are affine block grids; leave codebook='affine'")
    for name in ("incoherence", "lowrank"):
        if getattr(config, name, False):
            raise ValueError(f"{name} cannot be stored in a GGUF block type; drop {name} or gguf")


def bind_gguf(config, model, targets) -> tuple[GridConfig, list]:
    """Resolve a mixture per layer (layers llama.cpp keeps in F16 are left unquantized); with
    one block type, refuse layers whose rows are not whole blocks."""
    if config.gguf in MIXTURES:
        # a method that weighs errors by calibration data gets llama.cpp's imatrix rules
        types = layer_types(model, config.gguf, targets, imatrix=hasattr(config, "calibration"))
        kept = [(fqn, m) for fqn, m in targets if types[fqn] != "F16"]
        return dataclasses.replace(config, layer_types=types), kept
    for fqn, m in targets:
        GGUFGrid(config.gguf).check_row(m.in_features, fqn)
    return config, targets


def check_finetune(config) -> None:
    """The fine-tuning switch shared by data-driven configs (`finetune`, `finetune_steps`):
    after rounding, what stays continuous (norms, biases, sign vectors, head) is tuned end to
    end against the original model, codes fixed (discq.training.finetune)."""
    check_bool(finetune=config.finetune)
    check_int(0, finetune_steps=config.finetune_steps)


HESSIANS = ("inputs", "kl")


def check_hessian(config) -> None:
    """`hessian`: "inputs" (each layer's own input second moment XᵀX, as the papers) or "kl"
    (Kronecker factors of the Hessian of the whole model's KL to the original, YAQA), and
    `kl_rows`, the rows rounded together between two feedback steps along the output side
    (0: none, the input factor alone)."""
    if config.hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {config.hessian!r}")
    check_int(0, kl_rows=config.kl_rows)
    if config.kl_rows and config.hessian != "kl":
        raise ValueError("kl_rows feeds rows back through the KL Hessian's output factor: "
                         "set hessian='kl' too, or leave kl_rows=0")
