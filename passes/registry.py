"""The registry of rounding methods: a method is a config class plus a handler, registered next
to the config in the method's own module.

    @register_method("gptq", summary="...", paper="...", data_driven=True)
    @dataclass
    class GPTQConfig(GridConfig): ...

    @handles(GPTQConfig)
    def _gptq(model, config, targets): ...     # targets = [(fqn, nn.Linear)]

    @constructs(GPTQConfig)
    def gptq_config(bits=4, ...) -> GPTQConfig: ...

`quantize_` finds the handler by the config's type; the CLI, `discq.methods`, `make demo` and the
JSON round trip of configs list and build methods from here. Handlers of methods that run on
Lightning import `discq.training` inside their body, so `import discq` stays light and
`passes/` has no import-time dependency on `training/`. Data-free methods may also register a
per-module transform with torchao (`register_module_handler`), so
`torchao.quantization.quantize_` accepts their configs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torchao.quantization.transform_module import register_quantize_module_handler

Handler = Callable  # handler(model, config, targets) -> None


@dataclass
class Method:
    name: str
    config: type
    summary: str
    paper: str
    data_driven: bool
    finetunes_itself: bool = False  # False: `finetune=True` runs the generic end-to-end stage
    affine_grid: bool = True        # takes group_size / symmetric (lattice codes do not)
    order: int = 100                # where listings (CLI, demo) put it: cheapest first
    layer_cost: float = 1.0         # rounding time per layer relative to GPTQ (memory_plan)
    end_to_end: bool = False        # optimizes the whole model at once (DiscQuant), not blocks
    handler: Handler | None = None
    constructor: Callable | None = None


METHODS: dict[str, Method] = {}


def register_method(name: str, *, summary: str, paper: str = "", data_driven: bool,
                    finetunes_itself: bool = False, affine_grid: bool = True,
                    order: int = 100, layer_cost: float = 1.0, end_to_end: bool = False):
    """Class decorator on a config dataclass: the method `name` exists, with this config."""
    def deco(cls):
        if name in METHODS and METHODS[name].config.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {METHODS[name].config.__name__}")
        cls.method = name
        METHODS[name] = Method(name, cls, summary, paper, data_driven, finetunes_itself,
                               affine_grid, order, layer_cost, end_to_end)
        return cls
    return deco


def _entry(config_type: type) -> Method:
    name = getattr(config_type, "method", "")
    if name not in METHODS or METHODS[name].config is not config_type:
        raise TypeError(f"{config_type.__name__} is not a registered method config; decorate it "
                        f"with @register_method(...)")
    return METHODS[name]


def handles(config_type: type):
    """Decorator: `fn(model, config, targets)` runs the method for `config_type`."""
    def deco(fn):
        _entry(config_type).handler = fn
        return fn
    return deco


def constructs(config_type: type):
    """Decorator: `fn(...)` is the lowercase constructor users call (e.g. `rtn_config`)."""
    def deco(fn):
        _entry(config_type).constructor = fn
        return fn
    return deco


def method_of(config) -> Method:
    """The registry entry of a config instance (or class)."""
    return _entry(config if isinstance(config, type) else type(config))


def register_module_handler(config_type: type):
    """Also register a per-module transform `fn(module, config, fqn="")` with torchao's
    registry (data-free methods), so torchao's own `quantize_` accepts the config."""
    return register_quantize_module_handler(config_type)
