"""QTIP: the trellis codes, the bitstream, Viterbi (reference and C++), tail-biting, the format's
kernel and gradients, BlockLDLQ on tiles, the method on the trained fixture, config checks."""
import copy
import itertools

import pytest
import torch
from discq.passes import qtip_config
from discq.passes.gptq import proxy_loss
from discq.passes.qtip import quantize_group
from discq.tensors import trellis, viterbi
from discq.tensors.kernels import trellis_cpu
from discq.tensors.qtip import TrellisQuantizedTensor
from hypothesis import given, settings
from hypothesis import strategies as st

import discq

CODES = [("1mad", 2), ("3inst", 2), ("hyb", 2), ("1mad", 3), ("hyb", 3), ("3inst", 4),
         ("hyb", 4)]


def _lut():
    return trellis.hyb_table()


def _table(code):
    return trellis.state_table(code, _lut() if code == "hyb" else None)


# ---- codes ----------------------------------------------------------------------------------

def _slow_value(code: str, s: int, lut) -> list[float]:
    """One state's value from the definitions, in Python integers."""
    if code == "1mad":
        x = (34038481 * s + 76625530) % 2**32
        return [(sum((x >> (8 * i)) & 255 for i in range(4)) - 510) / 147.8]
    if code == "3inst":
        x = (((89226354 * s + 64248484) % 2**32) & 0x8FFF8FFF) ^ 0x3B603B60
        halves = [x & 0xFFFF, x >> 16]
        return [sum(float(torch.tensor([h], dtype=torch.int32).to(torch.int16)
                          .view(torch.float16)) for h in halves)]
    h = s * (s + 1)
    row = lut[(h >> 6) & 511].float().tolist()
    return [-row[0] if (h >> 15) & 1 else row[0], row[1]]


@pytest.mark.parametrize("code", ["1mad", "3inst", "hyb"])
def test_every_state_decodes_to_its_codes_value(code):
    lut = _lut()
    table = trellis.state_table(code, lut if code == "hyb" else None)
    assert table.shape == (2**16, trellis.CODES[code])
    for s in list(range(0, 2**16, 97)) + [0, 1, 2**15, 2**16 - 1]:
        assert table[s].tolist() == pytest.approx(_slow_value(code, s, lut), abs=1e-6), s


def test_hyb_default_table_is_the_gaussian_fit():
    lut = trellis.hyb_table()
    assert lut.shape == (512, 2) and lut.dtype == torch.float16
    assert float(lut.float().std(unbiased=False)) == pytest.approx(0.968, abs=1e-3)
    # the constant is what the fit gives (to fp16, whatever this machine's float arithmetic)
    torch.testing.assert_close(trellis.fit_hyb_table().half().float(), lut.float(), atol=2e-3,
                               rtol=0)
    # HYB weights coded with it store no table; decoding uses the constant
    assert torch.equal(trellis.state_table("hyb"), trellis.state_table("hyb", lut))


# ---- the bitstream --------------------------------------------------------------------------

