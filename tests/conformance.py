"""The conformance base every registered weight format inherits (torchao's TorchAOBasicTestCase
is the model). A format gets every test here by subclassing, with no test code of its own:

    class TestMyFormat(FormatConformance):
        max_relative_error = 0.3            # ‖W − Ŵ‖ / ‖W‖ on a Gaussian W: its bound
        def make(self, W):                  # W: [N, K] fp32 -> the format's tensor
            return MyQuantizedTensor.from_hp(W, ...)

What it checks, on every path a quantized weight takes: it is registered; dequantize is within
the bound; F.linear (eager, with and without bias, 2-D and 3-D activations) equals the dense
product; compile(fullgraph) and torch.export equal eager; an exported program saves and
reloads in another process (tests/other_process.py); the export graph pass emits it from `quantized_state`;
save_quantized/load_quantized is bit-exact, also from and into a compiled model; transformers'
save_pretrained/from_pretrained is bit-exact and stores no more bytes than the format's own;
.to, clone and detach keep it; the bytes on disk are what `bits_per_weight` claims; corrupted stored
tensors or attributes raise ValueError; weights stacked along the output channels (where the
format stacks them) are each part on its rows. `slow`: an AOTInductor package of it runs in another
process (make test-all).
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from other_process import run_elsewhere
from discq.passes.export import quantize_exported
from discq.tensors.base import FORMATS, QuantizedTensor
from safetensors import safe_open
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import discq

ATOL = 1e-4  # fp32 products summed in another order (rotations, kernels)


class FormatConformance:
    """Subclasses define `make(W)` and `max_relative_error`; N, K may be overridden."""

    N, K = 40, 96
    max_relative_error: float = 1.0

    def make(self, W: torch.Tensor) -> QuantizedTensor:
        raise NotImplementedError

    # ---- fixtures -------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    def W(self):
        return torch.randn(self.N, self.K, generator=torch.Generator().manual_seed(0))

    @pytest.fixture(scope="class")
    def q(self, W):
        return self.make(W)

    def linear(self, q, bias: bool = True) -> nn.Linear:
        lin = nn.Linear(self.K, self.N, bias=bias)
        with torch.no_grad():
            if bias:
                lin.bias.copy_(torch.linspace(-1, 1, self.N))
        lin.weight = nn.Parameter(q, requires_grad=False)
        return lin.eval()

    def x(self, *lead):
        return torch.randn(*lead, self.K, generator=torch.Generator().manual_seed(1))

    # ---- the format ----------------------------------------------------------------------
    def test_is_registered_under_its_name(self, q):
        assert isinstance(q, QuantizedTensor) and FORMATS[q.format_name] is type(q)
        assert q.shape == (self.N, self.K) and q.dtype == torch.float32

    def test_dequantize_is_within_the_bound(self, W, q):
        What = q.dequantize()
        assert What.shape == W.shape and What.dtype == W.dtype
        assert float((What - W).norm() / W.norm()) <= self.max_relative_error

    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("lead", [(3,), (2, 5)])
    def test_linear_equals_the_dense_product(self, q, bias, lead):
        lin, x = self.linear(q, bias), self.x(*lead)
        dense = x @ q.dequantize().t() + (lin.bias if bias else 0)
        with torch.no_grad():
            assert torch.allclose(lin(x), dense, atol=ATOL)
        assert torch.allclose(torch.nn.functional.linear(x, q, lin.bias if bias else None),
                              dense, atol=ATOL)

    def test_activations_get_gradients(self, q):
        lin, x = self.linear(q), self.x(3).requires_grad_()
        lin(x).sum().backward()
        assert torch.allclose(x.grad, torch.ones(3, self.N) @ q.dequantize(), atol=ATOL)

    def test_to_clone_detach_keep_it(self, q):
        for t in (q.detach(), q.clone(), q.to("cpu")):
            assert type(t) is type(q) and torch.equal(t.dequantize(), q.dequantize())

    def test_corrupted_parts_or_attributes_raise_value_error(self, q):
        parts, attrs = q.stored_tensors(), q.attributes()
        for name, t in parts.items():
            bad = torch.zeros(*(s + 1 for s in t.shape), dtype=t.dtype) if t.dim() else \
                torch.zeros(2, dtype=t.dtype)
            with pytest.raises(ValueError):
                type(q).from_stored({**parts, name: bad}, attrs)
        with pytest.raises(ValueError):
            type(q).from_stored(parts, {**attrs, "shape": [self.N + 1, self.K]})

    def test_stacked_outputs_compute_each_weight_on_its_rows(self, W, q):
        """`stack_outputs` is None (not stackable) or one weight whose rows are each part's."""
        other = self.make(W.flip(0) * 0.5)
        S = type(q).stack_outputs([q, other])
        if S is None:
            return
        assert type(S) is type(q) and S.shape == (2 * self.N, self.K)
        assert torch.equal(S.dequantize(), torch.cat([q.dequantize(), other.dequantize()]))
        x = self.x(3)
        y = torch.nn.functional.linear(x, S)
        assert torch.allclose(y[:, :self.N], torch.nn.functional.linear(x, q), atol=ATOL)

    # ---- compile and export --------------------------------------------------------------
    def test_compile_fullgraph_equals_eager(self, q):
        torch._dynamo.reset()
        lin, x = self.linear(q), self.x(3)
        with torch.no_grad():
            assert torch.allclose(torch.compile(lin, fullgraph=True)(x), lin(x), atol=ATOL)

    def test_export_equals_eager_and_reloads_in_another_process(self, q, tmp_path):
        lin, x = self.linear(q), self.x(4)
        ep = torch.export.export(lin, (x,))
        assert torch.ops.aten.linear.default not in [n.target for n in ep.graph.nodes]
        with torch.no_grad():
            expected = lin(x)
            assert torch.allclose(ep.module()(x), expected, atol=ATOL)
        torch.export.save(ep, tmp_path / "p.pt2")
        torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
        _in_another_process(f"""
            ep = torch.export.load({str(tmp_path / 'p.pt2')!r})
            io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
            assert torch.allclose(ep.module()(io["x"]), io["y"], atol={ATOL})
        """)

    def test_export_pass_emits_it_from_quantized_state(self, q):
        fp, x = nn.Linear(self.K, self.N).eval(), self.x(3)
        ep = torch.export.export(fp, (x,))
        qep = quantize_exported(ep, None, quantized_state={"weight": q})
        qep.validate()
        op, _ = q.linear_call(x, None, q.stored_tensors())
        assert op in [n.target for n in qep.graph.nodes]
        with torch.no_grad():
            want = x @ q.dequantize().t() + fp.bias
            assert torch.allclose(qep.module()(x), want, atol=ATOL)
            assert torch.allclose(qep.run_decompositions().module()(x), want, atol=ATOL)

    @pytest.mark.slow
    def test_aoti_package_runs_in_another_process(self, q, tmp_path):
        lin, x = self.linear(q), self.x(2)
        ep = torch.export.export(lin, (x,))
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "p.pt2"))
        with torch.no_grad():
            torch.save({"x": x, "y": lin(x)}, tmp_path / "io.pt")
        _in_another_process(f"""
            f = torch._inductor.aoti_load_package({path!r})
            io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
            assert torch.allclose(f(io["x"]), io["y"], atol={ATOL})
        """)

    # ---- save and load -------------------------------------------------------------------
    @pytest.mark.parametrize("compiled", [False, True])
    def test_save_load_is_bit_exact(self, q, tmp_path, compiled):
        model, x = nn.Sequential(self.linear(q)), self.x(3)
        if compiled:  # the README's order: quantize, compile, save; load into a compiled model
            model = torch.compile(model)
            with torch.no_grad():
                model(x)
        discq.save_quantized(model, tmp_path / "m")
        skeleton = nn.Sequential(nn.Linear(self.K, self.N))
        loaded = discq.load_quantized(tmp_path / "m", model=torch.compile(skeleton)
                                      if compiled else skeleton)
        w = skeleton[0].weight
        assert type(w) is type(q) and w.attributes() == q.attributes()
        for name, t in q.stored_tensors().items():
            assert torch.equal(getattr(w, name), t), name
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))

    def test_bytes_on_disk_are_what_bits_per_weight_claims(self, q, tmp_path):
        model = nn.Sequential(self.linear(q, bias=False))
        discq.save_quantized(model, tmp_path / "m")
        data = (tmp_path / "m" / "model.safetensors").read_bytes()
        header = struct.unpack("<Q", data[:8])[0]
        tensor_bytes = len(data) - 8 - header
        assert tensor_bytes * 8 == q.storage_bits()
        assert discq.bits_per_weight(model) == pytest.approx(tensor_bytes * 8 / q.numel())
        spec = json.loads((tmp_path / "m" / "discq.json").read_text())["quantized"]["0.weight"]
        assert spec["format"] == q.format_name

    # ---- transformers: save_pretrained / from_pretrained ------------------------------------
    def test_save_pretrained_from_pretrained_is_bit_exact(self, q, tmp_path):
        model = OneLinear(OneLinearConfig(n_in=self.K, n_out=self.N))
        model.proj.weight = nn.Parameter(q, requires_grad=False)
        discq.hf.attach(model)  # what quantize_ does for a transformers model
        model.save_pretrained(tmp_path)
        loaded = OneLinear.from_pretrained(tmp_path)
        w = loaded.proj.weight
        assert type(w) is type(q) and w.attributes() == q.attributes() and not w.requires_grad
        for name, t in q.stored_tensors().items():
            assert torch.equal(getattr(w, name), t), name
        x = self.x(3)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        with safe_open(tmp_path / "model.safetensors", "pt") as f:  # parts + 1-byte placeholder
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("proj.weight"))
        assert stored * 8 == q.storage_bits() + 8


