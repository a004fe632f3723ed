"""The fused CPU kernel for llama.cpp's block types (`discq::gguf_linear_cpu`) against the
decode-then-matmul reference, for every type; and that GGUF weights use it where they can."""
import pytest
import torch

from discq.tensors.gguf import GGUFGrid, GGUFQuantizedTensor, dequantize_blocks
from discq.tensors.gguf_layout import TYPES, VECTOR_TYPES
from discq.tensors.kernels import gguf_cpu

pytestmark = pytest.mark.skipif(not gguf_cpu.supports(torch.zeros(1)),
                                reason="no C++ compiler for discq's CPU kernels")


def weight(ggml_type: str, N: int = 24, K: int = 512, seed: int = 0) -> GGUFQuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    return GGUFGrid(ggml_type).quantize(torch.randn(N, K, generator=g) * 0.05)


FUSED = sorted(set(TYPES) - set(VECTOR_TYPES))  # codebook types decode in torch, then matmul


@pytest.mark.parametrize("ggml_type", FUSED)
def test_every_block_decodes_exactly_as_the_reference(ggml_type):
    # rows of the identity through the many-rows path (decode rows, then one GEMM): the
    # products are w·1 and sums with zeros, so y is the decoded weight itself, bit for bit
    q = weight(ggml_type)
    eye = torch.eye(512)[:100]
    y = torch.ops.discq.gguf_linear_cpu(eye, q.qdata, None, ggml_type, 512)
    assert torch.equal(y.t(), dequantize_blocks(q.qdata, ggml_type, 512)[:, :100])


@pytest.mark.parametrize("ggml_type", FUSED)
@pytest.mark.parametrize("M", [1, 5, 64, 70])
def test_kernel_matches_decode_then_matmul(ggml_type, M):
    q = weight(ggml_type, seed=M)
    x, b = torch.randn(M, 512), torch.randn(24)
    y = torch.ops.discq.gguf_linear_cpu(x, q.qdata, b, ggml_type, 512)
    ref = x @ q.dequantize().t() + b
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum())
    assert sqnr > 100  # fp32 summation order only


def test_bf16_activations_and_no_bias():
    q = weight("Q4_K")
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    y = torch.ops.discq.gguf_linear_cpu(x, q.qdata, None, "Q4_K", 512)
    ref = x.float() @ q.dequantize().t()
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_clear_errors():
    q = weight("Q4_0")
    with pytest.raises(RuntimeError, match="unknown block type"):
        torch.ops.discq.gguf_linear_cpu(torch.randn(1, 512), q.qdata, None, "Q7_0", 512)
    with pytest.raises(RuntimeError, match="whole blocks"):
        torch.ops.discq.gguf_linear_cpu(torch.randn(1, 500), q.qdata, None, "Q4_0", 500)


def test_gguf_linears_use_the_kernel_for_inference_and_the_reference_for_gradients(monkeypatch):
    lin = torch.nn.Linear(512, 24)
    lin.weight = torch.nn.Parameter(weight("Q4_K"), requires_grad=False)
    calls = []
    real = gguf_cpu.gguf_linear
    monkeypatch.setattr(gguf_cpu, "gguf_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 7, 512)
    ref = x @ lin.weight.dequantize().t() + lin.bias
    with torch.no_grad():
        assert torch.allclose(lin(x), ref, atol=1e-4) and len(calls) == 1
        assert torch.allclose(torch.compile(lin)(x), ref, atol=1e-4)
    before = len(calls)
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()  # the kernel has no backward: the reference answers
    assert len(calls) == before
    assert torch.allclose(xg.grad, lin.weight.dequantize().sum(0).expand_as(x), atol=1e-4)


def test_codebook_types_decode_then_multiply_also_compiled():
    lin = torch.nn.Linear(512, 24)
    lin.weight = torch.nn.Parameter(weight("IQ2_XS"), requires_grad=False)
    x = torch.randn(2, 7, 512)
    ref = x @ dequantize_blocks(lin.weight.qdata, "IQ2_XS", 512).t() + lin.bias
    with torch.no_grad():
        assert torch.allclose(lin(x), ref, atol=1e-4)
        assert torch.allclose(torch.compile(lin)(x), ref, atol=1e-4)