@given(st.sampled_from(CODES), st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_pack_unpack_identity_of_tail_biting_walks(code_bits, seed):
    code, bits = code_bits
    V = trellis.CODES[code]
    kV, T = bits * V, trellis.steps(code)
    g = torch.Generator().manual_seed(seed)
    new = torch.randint(0, 2**kV, (3, T), generator=g)  # any bitstream is a tail-biting walk
    c = -(-16 // kV)  # steps whose bits a state holds
    states = torch.zeros(3, T, dtype=torch.int64)
    for t in range(T):  # the state: the last 16 bits of the cyclic stream up to step t
        for i in range(t - c + 1, t + 1):
            states[:, t] = (states[:, t] << kV) | new[:, i % T]
    states &= 0xFFFF
    assert trellis.tail_bites(states, bits, V).all()
    q = trellis.pack_states(states, bits, V)
    assert q.shape == (3, trellis.words(bits)) and q.dtype == torch.int32
    assert torch.equal(trellis.unpack_states(q, bits, V), states)


def test_tiles_round_trip():
    W = torch.randn(32, 48)
    for V in (1, 2):
        t = trellis.to_tiles(W, V)
        assert t.shape == (2, 3, 256 // V, V)
        assert torch.equal(t[1, 2].reshape(16, 16), W[16:32, 32:48])
        assert torch.equal(trellis.from_tiles(t), W)


# ---- Viterbi --------------------------------------------------------------------------------

def _exhaustive(x, values, kV, L, overlap=None):
    """The best walk by enumeration (tiny L and T)."""
    T = x.shape[0]
    best, arg = float("inf"), None
    for s0 in range(2**L):
        for new in itertools.product(range(2**kV), repeat=T - 1):
            states = [s0]
            for n in new:
                states.append(((states[-1] << kV) & (2**L - 1)) | n)
            if overlap is not None and not (states[0] >> kV == overlap
                                            and states[-1] & (2**(L - kV) - 1) == overlap):
                continue
            e = float((x - values[states]).pow(2).sum())
            if e < best:
                best, arg = e, states
    return best, arg


@pytest.mark.parametrize("kV,V", [(1, 1), (2, 1), (2, 2)])
@pytest.mark.parametrize("constrained", [False, True])
def test_viterbi_equals_exhaustive_search(kV, V, constrained):
    L, T = 4, 4
    g = torch.Generator().manual_seed(kV + 3 * V)
    values = torch.randn(2**L, V, generator=g)
    for trial in range(4):
        x = torch.randn(T, V, generator=g)
        overlap = torch.tensor([trial % 2**(L - kV)]) if constrained else None
        states = viterbi.viterbi(x[None], values, kV, overlap)[0]
        best, _ = _exhaustive(x, values, kV, L, None if overlap is None else int(overlap))
        assert float(viterbi.walk_error(x[None], values, states[None])) == pytest.approx(best)


@pytest.mark.parametrize("code,bits", [("1mad", 2), ("hyb", 2), ("3inst", 3)])
def test_viterbi_is_never_worse_than_greedy_coding(code, bits):
    values = _table(code)
    V = trellis.CODES[code]
    kV = bits * V
    x = torch.randn(6, trellis.steps(code), V, generator=torch.Generator().manual_seed(1))
    free = viterbi.viterbi(x, values, kV)
    tb = viterbi.tail_biting(x, values, kV)
    for i in range(6):  # the walk that starts best and then steps best
        s = int((x[i, 0] - values).pow(2).sum(-1).argmin())
        greedy = [s]
        for t in range(1, x.shape[1]):
            cands = ((s << kV) & 0xFFFF) + torch.arange(2**kV)
            s = int(cands[(x[i, t] - values[cands]).pow(2).sum(-1).argmin()])
            greedy.append(s)
        e_greedy = viterbi.walk_error(x[i:i + 1], values, torch.tensor([greedy]))
        assert viterbi.walk_error(x[i:i + 1], values, free[i:i + 1]) <= e_greedy  # optimal
        assert viterbi.walk_error(x[i:i + 1], values, tb[i:i + 1]) <= e_greedy
    # tail-biting costs a few percent against the free walk (measured 3-5%)
    assert viterbi.walk_error(x, values, tb).sum() <= 1.08 * viterbi.walk_error(
        x, values, free).sum()


@pytest.mark.parametrize("code,bits", CODES)
def test_cpu_kernel_equals_the_reference(code, bits):
    values = _table(code)
    V = trellis.CODES[code]
    x = torch.randn(5, trellis.steps(code), V, generator=torch.Generator().manual_seed(bits))
    overlap = torch.tensor([0, 3, 17, 255, 2**(16 - bits * V) - 1])
    for ov in (None, overlap):
        ref = viterbi.viterbi(x, values, bits * V, ov)
        assert torch.equal(trellis_cpu.viterbi(x, values, bits * V, ov), ref)


@pytest.mark.parametrize("code,bits", [("1mad", 2), ("hyb", 2), ("hyb", 3)])
def test_tail_biting_walks_tail_bite(code, bits):
    values = _table(code)
    V = trellis.CODES[code]
    x = torch.randn(8, trellis.steps(code), V, generator=torch.Generator().manual_seed(2))
    states = viterbi.quantize_tiles(x, values, bits * V)
    assert trellis.tail_bites(states, bits, V).all()
    # the last state's low bits are the first state's high bits
    assert torch.equal(states[:, -1] & (2**(16 - bits * V) - 1), states[:, 0] >> (bits * V))


# paper's figures (QTIP, Table 1, L = 16, 2 bits): about 0.069 for 1MAD, 3INST and HYB; the
# Gaussian distortion-rate bound is 0.0625
@pytest.mark.parametrize("code", ["1mad", "3inst", "hyb"])
def test_two_bit_mse_on_gaussian_data_approaches_the_papers(code):
    values = _table(code)
    V = trellis.CODES[code]
    x = torch.randn(16, trellis.steps(code), V, generator=torch.Generator().manual_seed(3))
    best = min(float(viterbi.walk_error(x * a, values, viterbi.quantize_tiles(
        x * a, values, 2 * V)).sum() / (x * a).pow(2).sum()) for a in (0.9, 1.0, 1.1, 1.25))
    assert 0.0625 < best < 0.076, best


# ---- the format -----------------------------------------------------------------------------

@pytest.mark.parametrize("code,bits,L", [("1mad", 2, 16), ("3inst", 3, 16), ("hyb", 4, 16),
                                         ("hyb", 2, 12), ("1mad", 3, 10)])
def test_kernel_equals_decode_then_matmul(code, bits, L):
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(4))
    q = TrellisQuantizedTensor.from_hp(W, bits, code, state_bits=L)
    assert trellis.tail_bites(q.states().flatten(0, 1), bits, trellis.CODES[code], L).all()
    assert int(q.states().max()) < 2**L
    Wr = trellis.decode_weight(q.qdata, bits, code, q.lut, L)
    x = torch.randn(3, 64)
    y = trellis_cpu.trellis_linear(x, q.qdata, q.lut, bits, code, L)
    torch.testing.assert_close(y, x @ Wr.t(), atol=1e-4, rtol=1e-5)


def test_fewer_state_bits_cost_some_error():
    W = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    err = {L: float((TrellisQuantizedTensor.from_hp(W, 2, "1mad", state_bits=L).dequantize()
                     - W).pow(2).mean()) for L in (10, 16)}
    assert err[16] < err[10] < 1.3 * err[16], err


def test_gradients_of_activations_signs_and_table():
    W = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    q = TrellisQuantizedTensor.from_hp(W, 2, "hyb")
    x = torch.randn(4, 32, requires_grad=True)
    s_in = q.s_in.float().requires_grad_()
    lut = trellis.hyb_table().float().requires_grad_()  # a tuned table (the weight has none)
    args = (q.qdata, q.scale, s_in, q.s_out.float(), q.q_in, q.q_out, lut, None, 2, "hyb", 16)

    def f(x, s_in, lut):
        a = list(args)
        a[2], a[6] = s_in, lut
        return torch.ops.discq.qtip_linear(x, *a).pow(2).sum()

    torch.autograd.gradcheck(lambda x, s, t: f(x.float(), s.float(), t.float()),
                             (x.double(), s_in.double(), lut.double()), eps=1e-3, atol=5e-2,
                             rtol=5e-2, nondet_tol=1e-5, fast_mode=True)


def test_blockldlq_beats_tile_by_tile_coding_on_the_proxy_loss():
    from test_quip import _random_pd
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    H = _random_pd(64, 1)
    (q,) = quantize_group([("layer", W)], H, qtip_config(2, finetune=False))
    near = TrellisQuantizedTensor.from_hp(W, 2, "hyb", seed=0)
    assert proxy_loss(W, q.dequantize(), H) < 0.8 * proxy_loss(W, near.dequantize(), H)


# ---- the method -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qtip_tiny(tiny_llama, tiny_calibration):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, qtip_config(2, tiny_calibration, finetune=False))
    return model


def test_two_bit_qtip_on_the_trained_fixture(tiny_llama, tiny_windows, qtip_tiny):
    from discq.eval import perplexity
    fp = perplexity(tiny_llama[0], tiny_windows, progress=False)
    rtn = copy.deepcopy(tiny_llama[0])
    discq.quantize_(rtn, discq.rtn_config(2, 64))
    p_rtn = perplexity(rtn, tiny_windows, progress=False)
    p = perplexity(qtip_tiny, tiny_windows, progress=False)
    assert p < fp + 0.4 * (p_rtn - fp), (fp, p, p_rtn)
    ws = [m.weight for m in qtip_tiny.modules() if isinstance(m, torch.nn.Linear)
          and isinstance(m.weight, TrellisQuantizedTensor)]
    assert ws and all(w.bits == 2 and w.code == "hyb" for w in ws)


def test_finetuning_keeps_codes_and_tunes_the_table(tiny_llama, tiny_calibration):
    model = copy.deepcopy(tiny_llama[0])
    discq.quantize_(model, qtip_config(2, tiny_calibration, ft_steps=4, ft_block_epochs=1,
                                       trainer_kwargs=dict(enable_progress_bar=False)))
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)
          and isinstance(m.weight, TrellisQuantizedTensor)]
    assert ws and all(w.lut is not None and w.lut.dtype == torch.float16 for w in ws)
    assert any(not torch.equal(w.lut, trellis.hyb_table()) for w in ws)
    assert all(trellis.tail_bites(w.states().flatten(0, 1), 2, 2).all() for w in ws)


def test_config_checks():
    with pytest.raises(ValueError, match="code"):
        qtip_config(2, code="e8p")
    with pytest.raises(ValueError, match="bits"):
        qtip_config(5)
    with pytest.raises(ValueError, match="scale_override"):
        qtip_config(2, scale_override=0)
    with pytest.raises(ValueError, match="state_bits"):
        qtip_config(2, state_bits=17)
    with pytest.raises(ValueError, match="state_bits"):
        qtip_config(4, code="hyb", state_bits=8)  # needs more than bits·V = 8
    with pytest.raises(ValueError, match="16"):
        TrellisQuantizedTensor.from_hp(torch.randn(24, 32), 2)
