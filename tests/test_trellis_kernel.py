"""QTIP's CPU kernels against the torch reference: `discq::trellis_linear_cpu` (eight tiles a
vector in AVX2 lanes, or the portable loop) over shapes whose tile counts leave lanes idle and
span several threads' chunks, 1 to 16 activation rows, every code, state sizes and tables; and
`discq::qtip_linear_cpu`, the whole rotated linear in one call."""
import pytest
import torch
from discq.tensors import hadamard, trellis
from discq.tensors.kernels import trellis_cpu
from discq.tensors.qtip import TrellisQuantizedTensor

GRID = [(code, bits, L) for code, bits in (("hyb", 2), ("hyb", 3), ("hyb", 4), ("1mad", 2),
                                           ("3inst", 2), ("3inst", 4), ("1mad", 3))
        for L in (16, 12)]


def _qdata(N, K, bits, seed=0):
    """Any bitstream is a walk: random words, [N/16, K/16, 8·bits] int32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (N // 16, K // 16, trellis.words(bits)), generator=g,
                         dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("code,bits,L", GRID)
@pytest.mark.parametrize("N,K,M", [(80, 48, 1), (16, 16, 1), (48, 176, 5), (96, 32, 16)])
def test_trellis_linear_equals_decode_then_matmul(code, bits, L, N, K, M):
    if bits * trellis.CODES[code] >= L:
        pytest.skip("a step's bits must be fewer than the state's")
    q = _qdata(N, K, bits, seed=N + K + M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    ref = x @ trellis.decode_weight(q, bits, code, None, L).t()
    y = trellis_cpu.trellis_linear(x, q, None, bits, code, L)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("exact_in_fp16", [True, False])
def test_hyb_own_table(exact_in_fp16):
    """A fine-tuned table (fp16, gathered by the lanes) and one fp16 cannot hold (the portable
    loop reads it as fp32) both give the reference's product."""
    lut = trellis.fit_hyb_table(Q=8, seed=3) * 1.1
    lut = lut.half() if exact_in_fp16 else lut + 1e-4
    q = _qdata(64, 96, 2, seed=5)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    ref = x @ trellis.decode_weight(q, 2, "hyb", lut).t()
    torch.testing.assert_close(trellis_cpu.trellis_linear(x, q, lut, 2, "hyb"), ref,
                               atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("N,K", [(48, 80), (64, 32), (144, 96)])
@pytest.mark.parametrize("M", [1, 7])
def test_qtip_linear_in_one_call_equals_the_composition(N, K, M):
    """Odd factors on both sides (48 = 3·16, 80 = 5·16, 144 = 9·16), real signs (as after
    fine-tuning), a bias: the C++ rotation, product and inverse rotation equal the torch ops."""
    g = torch.Generator().manual_seed(N * K)
    s_in, s_out, q_in, q_out = hadamard.layer_rotation(N, K, seed=M)
    s_in = (s_in * (0.5 + torch.rand(K, generator=g))).half()
    s_out = (s_out * (0.5 + torch.rand(N, generator=g))).half()
    w = TrellisQuantizedTensor(_qdata(N, K, 2, seed=M), torch.tensor(0.37), s_in, s_out,
                               q_in, q_out, 2, "hyb", 16, torch.Size([N, K]), torch.float32)
    x, bias = torch.randn(M, K, generator=g), torch.randn(N, generator=g)
    ref = x @ w.dequantize().t() + bias
    y = trellis_cpu.qtip_linear(x, w.qdata, w.scale, s_in, s_out, q_in, q_out, None, bias, 2,
                                "hyb")
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, bias), ref, atol=1e-4,
                               rtol=1e-4)
