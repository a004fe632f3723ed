"""The Triton trellis decode against the torch reference, run by Triton's interpreter on CPU
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
    from discq.tensors import trellis
    from discq.tensors.kernels.trellis_triton import decode_weight_triton
    g = torch.Generator().manual_seed(0)
    lut = trellis.hyb_table()
    for code, bits, L in [("1mad", 2, 16), ("3inst", 3, 16), ("hyb", 2, 16), ("hyb", 4, 16),
                          ("1mad", 4, 12), ("hyb", 3, 10)]:
        for NT, KT in [(1, 1), (3, 2), (2, 5)]:  # whole and ragged program blocks
            q = torch.randint(-2**31, 2**31, (NT, KT, trellis.words(bits)), generator=g,
                              dtype=torch.int64).to(torch.int32)
            t = (lut if NT != 2 else None) if code == "hyb" else None  # own or default table
            want = trellis.decode_weight(q, bits, code, t, L)
            got = decode_weight_triton(q, bits, code, t, L)
            assert torch.equal(got, want), (code, bits, L, NT, KT, (got - want).abs().max())
    print("ok")
""")


def test_triton_decode_is_bit_exact_in_the_interpreter():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