class OneLinearConfig(PretrainedConfig):
    """The smallest transformers model: one nn.Linear, for the save_pretrained round trip."""

    model_type = "discq_one_linear"

    def __init__(self, n_in: int = 8, n_out: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.n_in, self.n_out = n_in, n_out


class OneLinear(PreTrainedModel):
    config_class = OneLinearConfig

    def __init__(self, config: OneLinearConfig):
        super().__init__(config)
        self.proj = nn.Linear(config.n_in, config.n_out)
        self.post_init()

    def forward(self, x):
        return self.proj(x)


def _in_another_process(body: str) -> None:
    run_elsewhere(body)  # torch and discq are imported there


# ---- stacked experts ------------------------------------------------------------------------

class ExpertsConformance:
    """The stacked-experts format (`ExpertsQuantizedTensor`) over one inner format: every path a
    mixture-of-experts weight takes. Subclasses set `inner`, a FormatConformance class whose
    `make(W)` builds one expert (its N, K are the experts' shape)."""

    inner: type = FormatConformance
    E = 3
    fresh_process = False  # the export's reload in a new process (seconds: for one format)

    @pytest.fixture(scope="class")
    def parts(self):
        g = torch.Generator().manual_seed(0)
        maker = self.inner()
        return [maker.make(torch.randn(self.inner.N, self.inner.K, generator=g))
                for _ in range(self.E)]

    @pytest.fixture(scope="class")
    def S(self, parts):
        from discq.tensors.experts import ExpertsQuantizedTensor
        return ExpertsQuantizedTensor.stack(parts)

    def rows(self, n: int = 7):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, self.inner.K, generator=g)
        ids = torch.tensor([i % self.E for i in range(n)])
        return x, ids

    def dense(self, parts, x, ids):
        return torch.stack([x[s] @ parts[ids[s]].dequantize().t() for s in range(len(ids))])

    def test_is_registered_and_holds_each_expert(self, S, parts):
        assert FORMATS[S.format_name] is type(S) and S.shape == (self.E, self.inner.N,
                                                                 self.inner.K)
        for e, w in enumerate(parts):
            got = S.expert(e)
            assert type(got) is type(w) and got.attributes() == w.attributes()
            for name, t in w.stored_tensors().items():
                assert torch.equal(got.stored_tensors()[name], t), name
        assert torch.equal(S.dequantize(), torch.stack([w.dequantize() for w in parts]))

    def test_experts_linear_equals_each_experts_product(self, S, parts):
        x, ids = self.rows()
        assert torch.allclose(S.experts_linear(x, ids), self.dense(parts, x, ids), atol=ATOL)

    def test_activations_get_gradients(self, S, parts):
        x, ids = self.rows()
        x.requires_grad_()
        S.experts_linear(x, ids).sum().backward()
        want = torch.stack([parts[i].dequantize().sum(0) for i in ids.tolist()])
        assert torch.allclose(x.grad, want, atol=ATOL)

    def test_to_clone_detach_keep_it(self, S):
        for t in (S.detach(), S.clone(), S.to("cpu")):
            assert type(t) is type(S) and torch.equal(t.dequantize(), S.dequantize())

    def test_corrupted_parts_or_attributes_raise_value_error(self, S):
        parts, attrs = S.stored_tensors(), S.attributes()
        for name, t in parts.items():
            with pytest.raises(ValueError):  # one expert too few in one part
                type(S).from_stored({**parts, name: t[:-1]}, attrs)
        with pytest.raises(ValueError):
            type(S).from_stored(parts, {**attrs, "shape": [self.E + 1, *attrs["shape"][1:]]})
        with pytest.raises(ValueError):
            type(S).from_stored(parts, {**attrs, "inner_attributes": "{not json"})

    def test_compile_fullgraph_and_export_equal_eager(self, S, tmp_path):
        torch._dynamo.reset()
        module, (x, ids) = OneStack(S), self.rows()
        with torch.no_grad():
            eager = module(x, ids)
            assert torch.allclose(torch.compile(module, fullgraph=True)(x, ids), eager,
                                  atol=ATOL)
            ep = torch.export.export(module, (x, ids))
            assert torch.allclose(ep.module()(x, ids), eager, atol=ATOL)
        if self.fresh_process:
            torch.export.save(ep, tmp_path / "p.pt2")
            torch.save({"x": x, "ids": ids, "y": eager}, tmp_path / "io.pt")
            _in_another_process(f"""
                ep = torch.export.load({str(tmp_path / 'p.pt2')!r})
                io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
                assert torch.allclose(ep.module()(io["x"], io["ids"]), io["y"], atol={ATOL})
            """)

    def test_save_load_is_bit_exact(self, S, tmp_path):
        discq.save_quantized(OneStack(S), tmp_path / "m")
        loaded = discq.load_quantized(tmp_path / "m", model=OneStack(torch.zeros(S.shape)))
        w = loaded.experts
        assert type(w) is type(S) and w.attributes() == S.attributes()
        for name, t in S.stored_tensors().items():
            assert torch.equal(getattr(w, name), t), name
        data = (tmp_path / "m" / "model.safetensors").read_bytes()
        header = struct.unpack("<Q", data[:8])[0]
        assert (len(data) - 8 - header) * 8 == S.storage_bits()

    def test_save_pretrained_from_pretrained_is_bit_exact(self, S, tmp_path):
        model = OneExperts(OneExpertsConfig(E=self.E, n_in=self.inner.K, n_out=self.inner.N))
        model.experts = nn.Parameter(S, requires_grad=False)
        discq.hf.attach(model)
        model.save_pretrained(tmp_path)
        loaded = OneExperts.from_pretrained(tmp_path)
        w = loaded.experts
        assert type(w) is type(S) and w.attributes() == S.attributes() and not w.requires_grad
        for name, t in S.stored_tensors().items():
            assert torch.equal(getattr(w, name), t), name
        x, ids = self.rows()
        with torch.no_grad():
            assert torch.equal(loaded(x, ids), model(x, ids))


class OneStack(nn.Module):
    """A module whose one parameter is an expert stack, applied row by row by `ids`."""

    def __init__(self, W):
        super().__init__()
        self.experts = nn.Parameter(W, requires_grad=False)

    def forward(self, x, ids):
        return self.experts.experts_linear(x, ids)


class OneExpertsConfig(PretrainedConfig):
    model_type = "discq_one_experts"

    def __init__(self, E: int = 2, n_in: int = 8, n_out: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.E, self.n_in, self.n_out = E, n_in, n_out


class OneExperts(PreTrainedModel):
    config_class = OneExpertsConfig

    def __init__(self, config: OneExpertsConfig):
        super().__init__(config)
        self.experts = nn.Parameter(torch.zeros(config.E, config.n_out, config.n_in))
        self.post_init()

    def forward(self, x, ids):
        return self.experts.experts_linear(x, ids)
