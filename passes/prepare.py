"""The model as methods see it while `quantize_` runs, and back.

Methods round `nn.Linear` weights. `Prepared` turns every selected matrix into linears for the
run: a Conv1D becomes the nn.Linear it is, an expert stack becomes E linears
(`experts.explode`); on success the stacks are stacked again (`experts.restack`), a Conv1D
whose linear was not quantized goes back, and an output head that was tied to the token
embedding is tied to it again (the embedding looks its rows up in the quantized tensor). On a
failure or an interrupt every weight and module is put back as it was.
"""
from __future__ import annotations

from torch import nn

from . import experts
from .matrices import Matrix, conv1d_as_linear, tied_head

Run = tuple[object, list[tuple[str, nn.Linear]]]  # (config, [(fqn, linear)])


class Prepared:
    """Context: `with Prepared(model, plan, calibrate_all) as runs:` where plan is
    [(config, [Matrix])] and runs [(config, [(fqn, nn.Linear)])]."""

    def __init__(self, model: nn.Module, plan: list[tuple[object, list[Matrix]]],
                 calibrate_all: bool = False):
        self.model, self.plan, self.calibrate_all = model, plan, calibrate_all
        self.swapped: list[tuple[nn.Module, str, nn.Module, nn.Linear]] = []
        self.exploded: dict[nn.Module, list[str]] = {}
        self.originals: list[tuple[nn.Linear, nn.Parameter]] = []
        self.few_tokens: dict[str, int] = {}  # "<stack>[e]" -> calibration tokens it saw

    def __enter__(self) -> list[Run]:
        self.tied = tied_head(self.model)
        try:
            for _, group in self.plan:
                for mx in group:
                    if mx.kind == "experts":
                        self.exploded.setdefault(mx.module, []).append(mx.param)
            for module, names in self.exploded.items():
                experts.explode(module, names, self.calibrate_all)
            runs = [(cfg, [t for mx in group for t in self._targets(mx)])
                    for cfg, group in self.plan]
        except BaseException:
            self._undo()
            raise
        self.originals = [(m, m.weight) for _, group in runs for _, m in group]
        return runs

    def _targets(self, mx: Matrix) -> list[tuple[str, nn.Linear]]:
        if mx.kind == "experts":
            return [(f"{mx.fqn}.{e}", lin) for e, lin in enumerate(mx.module._modules[mx.param])]
        if mx.kind == "conv1d":
            parent_name, _, attr = mx.fqn.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            lin = conv1d_as_linear(mx.module)
            setattr(parent, attr, lin)
            self.swapped.append((parent, attr, mx.module, lin))
            return [(mx.fqn, lin)]
        return [(mx.fqn, mx.module)]

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            for m, w in self.originals:
                m.weight = w
            self._undo()
            return
        for module in self.exploded:
            experts.restack(module)
            self._note_tokens(module)
        for parent, attr, conv, lin in self.swapped:
            if not hasattr(lin.weight, "format_name"):  # left in full precision after all
                setattr(parent, attr, conv)
        if self.tied is not None:
            head, emb = self.tied
            if head.weight is not emb.weight and hasattr(head.weight, "format_name"):
                emb.weight = head.weight  # one tensor: the embedding looks rows up in it

    def _note_tokens(self, module: nn.Module) -> None:
        """Experts calibrated on fewer tokens than their input width (their Hessian was pulled
        toward the stack's pooled one: `capture.shrink_few_tokens`)."""
        names = {m: fqn for _, group in self.plan for mx in group
                 for m, fqn in [(mx.module, mx.fqn.rpartition(".")[0])]}
        for stack, (K, counts) in (getattr(module, "discq_expert_tokens", None) or {}).items():
            for e, n in enumerate(counts):
                if n < K:
                    self.few_tokens[f"{names[module]}.{stack}[{e}]"] = n

    def _undo(self) -> None:
        for module in self.exploded:
            experts.undo(module)
        for parent, attr, conv, _ in self.swapped:
            setattr(parent, attr, conv)


def prepare_skeleton(model: nn.Module, quantized: list[str]) -> None:
    """Give a freshly built model (its parameters possibly on the meta device) the structure
    its quantized checkpoint was saved from, before the weights are read: Conv1D layers whose
    weight was quantized become nn.Linear, experts modules with quantized stacks run discq's
    forward. `quantized`: the parameter names of the quantized weights."""
    from .matrices import is_conv1d
    for name in quantized:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if is_conv1d(module) and attr == "weight":
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, conv1d_as_linear(module))
        elif experts.is_experts(module):
            experts.use_stacked_forward(module)


def planning_targets(matrices: list[Matrix]) -> list[tuple[str, nn.Linear]]:
    """The linears a run will round, as shapes on the meta device (for the memory plan)."""
    out = []
    for mx in matrices:
        W = mx.module._parameters[mx.param]
        if mx.kind == "experts":
            transposed = bool(getattr(mx.module, "is_transposed", False))
            N, K = (W.shape[2], W.shape[1]) if transposed else W.shape[1:]
            out += [(f"{mx.fqn}.{e}", _meta_linear(N, K, W.dtype)) for e in range(W.shape[0])]
        else:
            N, K = W.shape[::-1] if mx.kind == "conv1d" else W.shape
            out.append((mx.fqn, _meta_linear(N, K, W.dtype)))
    return out


def _meta_linear(N: int, K: int, dtype) -> nn.Linear:
    return nn.Linear(K, N, bias=False, device="meta", dtype=dtype)
