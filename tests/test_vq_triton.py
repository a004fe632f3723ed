"""The Triton decode of vector-codebook weights against the torch reference, run by Triton's
interpreter on CPU (TRITON_INTERPRET=1 must be set before triton is imported: a fresh process)."""
import subprocess
import sys
import textwrap

from triton_support import require_triton

require_triton()

SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from discq.tensors import vq
    from discq.tensors.kernels.vq_triton import decode_weight_triton
    g = torch.Generator().manual_seed(0)
    # (bits, dim, N, K, groups rows x cols, scale_block): every index width 2..8, ragged runs
    for bits, dim, N, K, GR, GC, sb in [(2, 1, 4, 40, 2, 5, 0), (3, 1, 3, 24, 1, 3, 8),
                                         (2, 2, 6, 36, 3, 2, 0), (3, 2, 2, 60, 1, 1, 4),
                                         (4, 2, 5, 20, 5, 1, 0), (2, 4, 4, 136, 2, 1, 8)]:
        E = 2 ** (bits * dim)
        idx = torch.randint(0, E, (N, K // dim), generator=g)
        cb = torch.randint(-127, 128, (GR, GC, E, dim), generator=g).to(torch.int8)
        scale = torch.rand(GR, GC, generator=g).half() + 0.01
        bs = None
        if sb:
            e = torch.randint(0, 16, (N, K // sb), generator=g).to(torch.uint8)
            bs = vq.pack_block_scales(e)
        q = vq.pack_indices(idx, bits, dim)
        want = vq.decode_weight(q, cb, scale, bs, bits, dim, K, sb)
        got = decode_weight_triton(q, cb, scale, bs, bits, dim, K, sb)
        assert torch.equal(got, want), (bits, dim, (got - want).abs().max())
    print("ok")
""")


def test_triton_decode_is_bit_exact_in_the_interpreter():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
