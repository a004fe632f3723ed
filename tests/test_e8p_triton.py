"""The Triton lattice decode against the torch reference, run by Triton's interpreter on CPU
(TRITON_INTERPRET=1 must be set before triton is imported, hence a fresh process)."""
import subprocess
import sys
import textwrap

from triton_support import require_triton

require_triton()

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from discq.tensors.kernels.e8p_ref import decode_weight, pack_lattice_codes
    from discq.tensors.kernels.e8p_triton import decode_weight_triton
    g = torch.Generator().manual_seed(0)
    for bits, hi in [(2, [65536]), (3, [65536, 256]), (4, [65536, 65536])]:
        for N, B in [(1, 1), (37, 20), (16, 16), (5, 33)]:  # tiles full, ragged, single
            codes = (torch.rand(N, B, len(hi), generator=g) * torch.tensor(hi)).long()
            q = pack_lattice_codes(codes, bits)
            assert torch.equal(decode_weight_triton(q, bits), decode_weight(q, bits)), (bits, N, B)
    print("ok")
""")


def test_triton_decode_is_bit_exact_in_the_interpreter():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
