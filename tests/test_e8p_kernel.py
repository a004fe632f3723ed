"""QuIP#'s fused CPU linear `discq::e8p_linear_cpu` (2-bit E8P codes decoded in registers, the
rotations in C++) against the torch reference `e8p_linear_ref`, on every code (random codes
cover all patterns, signs and shifts), shapes with odd rotation factors, 1 to 16 rows."""
import pytest
import torch
from discq.tensors import hadamard
from discq.tensors.kernels import lattice_cpu
from discq.tensors.kernels.e8p_ref import e8p_linear_ref
from discq.tensors.lattice_ops import e8p_linear


@pytest.mark.parametrize("N,K", [(48, 80), (64, 32), (144, 96), (8, 8)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_e8p_linear_cpu_equals_the_reference(N, K, M):
    g = torch.Generator().manual_seed(N * K + M)
    s_in, s_out, q_in, q_out = hadamard.layer_rotation(N, K, seed=M)
    s_in = (s_in * (0.5 + torch.rand(K, generator=g))).half()  # real, as after fine-tuning
    s_out = (s_out * (0.5 + torch.rand(N, generator=g))).half()
    qdata = torch.randint(0, 256, (N, K // 4), generator=g, dtype=torch.uint8)
    x, bias = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    scale = torch.tensor(0.61)
    ref = e8p_linear_ref(x, qdata, scale, s_in, s_out, q_in, q_out, bias, 2)
    y = lattice_cpu.e8p_linear(x, qdata, scale, s_in, s_out, q_in, q_out, bias)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # the op the format lowers to takes this kernel for few rows, and agrees
    torch.testing.assert_close(e8p_linear(x, qdata, scale, s_in, s_out, q_in, q_out, bias, 2),
                               ref, atol=1e-4, rtol=1e-4)


def test_e8p_linear_cpu_without_bias_keeps_leading_dims():
    N, K = 32, 64
    s_in, s_out, q_in, q_out = hadamard.layer_rotation(N, K, seed=0)
    qdata = torch.randint(0, 256, (N, K // 4), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    x = torch.randn(2, 3, K)
    ref = e8p_linear_ref(x, qdata, torch.tensor(1.0), s_in.half(), s_out.half(), q_in, q_out,
                         None, 2)
    y = lattice_cpu.e8p_linear(x, qdata, torch.tensor(1.0), s_in.half(), s_out.half(), q_in,
                               q_out, None)
    assert y.shape == (2, 3, N)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
