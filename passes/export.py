"""Quantization as a graph pass over a `torch.export` program.

`quantize_exported(ep, config)` replaces every `aten.linear` whose weight is a parameter by the
op its quantized format lowers to (`QuantizedTensor.linear_call`: `discq::affine_linear`,
`discq::incoherent_linear`, `discq::e8p_linear`, ...) fed by new constant placeholders (the
format's stored tensors), drops the fp weight from the program, and rewrites the graph
signature. Every registered format goes through the same code: nothing here names one. The
result validates, survives `run_decompositions()`, `torch.export.save/load` (the op is
registered on `import discq`) and `torch.compile(ep.module())`. The other path — `quantize_` on the eager model, then export — is
equally supported: the tensor subclass exports as the same op.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from discq.tensors.base import QuantizedTensor
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    TensorArgument,
)
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .config import QuantConfig
from .rtn import RTNConfig, rtn_weight


class QuantizeLinearsPass(PassBase):
    """Rewrites the graph; the new constant inputs are collected in `self.constants` and the
    replaced weights in `self.replaced` for the signature rewrite."""

    def __init__(self, ep: ExportedProgram, config: QuantConfig | None, filter_fn,
                 quantized_state):
        super().__init__()
        self.ep, self.config, self.filter_fn = ep, config, filter_fn
        self.quantized_state = quantized_state or {}
        self.param_of = {s.arg.name: s.target for s in ep.graph_signature.input_specs
                         if s.kind == InputKind.PARAMETER}
        self.constants: dict[str, tuple[torch.fx.Node, torch.Tensor]] = {}
        self.replaced: set[str] = set()

    def _weight(self, fqn: str) -> QuantizedTensor | None:
        """The layer's quantized weight, or None to keep it in full precision."""
        if fqn in self.quantized_state:
            return self.quantized_state[fqn]
        if self.config is None:
            return None
        if not isinstance(self.config, RTNConfig):
            raise ValueError(f"{type(self.config).__name__} needs data: quantize the eager model "
                             f"with quantize_ and pass its weights as quantized_state")
        return rtn_weight(self.ep.state_dict[fqn], self.config, fqn.removesuffix(".weight"))

    def _placeholder(self, gm, fqn: str, part: str, t: torch.Tensor, anchor, fake_mode):
        with gm.graph.inserting_before(anchor):
            ph = gm.graph.placeholder(f"c_{fqn.replace('.', '_')}_{part}")
        ph.meta["val"] = fake_mode.from_tensor(t, static_shapes=True)
        # "lm_head.weight_qdata", not "lm_head.weight.qdata": unlifting turns the dotted name
        # into attributes, and a weight that stays (tied to the embedding) is a tensor, not
        # a module that could hold `qdata`
        self.constants[f"{fqn}_{part}"] = (ph, t)
        return ph

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        nodes = list(gm.graph.nodes)
        anchor = next(n for n in nodes if n.op == "placeholder" and n.name not in self.param_of
                      and n.name in _user_inputs(self.ep))
        fake_mode = next(n.meta["val"].fake_mode for n in nodes if n.op == "placeholder"
                         and hasattr(n.meta.get("val"), "fake_mode"))
        for node in nodes:
            if node.target != torch.ops.aten.linear.default:
                continue
            w = node.args[1]
            fqn = self.param_of.get(getattr(w, "name", None))
            if fqn is None or (self.filter_fn is not None and not self.filter_fn(fqn)):
                continue
            q = self._weight(fqn)
            if q is not None:
                self._replace(gm, node, fqn, q, anchor, fake_mode)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return PassResult(gm, bool(self.replaced))

    def _replace(self, gm, node, fqn, q, anchor, fake_mode) -> None:
        parts = {p: self._placeholder(gm, fqn, p, t, anchor, fake_mode)
                 for p, t in q.stored_tensors().items()}
        bias = node.args[2] if len(node.args) > 2 else None
        op, args = q.linear_call(node.args[0], bias, parts)  # what eager F.linear calls too
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(op, args)
        new.meta = dict(node.meta)
        weight, name = node.args[1], node.name
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        new.name = name  # output specs refer to nodes by name
        if not weight.users:  # the fp weight leaves the program (a shared one stays)
            gm.graph.erase_node(weight)
            self.replaced.add(fqn)


def _user_inputs(ep: ExportedProgram) -> set[str]:
    return {s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def quantize_exported(ep: ExportedProgram, config: QuantConfig | None = None, *,
                      filter_fn: Callable[[str], bool] | None = None,
                      quantized_state: dict[str, QuantizedTensor] | None = None
                      ) -> ExportedProgram:
    """A new ExportedProgram whose selected linears are quantized (`filter_fn(param_fqn)`
    keeps a layer in full precision when it returns False, e.g. the head).
    `quantized_state={param_fqn: weight}` supplies weights of any format (e.g. from an eager
    `quantize_` with GPTQ, DiscQuant or QuIP#: `dict(discq.quantized_weights(model))`, keys
    with `.weight`); `config` (data-free: RTN) quantizes the other linears, or with
    `config=None` they stay in full precision."""
    if not isinstance(ep, ExportedProgram):
        raise TypeError(f"ep must be a torch.export.ExportedProgram, got {type(ep).__name__}")
    if config is not None and not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a discq config such as rtn_config(4) or None, got "
                        f"{type(config).__name__}")
    if config is None and not quantized_state:
        raise ValueError("nothing to quantize: pass a data-free config such as rtn_config(4) "
                         "or the weights of a quantized model as quantized_state")
    for fqn, q in (quantized_state or {}).items():
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"quantized_state[{fqn!r}] must be a discq quantized tensor, got "
                            f"{type(q).__name__}")
    gm = _copy_graph_module(ep)
    p = QuantizeLinearsPass(ep, config, filter_fn, quantized_state)
    gm = p(gm).graph_module
    return _rebuild(ep, gm, p)


def _copy_graph_module(ep: ExportedProgram) -> torch.fx.GraphModule:
    """A deep copy whose node names match the original's: deepcopy renames some (e.g. a
    placeholder called `input`), which would break the graph signature's references."""
    gm = copy.deepcopy(ep.graph_module)
    for a, b in zip(ep.graph_module.graph.nodes, gm.graph.nodes):
        if a.name != b.name:
            b.name = a.name
            if b.op == "placeholder":
                b.target = a.target
    gm.recompile()
    return gm


def _rebuild(ep: ExportedProgram, gm, p: QuantizeLinearsPass) -> ExportedProgram:
    """The signature follows the placeholders: old specs kept, replaced weights dropped,
    new constants added."""
    old = {s.arg.name: s for s in ep.graph_signature.input_specs}
    new = {ph.name: InputSpec(InputKind.CONSTANT_TENSOR, TensorArgument(ph.name), key)
           for key, (ph, _) in p.constants.items()}
    specs = [old.get(n.name) or new[n.name] for n in gm.graph.nodes if n.op == "placeholder"]
    state = {k: v for k, v in ep.state_dict.items() if k not in p.replaced}
    constants = {**ep.constants, **{k: t for k, (_, t) in p.constants.items()}}
    out = ExportedProgram(
        root=gm, graph=gm.graph,
        graph_signature=ExportGraphSignature(specs, list(ep.graph_signature.output_specs)),
        state_dict=state, range_constraints=ep.range_constraints,
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=constants)
    out.validate()
    return out
