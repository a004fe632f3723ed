"""Quantization of exported programs: the graph pass and the export of a quantized model."""
import subprocess
import sys

import pytest
import torch
from discq.passes.export import quantize_exported
from models import tiny_random_llama
from torch import nn

import discq

X = torch.randint(0, 320, (1, 8))
NOT_HEAD = lambda fqn: "lm_head" not in fqn


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out.logits


@pytest.fixture(scope="module")
def exported():
    model = tiny_random_llama(tie=False)
    return model, torch.export.export(model, (X,), kwargs={"use_cache": False})


def _eager_rtn(fqn_filter=NOT_HEAD):
    m = tiny_random_llama(tie=False)
    discq.quantize_(m, discq.rtn_config(4, 32),
                    filter_fn=lambda mod, f: isinstance(mod, nn.Linear) and fqn_filter(f))
    return m


def test_pass_replaces_linears_and_equals_eager_quantization(exported):
    _, ep = exported
    qep = quantize_exported(ep, discq.rtn_config(4, 32), filter_fn=NOT_HEAD)
    targets = [n.target for n in qep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.discq.affine_linear.default) == 14  # 2 blocks x 7
    assert targets.count(torch.ops.aten.linear.default) == 1  # the head stays fp
    assert "model.layers.0.mlp.up_proj.weight" not in qep.state_dict
    qep.validate()
    eager = _eager_rtn()
    assert torch.equal(_logits(qep.module()(X, use_cache=False)), eager(X).logits)


def test_run_decompositions_keeps_the_quantized_op():
    mlp = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = torch.randn(3, 64)
    qep = quantize_exported(torch.export.export(mlp, (x,)), discq.rtn_config(3, 32))
    dec = qep.run_decompositions()
    dec.validate()
    assert sum(n.target == torch.ops.discq.affine_linear.default for n in dec.graph.nodes) == 2
    assert torch.equal(dec.module()(x), qep.module()(x))


@pytest.mark.parametrize("tie", [True, False])
def test_decomposed_llama_program_runs_and_equals_the_quantized_one(tie):
    """Tied head: the head's weight stays in the program (the embedding reads it) beside its
    quantized constants, whose names must not nest under it (`lm_head.weight_qdata`)."""
    model = tiny_random_llama(tie=tie)
    ep = torch.export.export(model, (X,), kwargs={"use_cache": False})
    qep = quantize_exported(ep, discq.rtn_config(3, 32))
    dec = qep.run_decompositions()
    dec.validate()
    ref = _logits(qep.module()(X, use_cache=False))
    assert torch.allclose(_logits(dec.module()(X, use_cache=False)), ref, atol=1e-5)


def test_compile_and_save_load_in_a_fresh_process(exported, tmp_path):
    _, ep = exported
    qep = quantize_exported(ep, discq.rtn_config(3, 32), filter_fn=NOT_HEAD)
    ref = _logits(qep.module()(X, use_cache=False))
    compiled = torch.compile(qep.module())
    assert torch.allclose(_logits(compiled(X, use_cache=False)), ref, atol=1e-5)
    torch.export.save(qep, tmp_path / "q.pt2")
    torch.save(X, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    # importing discq registers the op; transformers registers its output type as a pytree
    code = (f"import torch, discq, transformers.modeling_outputs; ep = torch.export.load('{tmp_path}/q.pt2'); "
            f"x = torch.load('{tmp_path}/x.pt', weights_only=True); out = ep.module()(x, use_cache=False); "
            f"out = out[0] if isinstance(out, (tuple, list)) else out.logits; "
            f"assert torch.equal(out, torch.load('{tmp_path}/ref.pt', weights_only=True)); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().endswith("ok"), done.stderr[-1500:]


def test_data_driven_results_enter_as_quantized_state(exported):
    model, ep = exported
    g = tiny_random_llama(tie=False)
    discq.quantize_(g, discq.gptq_config(3, 32, calibration=[X]),
                    filter_fn=lambda m, f: isinstance(m, nn.Linear) and NOT_HEAD(f))
    state = {n: p for n, p in g.named_parameters() if isinstance(p, discq.AffineQuantizedTensor)}
    qep = quantize_exported(ep, discq.gptq_config(3, 32), quantized_state=state,
                            filter_fn=lambda f: f in state)
    assert torch.equal(_logits(qep.module()(X, use_cache=False)), g(X).logits)
    with pytest.raises(ValueError, match="quantized_state"):
        quantize_exported(ep, discq.gptq_config(3, 32), filter_fn=NOT_HEAD)


def test_eager_quantize_then_export_is_one_node_per_layer(tmp_path):
    eager = _eager_rtn()
    ep = torch.export.export(eager, (X,), kwargs={"use_cache": False})
    n = sum(node.target == torch.ops.discq.affine_linear.default for node in ep.graph.nodes)
    assert n == 14
    torch.export.save(ep, tmp_path / "e.pt2")
    again = torch.export.load(tmp_path / "e.pt2")
    assert torch.equal(_logits(again.module()(X, use_cache=False)), eager(X).logits)


def test_bad_arguments():
    with pytest.raises(TypeError, match="ExportedProgram"):
        quantize_exported(nn.Linear(2, 2), discq.rtn_config())


def test_aot_inductor_package_runs_in_a_fresh_process(tmp_path):
    """AOTInductor compiles the quantized program to a C++ package (the op's Inductor
    decomposition lowers it: unpack, dequantize, matmul); a fresh process loads and runs it."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    x = torch.randn(3, 64)
    qep = quantize_exported(torch.export.export(mlp, (x,)), discq.rtn_config(4, 32))
    pkg = torch._inductor.aoti_compile_and_package(qep, package_path=str(tmp_path / "q.pt2"))
    torch.save((x, qep.module()(x)), tmp_path / "io.pt")
    code = (f"import torch, discq; m = torch._inductor.aoti_load_package({pkg!r}); "
            f"x, ref = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True); "
            f"assert torch.allclose(m(x), ref, atol=1e-5), (m(x) - ref).abs().max(); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]
