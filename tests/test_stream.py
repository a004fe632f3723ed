"""Resumable block-by-block runs (`checkpoint_dir`) and streaming quantization from disk
(`discq.quantize_pretrained`): each equals the in-memory run bit for bit."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import discq
import discq.passes.gptq as gptq_module
from discq.passes import gptq_config, gptvq_config, quip_sharp_config, rtn_config
from discq.passes.activations import MappedActivations
from discq.pipeline import keep_head_filter
from discq.stream import ShardReader, quantize_pretrained

from conftest import TINY_LLAMA


def four_block_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=192,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=tie, max_position_embeddings=128,
                      architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


CALIB = [torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(i))
         for i in range(3)]
EVERY_LINEAR = lambda m, fqn: isinstance(m, nn.Linear)  # noqa: E731  (the head too)


def same_model(a: nn.Module, b: nn.Module) -> None:
    """Every stored tensor equal (quantized weights part by part) and identical logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, t in sa.items():
        if hasattr(t, "stored_tensors"):
            for part, v in t.stored_tensors().items():
                assert torch.equal(v, sb[k].stored_tensors()[part]), (k, part)
        else:
            assert torch.equal(t, sb[k]), k
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(9))
    assert torch.equal(a(ids).logits, b(ids).logits)


class Interrupt:
    """Raise KeyboardInterrupt at the n-th call of `owner.name` (a crash mid-run)."""

    def __init__(self, monkeypatch, owner, name: str, n: int):
        self.calls, original = 0, getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == n:
                raise KeyboardInterrupt
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("make", [
    lambda d: gptq_config(3, 32, calibration=CALIB, checkpoint_dir=d),
    lambda d: gptvq_config(2, 2, calibration=CALIB, kmeans_iters=3, codebook_steps=2,
                           group_size=1024, checkpoint_dir=d),
], ids=["gptq", "gptvq"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, make):
    base = four_block_llama()
    ref = copy.deepcopy(base)
    discq.quantize_(ref, make(None), filter_fn=EVERY_LINEAR)
    with monkeypatch.context() as m:  # the 16th layer is in block 2 (7 linears a block)
        owner = gptq_module if make(None).method == "gptq" else discq.passes.gptvq
        Interrupt(m, owner, f"{make(None).method}_layer", 16)
        with pytest.raises(KeyboardInterrupt):
            discq.quantize_(copy.deepcopy(base), make(tmp_path), filter_fn=EVERY_LINEAR)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["blocks_done"] == 2 and not state["rest_done"]
    counter = Interrupt(monkeypatch, owner, f"{make(None).method}_layer", 10**6)
    resumed = copy.deepcopy(base)
    discq.quantize_(resumed, make(tmp_path), filter_fn=EVERY_LINEAR)
    assert counter.calls == 2 * 7 + 1  # blocks 2 and 3 and the head: nothing redone
    same_model(ref, resumed)
    assert not (tmp_path / "hidden-0.bin").exists()  # the activation files are removed
    again = copy.deepcopy(base)  # a finished run's directory restores everything
    discq.quantize_(again, make(tmp_path), filter_fn=EVERY_LINEAR)
    assert counter.calls == 2 * 7 + 1
    same_model(ref, again)


@pytest.mark.parametrize("make", [
    lambda d: gptq_config(3, 32, calibration=CALIB, checkpoint_dir=d, hessian="kl"),
    lambda d: gptvq_config(2, 2, calibration=CALIB, kmeans_iters=3, codebook_steps=2,
                           group_size=1024, checkpoint_dir=d, hessian="kl"),
], ids=["gptq", "gptvq"])
def test_an_interrupted_kl_run_resumes_without_passes_or_redone_layers(tmp_path, monkeypatch,
                                                                       make):
    """hessian="kl": the factors' pass and the layers rounded before the crash are read back."""
    import discq.passes.kl_hessian as kh
    base = four_block_llama()
    ref = copy.deepcopy(base)
    discq.quantize_(ref, make(None), filter_fn=EVERY_LINEAR)
    owner = gptq_module if make(None).method == "gptq" else discq.passes.gptvq
    with monkeypatch.context() as m:
        Interrupt(m, owner, f"{make(None).method}_layer", 16)
        with pytest.raises(KeyboardInterrupt):
            discq.quantize_(copy.deepcopy(base), make(tmp_path), filter_fn=EVERY_LINEAR)
    passes = Interrupt(monkeypatch, kh, "collect", 10**6)
    counter = Interrupt(monkeypatch, owner, f"{make(None).method}_layer", 10**6)
    resumed = copy.deepcopy(base)
    discq.quantize_(resumed, make(tmp_path), filter_fn=EVERY_LINEAR)
    assert passes.calls == 0 and counter.calls == 4 * 7 + 1 - 15  # the rest only
    same_model(ref, resumed)
    other = copy.deepcopy(base)  # other settings: nothing of the first run is taken
    discq.quantize_(other, gptq_config(4, 32, calibration=CALIB, checkpoint_dir=tmp_path,
                                       hessian="kl"), filter_fn=EVERY_LINEAR)
    assert passes.calls == 1


@pytest.mark.parametrize("finetune", [False, True])
def test_quip_sharp_resumes_with_and_without_block_finetuning(tmp_path, monkeypatch, finetune):
    from discq.passes.quip_sharp import RotatedBlocks
    base = four_block_llama(tie=True)
    ft = dict(finetune=True, ft_block_epochs=1, steps=2) if finetune else dict(finetune=False)
    ref = copy.deepcopy(base)
    discq.quantize_(ref, quip_sharp_config(2, calibration=CALIB, **ft))
    with monkeypatch.context() as m:  # 4 groups a block: the 10th is in block 2
        Interrupt(m, RotatedBlocks, "quantize_group", 10)
        with pytest.raises(KeyboardInterrupt):
            discq.quantize_(copy.deepcopy(base),
                            quip_sharp_config(2, calibration=CALIB, checkpoint_dir=tmp_path, **ft))
    assert json.loads((tmp_path / "blocks" / "state.json").read_text())["blocks_done"] == 2
    resumed = copy.deepcopy(base)
    discq.quantize_(resumed, quip_sharp_config(2, calibration=CALIB, checkpoint_dir=tmp_path,
                                               **ft))
    same_model(ref, resumed)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    discq.quantize_(four_block_llama(), gptq_config(3, 32, calibration=CALIB,
                                                   checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        discq.quantize_(four_block_llama(), gptq_config(4, 32, calibration=CALIB,
                                                       checkpoint_dir=tmp_path))
    with pytest.raises(TypeError, match="checkpoint_dir must be a directory path"):
        gptq_config(3, checkpoint_dir=3)


def test_mapped_activations_swap_and_keep_both_sets(tmp_path):
    acts = MappedActivations(tmp_path, [(2, 3), (1, 5)])
    h0, h1 = torch.randn(2, 3, 4), torch.randn(1, 5, 4)
    assert torch.equal(acts.capture(0, h0), h0) and torch.equal(acts.capture(1, h1), h1)
    acts.output(0, h0 * 2)
    acts.swap()
    assert torch.equal(acts.view(acts.current, 0), h0 * 2)
    assert torch.equal(acts.view(1 - acts.current, 0), h0)  # the old inputs are intact
    reopened = MappedActivations(tmp_path, [(2, 3), (1, 5)], current=1)
    reopened.reopen(h0)
    assert torch.equal(reopened.view(1, 0), h0 * 2) and torch.equal(reopened.view(0, 1), h1)
    with pytest.raises(RuntimeError, match="offloading expects"):
        acts.output(1, torch.randn(1, 4, 4))
    acts.remove()
    assert not any(tmp_path.iterdir())


# ---- streaming from disk -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_llama, tiny_calibration):
    model, tok = tiny_llama
    return model, [b[:4, :64] for b in tiny_calibration]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streaming_equals_the_in_memory_run(tmp_path, tiny, method):
    model, calib = tiny
    cfg = rtn_config(3, 32) if method == "rtn" else gptq_config(3, 32, calibration=calib)
    ref = copy.deepcopy(model)
    discq.quantize_(ref, cfg, filter_fn=keep_head_filter(ref))
    out = quantize_pretrained(TINY_LLAMA, cfg, tmp_path / "out")
    streamed = discq.load_quantized(out)
    same_model(ref, streamed)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == model.config.num_hidden_layers + 1
    assert not (tmp_path / "out.partial").exists()
    assert (out / "tokenizer_config.json").is_file()


def test_streaming_a_sharded_bf16_checkpoint_in_fp32(tmp_path):
    base = four_block_llama(tie=True).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "src", max_shard_size="150KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(set(ShardReader(tmp_path / "src").files.values())) > 2
    cfg = gptq_config(4, 32, calibration=CALIB)
    # the reference read from the same files in fp32 (`base.float()` would keep the rotary
    # table rounded to bf16, which a model built in fp32 does not have)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    discq.quantize_(ref, cfg, filter_fn=keep_head_filter(ref))
    out = quantize_pretrained(tmp_path / "src", cfg, tmp_path / "out", dtype=torch.float32)
    streamed = discq.load_quantized(out)
    assert streamed.lm_head.weight is streamed.model.embed_tokens.weight  # tied stays tied
    same_model(ref, streamed)


def test_streaming_quantizes_the_head_when_asked(tmp_path):
    base = four_block_llama()
    base.save_pretrained(tmp_path / "src")
    cfg = gptq_config(4, 32, calibration=CALIB)
    ref = copy.deepcopy(base)
    discq.quantize_(ref, cfg)
    out = quantize_pretrained(tmp_path / "src", cfg, tmp_path / "out", quantize_head=True)
    same_model(ref, discq.load_quantized(out))


KILL = textwrap.dedent("""
    import os, signal, sys, torch
    import discq.stream as stream
    from discq.passes import gptq_config
    calib = [torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(i))
             for i in range(3)]
    done = stream.StreamedBlocks.done
    def die(self, i, *a):
        done(self, i, *a)
        if i == 1 and sys.argv[3] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind
    stream.StreamedBlocks.done = die
    stream.quantize_pretrained(sys.argv[1], gptq_config(3, 32, calibration=calib), sys.argv[2])
""")


def test_a_killed_streaming_run_resumes_to_identical_files(tmp_path):
    four_block_llama().save_pretrained(tmp_path / "src")
    script = tmp_path / "run.py"
    script.write_text(KILL)

    def run(out, how):
        return subprocess.run([sys.executable, str(script), str(tmp_path / "src"), str(out), how],
                              capture_output=True, text=True, timeout=600)
    assert run(tmp_path / "ref", "normal").returncode == 0
    killed = run(tmp_path / "out", "kill")
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists()  # out_dir appears only when complete
    state = json.loads((tmp_path / "out.partial" / "state.json").read_text())
    assert state["blocks_done"] == 2
    resumed = run(tmp_path / "out", "normal")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2/4" in resumed.stderr  # the bar starts after the finished blocks
    for name in sorted(os.listdir(tmp_path / "ref")):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_streaming_refuses_what_it_cannot_do(tmp_path):
    from discq.passes import disc_config
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        quantize_pretrained(TINY_LLAMA, rtn_config(4), tmp_path / "full")
    with pytest.raises(ValueError, match="end to end"):
        quantize_pretrained(TINY_LLAMA, disc_config(calibration=CALIB), tmp_path / "o")
    with pytest.raises(ValueError, match="finetune=False"):
        quantize_pretrained(TINY_LLAMA, quip_sharp_config(2, calibration=CALIB), tmp_path / "o")
    with pytest.raises(TypeError, match="dtype"):
        quantize_pretrained(TINY_LLAMA, rtn_config(4), tmp_path / "o", dtype="fp32")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        quantize_pretrained(tmp_path / "full", rtn_config(4), tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ---- the memory plan and the command line --------------------------------------------------

def test_the_plan_counts_what_each_kind_of_run_holds():
    from discq.passes import disc_config
    from discq.passes.memory_plan import plan_run
    from discq.passes.quantize import select_linears
    model = four_block_llama()
    targets = select_linears(model, keep_head_filter(model))
    n = sum(m.weight.numel() for _, m in targets)
    memory = plan_run(model, gptq_config(3, 32), targets, tokens=4096)
    stream = plan_run(model, gptq_config(3, 32), targets, tokens=4096, stream=True)
    disc = plan_run(model, disc_config(3, 32), targets, tokens=4096)
    assert memory.parts["model"] == sum(p.numel() * 4 for p in model.parameters())
    assert memory.parts["calibration activations"] == 3 * 4096 * 192 * 4  # widest input
    assert stream.peak < memory.peak and "model" not in stream.parts
    assert disc.parts["relaxation and optimizer state"] == 20 * n
    assert "estimated peak" in memory.describe() and memory.seconds > 0
    with pytest.raises(ValueError, match="cannot stream"):
        plan_run(model, disc_config(3, 32), targets, stream=True)
    kl = plan_run(model, gptq_config(3, 32, hessian="kl"), targets, tokens=4096)
    two = plan_run(model, gptq_config(3, 32, hessian="kl", kl_rows=16), targets, tokens=4096)
    K2 = sum(m.in_features ** 2 for _, m in targets)
    assert kl.parts["KL Hessian factors (one pass's share)"] == 4 * K2  # the input side only
    assert two.parts["KL Hessian factors (one pass's share)"] == 4 * K2 + 4 * sum(
        m.out_features ** 2 for _, m in targets)
    assert kl.peak > memory.peak and kl.seconds > memory.seconds
    with pytest.raises(ValueError, match="cannot stream"):
        plan_run(model, gptq_config(3, 32, hessian="kl"), targets, stream=True)


def test_a_run_the_machine_cannot_hold_is_refused_before_any_work(monkeypatch, tmp_path):
    import discq.passes.memory_plan as memory_plan
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 1000)
    model = four_block_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryError, match="discq plan"):
        discq.quantize_(model, gptq_config(3, 32, calibration=CALIB))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MemoryError, match="one block"):
        quantize_pretrained(TINY_LLAMA, rtn_config(4), tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_available_memory_is_positive_and_within_the_machine():
    import psutil

    from discq.passes.memory_plan import available_bytes
    assert 0 < available_bytes() <= psutil.virtual_memory().total


def test_plan_and_streaming_from_the_command_line(tmp_path, capsys):
    from conftest import CALIB_TEXT

    from discq.cli import main  # in this process: the subprocess CLI tests cover start-up

    def cli(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    code, out, _ = cli("plan", TINY_LLAMA, "--method", "gptq", "--n-calib", "8",
                       "--seq-len", "64", "--stream", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["stream"] and "one block" in plan["parts_gib"]
    code, _, err = cli("plan", TINY_LLAMA, "--method", "disc", "--stream")
    assert code == 2 and "cannot stream" in err
    code, out, _ = cli("quantize", TINY_LLAMA, "--method", "gptq", "--bits", "3",
                       "--group-size", "32", "--calib", CALIB_TEXT, "--n-calib", "8",
                       "--seq-len", "64", "--stream", "--out", tmp_path / "q", "--json")
    assert code == 0 and json.loads(out)["streamed"]
    model = discq.load_quantized(tmp_path / "q")
    assert 3.5 < discq.bits_per_weight(model) < 4
    code, _, err = cli("quantize", TINY_LLAMA, "--method", "rtn", "--checkpoint-dir",
                       tmp_path / "c", "--out", tmp_path / "r")
    assert code == 2 and "keeps no checkpoints" in err
    code, _, err = cli("quantize", TINY_LLAMA, "--method", "gptq", "--stream",
                       "--checkpoint-dir", tmp_path / "c", "--out", tmp_path / "r")
    assert code == 2 and "resumes from <out>.partial" in err
    code, _, _ = cli("quantize", TINY_LLAMA, "--method", "gptq", "--calib", CALIB_TEXT,
                     "--n-calib", "4", "--seq-len", "64", "--eval-windows", "0",
                     "--checkpoint-dir", tmp_path / "c", "--out", tmp_path / "g")
    state = json.loads((tmp_path / "c" / "state.json").read_text())
    assert code == 0 and state["blocks_done"] == 4 and (tmp_path / "g" / "config.json").is_file()


def test_fine_tuning_refuses_the_sharded_strategy():
    with pytest.raises(ValueError, match="fine-tuning is not sharded"):
        discq.quantize_(four_block_llama(), quip_sharp_config(
            2, calibration=CALIB, steps=1, trainer_kwargs=dict(strategy="fsdp")))
