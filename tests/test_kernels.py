"""The Triton affine kernels (GEMV and GEMM, fused dequantize-and-multiply) against the torch
reference, run by Triton's interpreter on CPU: a grid of bits x group size x batch x grouping
direction x symmetry, with an SQNR floor. TRITON_INTERPRET=1 must be set before triton is
imported, hence one fresh process for the whole grid."""
import json
import subprocess
import sys
import textwrap

import pytest
from triton_support import require_triton

require_triton()

SQNR_FLOOR_DB = 100.0  # fp32 accumulation in another order: ~135 dB measured

SCRIPT = textwrap.dedent("""
    import os, itertools, json
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from discq.tensors.affine import AffineQuantizedTensor
    from discq.tensors.grid import AffineGrid
    from discq.tensors.kernels.affine_ref import affine_linear_ref
    from discq.tensors.kernels.affine_triton import affine_linear_triton
    torch.manual_seed(0)
    out = {}
    grid = itertools.product([2, 3, 4, 8], [32, 64, 128], [1, 3, 16], ["input", "output"],
                             [False, True])
    for bits, g, M, along, sym in grid:
        N, K = 40, 136  # neither a multiple of the tiles nor of every group size
        W, x, b = torch.randn(N, K), torch.randn(M, K), torch.randn(N)
        q = AffineQuantizedTensor.from_hp(W, AffineGrid(bits, g, sym, along))
        args = (q.qdata, q.scale, q.zero_point, b, bits, q.group_size, along == "output", K)
        ref = affine_linear_ref(x, *args)
        y = torch.ops.discq.affine_linear_triton(x, *args)
        err = (y - ref).pow(2).sum().clamp(min=1e-30)
        out[f"{bits}/{g}/{M}/{along}/{sym}"] = float(10 * torch.log10(ref.pow(2).sum() / err))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def sqnr():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_triton_affine_kernels_match_the_reference(sqnr, bits):
    cases = {k: v for k, v in sqnr.items() if k.startswith(f"{bits}/")}
    assert len(cases) == 3 * 3 * 2 * 2  # group sizes x batches (GEMV and GEMM) x directions
    low = {k: v for k, v in cases.items() if v < SQNR_FLOOR_DB}
    assert not low, low
