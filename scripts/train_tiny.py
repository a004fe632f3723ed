"""Train the tiny test fixture: a Llama-shaped model (~1.3M parameters, byte-level vocabulary)
on the Shakespeare calibration plays, saved to tests/fixtures/tiny_llama/.

Tests of rounding algorithms use it so that they quantize real, trained weights without the
network. Run: `make fixture` (about 6 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from discq.data import eval_windows, token_stream
from discq.eval import perplexity

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_llama"


def make_model(vocab: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg)


def train(minutes: float, seq_len: int = 256, batch: int = 16, lr: float = 3e-3) -> None:
    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    ids = token_stream(tok, "shakespeare", "calibration")
    model = make_model(len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
        frac = (time.time() - t0) / (minutes * 60)
        for group in opt.param_groups:  # cosine decay over the time budget
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    save(model.eval(), tok, step)


def save(model, tok, steps: int) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)
    ppl = perplexity(model, eval_windows(tok, "shakespeare", n_windows=8, seq_len=256))
    n = sum(p.numel() for p in model.parameters())
    (OUT / "README.md").write_text(
        f"Tiny Llama test fixture: {n / 1e6:.2f}M parameters, byte-level vocabulary (ByT5Tokenizer),"
        f" trained by scripts/train_tiny.py for {steps} steps on the Shakespeare calibration plays."
        f"\nHeld-out byte perplexity (8x256 bytes of hamlet): {ppl:.2f}.\n")
    print(f"saved {OUT}: {n} parameters, held-out perplexity {ppl:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=6.0)
    train(ap.parse_args().minutes)
