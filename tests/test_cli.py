"""The `discq` command line, run as a user would, on the tiny fixture and local text."""
import json
import subprocess
import sys

import pytest
from conftest import CALIB_TEXT, HELDOUT_TEXT, TINY_LLAMA, run_python


def discq(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "discq", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(done.stderr[-2000:])
    return done


def discq_in_process(capsys, *args) -> tuple[int, str, str]:
    """`discq ...` run in this process (no interpreter start, imports shared; for what the
    command computes or refuses, not for how the process behaves): exit status, stdout,
    stderr."""
    from discq.cli import main
    capsys.readouterr()
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


def discq_here(capsys, *args) -> dict:
    """`discq ... --json` in this process: its JSON result (a non-zero exit fails)."""
    rc, out, err = discq_in_process(capsys, *args, "--json")
    assert rc == 0, err[-2000:]
    return json.loads(out)


def test_help_explains_every_option():
    out = discq("quantize", "--help").stdout
    for option in ("--method", "--bits", "--group-size", "--calib", "--out", "--json"):
        assert option in out


def test_quantize_then_eval_with_json(tmp_path):
    out = tmp_path / "q"
    q = json.loads(discq("quantize", TINY_LLAMA, "--method", "gptq", "--bits", "3",
                         "--group-size", "32", "--calib", CALIB_TEXT, "--n-calib", "8",
                         "--seq-len", "64", "--eval-data", HELDOUT_TEXT, "--out", out,
                         "--json").stdout)
    assert q["method"] == "gptq" and q["bits_per_weight"] == pytest.approx(3 + 24 / 32, abs=0.01)
    assert 0 < q["kl"] < 1  # the evaluation it ran for the model card (--eval-windows 4)
    # a transformers model directory: from_pretrained after `import discq`, with a model card
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "discq" and config["metadata"]["source"] == str(TINY_LLAMA)
    card = (out / "README.md").read_text()
    assert "gptq" in card and "calibration data" in card and f"{q['kl']:.4f}" in card
    e = json.loads(discq("eval", out, "--data", HELDOUT_TEXT, "--n-windows", "2",
                         "--seq-len", "128", "--json").stdout)
    assert e["reference"] == str(TINY_LLAMA)  # the original model, from the manifest
    assert 0 < e["kl"] < 1 and 0.5 < e["top1"] <= 1 and e["perplexity"] > 1


def test_kl_hessians_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "q"
    q = discq_here(capsys, "quantize", TINY_LLAMA, "--method", "gptq", "--hessian", "kl",
                   "--calib", CALIB_TEXT, "--n-calib", "4", "--seq-len", "64", "--eval-data",
                   HELDOUT_TEXT, "--eval-windows", "2", "--out", out)
    assert q["method"] == "gptq" and 0 < q["kl"] < 1
    manifest = (out / "config.json").read_text()
    assert '"hessian": "kl"' in manifest  # each layer's config, as it was rounded
    from discq.cli import main
    assert main(["quantize", str(TINY_LLAMA), "--method", "rtn", "--hessian", "kl", "--out",
                 str(tmp_path / "r")]) == 2
    assert "takes no Hessian" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_quip_sharp_two_bits_from_the_command_line(tmp_path):
    out = tmp_path / "q"
    done = discq("quantize", TINY_LLAMA, "--method", "quip-sharp", "--bits", "2", "--calib",
                 CALIB_TEXT, "--n-calib", "8", "--seq-len", "64", "--steps", "2", "--out", out,
                 "--eval-windows", "0", "--json")
    q = json.loads(done.stdout)
    assert q["method"] == "quip-sharp" and 2 < q["bits_per_weight"] < 2.3
    assert "no scale groups" not in done.stderr  # the CLI's default group size is not passed
    e = json.loads(discq("eval", out, "--data", HELDOUT_TEXT, "--n-windows", "2",
                         "--seq-len", "128", "--json").stdout)
    assert 0 < e["kl"] < 1 and e["perplexity"] > 1


def test_qtip_two_bits_from_the_command_line(tmp_path):
    out = tmp_path / "q"
    done = discq("quantize", TINY_LLAMA, "--method", "qtip", "--bits", "2", "--calib",
                 CALIB_TEXT, "--n-calib", "8", "--seq-len", "64", "--steps", "2", "--out", out,
                 "--eval-windows", "0", "--json")
    q = json.loads(done.stdout)
    # fine-tuned HYB weights store their own 512×2 fp16 tables: heavy on the tiny layers
    assert q["method"] == "qtip" and 2 < q["bits_per_weight"] < 3
    assert "no scale groups" not in done.stderr
    run_python(f"""
        import torch, discq
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        w = model.model.layers[0].self_attn.q_proj.weight
        assert isinstance(w, discq.TrellisQuantizedTensor) and w.code == "hyb", w
        ids = torch.tensor([[1, 2, 3, 4]])
        out = discq.generate(model, ids, 4, cpp_wrapper=False)  # compiled token step
        assert out.shape == (1, 8)
    """)


def test_gptvq_from_the_command_line(tmp_path):
    out = tmp_path / "q"
    done = discq("quantize", TINY_LLAMA, "--method", "gptvq", "--bits", "2", "--calib",
                 CALIB_TEXT, "--n-calib", "8", "--seq-len", "64", "--out", out,
                 "--eval-windows", "1", "--json")
    q = json.loads(done.stdout)
    # 2048-weight codebooks: 0.125 bits a weight (the tiny k/v layers hold fewer, a bit more)
    assert q["method"] == "gptvq" and 2.1 < q["bits_per_weight"] < 2.25
    assert "symmetric" not in done.stderr  # the CLI's grid options are not passed on
    run_python(f"""
        import torch, discq
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        w = model.model.layers[0].mlp.down_proj.weight
        assert isinstance(w, discq.VectorQuantizedTensor) and w.vector_dim == 2, w
        ids = torch.tensor([[1, 2, 3, 4]])
        out = discq.generate(model, ids, 4, cpp_wrapper=False)  # compiled token step
        assert out.shape == (1, 8)
    """)


def test_existing_output_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    rc, _, err = discq_in_process(capsys, "quantize", TINY_LLAMA, "--out", tmp_path)
    assert rc == 2 and "overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_bits_is_a_clear_error(tmp_path):  # in its own process: no traceback printed
    done = discq("quantize", TINY_LLAMA, "--bits", "5", "--out", tmp_path / "x", check=False)
    assert done.returncode == 2 and "bits" in done.stderr and "Traceback" not in done.stderr


def test_unknown_method_is_a_clear_error():
    from discq import methods
    with pytest.raises(ValueError, match="unknown method 'magic'.*rtn"):
        methods.config_constructor("magic")


def test_methods_lists_every_registered_method_with_its_paper(capsys):
    from discq.methods import METHODS
    r = json.loads(discq_in_process(capsys, "methods", "--json")[1])
    assert [m["name"] for m in r] == ["rtn", "gptq", "gptvq", "disc", "quip-sharp", "qtip"]
    assert {m["name"] for m in r} == set(METHODS)
    assert all(m["paper"] for m in r if m["data_driven"])
    text = discq_in_process(capsys, "methods")[1]
    assert "arXiv:2210.17323" in text and "quip-sharp" in text
    assert discq("--version").stdout.startswith("discq ")


def test_bench_reports_speed_and_memory(capsys):
    r = discq_here(capsys, "bench", TINY_LLAMA, "--tokens", "4")
    assert r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["bits_per_weight"] is None


def test_bench_names_the_flags_of_the_fast_configuration(tiny_llama, tiny_calibration):
    import copy

    import discq
    from discq._commands import speed_hints
    from discq.pipeline import keep_head_filter, quantize_head_
    model = copy.deepcopy(tiny_llama[0])
    assert speed_hints(model, False, False) == []  # nothing quantized: nothing to say
    discq.quantize_(model, discq.rtn_config(4, 32, symmetric=True),
                    filter_fn=keep_head_filter(model))
    hints = speed_hints(model, False, False)
    assert len(hints) == 2 and "--compile --int8-activations" in hints[0]
    assert "--head-bits 8" in hints[1]
    assert speed_hints(model, True, True) == [hints[1]]
    quantize_head_(model, 8)
    assert speed_hints(model, True, True) == []
    # a format without an 8-bit-activation op (QTIP) and a float head: the compiled step and
    # the head are named, not the activations
    qtip = copy.deepcopy(tiny_llama[0])
    discq.quantize_(qtip, discq.qtip_config(2, tiny_calibration, finetune=False),
                    filter_fn=keep_head_filter(qtip))
    hints = speed_hints(qtip, False, False)
    assert hints[0] == "--compile (one compiled token step over a static cache)"
    assert len(hints) == 2 and "--head-bits 8" in hints[1]


def test_compressed_tensors_output_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "ct"
    discq("quantize", TINY_LLAMA, "--method", "rtn", "--bits", "4", "--group-size", "32",
          "--symmetric", "--format", "compressed-tensors", "--eval-windows", "0", "--out", out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert "vllm" in (out / "README.md").read_text()
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("args, message", [
    (["--format", "gguf:Q4_K_M"], "neither a byte-level BPE"),  # ByT5: no GGUF vocabulary
    (["--format", "gguf:Q4_0", "--group-along", "output"], "--group-along"),
    (["--format", "gguf:Q4_0", "--method", "quip-sharp"], "affine grids"),
    (["--format", "compressed-tensors", "--method", "quip-sharp"], "affine grids")])
def test_output_formats_say_what_they_need_before_any_work(tmp_path, args, message, capsys):
    rc, _, err = discq_in_process(capsys, "quantize", TINY_LLAMA, *args, "--out", tmp_path / "x")
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_gguf_output_of_a_model_directory_writes_metadata_from_its_config(tmp_path):
    """Any family in a transformers directory (here a tiny Qwen3-MoE with its tokenizer):
    the GGUF's key-values and vocabulary come from its config and tokenizer."""
    import gguf
    from families import tiny_family, tiny_tokenizer
    model = tiny_family("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    discq("quantize", tmp_path / "m", "--method", "rtn", "--format", "gguf:Q4_0",
          "--gguf-pre", "gpt-2", "--eval-windows", "0", "--out", tmp_path / "g")
    (file,) = (tmp_path / "g").glob("*.gguf")
    fields = gguf.GGUFReader(str(file)).fields
    assert fields["general.architecture"].contents() == "qwen3moe"
    assert fields["qwen3moe.expert_count"].contents() == 4
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.mark.slow
def test_gguf_output_of_the_bundled_model_reads_back_in_gguf(tmp_path):
    import gguf
    out = tmp_path / "g"
    discq("quantize", "smollm2-135m", "--method", "rtn", "--format", "gguf:Q3_K_M",
          "--eval-windows", "0", "--out", out)
    (file,) = out.glob("*.gguf")
    reader = gguf.GGUFReader(str(file))
    types = {t.tensor_type.name for t in reader.tensors}
    # llama.cpp's Q3_K_M for SmolLM2: 576-wide rows fall back to 32-weight types
    assert types == {"F32", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q8_0"}
    assert int(reader.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    assert "tokenizer.ggml.tokens" in reader.fields
    assert "llama-cli" in (out / "README.md").read_text()


def test_head_bits_rounds_the_tied_head_and_bench_decodes_with_generate(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from discq import hf  # noqa: F401  (registers discq's loader with transformers)
    out = tmp_path / "q"
    q = json.loads(discq("quantize", TINY_LLAMA, "--method", "rtn", "--bits", "4",
                         "--group-size", "32", "--head-bits", "8", "--eval-data", HELDOUT_TEXT,
                         "--out", out, "--json").stdout)
    assert q["head_bits"] == 8 and 0 < q["kl"] < 1
    model = AutoModelForCausalLM.from_pretrained(out)
    head = model.get_output_embeddings().weight
    assert head.bits == 8 and head.group_size == 32 and head.symmetric
    assert model.get_input_embeddings().weight is head
    r = json.loads(discq("bench", out, "--tokens", "4", "--compile", "--json").stdout)
    assert r["tokens_per_s"] > 0 and r["compiled"] is True
    # the one flag of the fast configuration this run left out (the head is 8-bit already)
    assert len(r["faster_with"]) == 1 and "--int8-activations" in r["faster_with"][0]
    # the 8-bit-activation path's cost, as discq.generate(int8_activations=True) decodes it
    kw = ("--data", HELDOUT_TEXT, "--n-windows", "2", "--seq-len", "128", "--json")
    e = json.loads(discq("eval", out, *kw).stdout)
    e8 = json.loads(discq("eval", out, "--int8-activations", *kw).stdout)
    assert e8["int8_activations"] is True and "int8_activations" not in e
    assert e8["perplexity"] != e["perplexity"]
    assert e8["perplexity"] == pytest.approx(e["perplexity"], rel=0.05)
    rc, _, err = discq_in_process(capsys, "bench", out, "--int8-activations")
    assert rc == 2 and "--compile" in err and "Traceback" not in err
    rc, _, err = discq_in_process(capsys, "quantize", TINY_LLAMA, "--head-bits", "8",
                                  "--quantize-head", "--out", tmp_path / "x")
    assert rc == 2 and "head_bits" in err and "Traceback" not in err


def test_target_bpw_gives_each_layer_a_width_within_the_budget(tmp_path, capsys):
    out = tmp_path / "q"
    q = discq_here(capsys, "quantize", TINY_LLAMA, "--method", "gptq", "--hessian", "kl",
                   "--group-size", "32", "--target-bpw", "3.2", "--calib", CALIB_TEXT,
                   "--n-calib", "4", "--seq-len", "64", "--eval-data", HELDOUT_TEXT,
                   "--eval-windows", "1", "--out", out)
    assert q["method"] == "mixed widths" and q["bits_per_weight"] <= 3.2
    assert q["candidates"] == ["gptq 2-bit g32 kl", "gptq 3-bit g32 kl", "gptq 4-bit g32 kl"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    plan = config["metadata"]["bit_plan"]
    assert plan["budget"] == 3.2 and len(set(plan["layers"].values())) > 1
    card = (out / "README.md").read_text()
    assert "## Widths" in card and "mixed widths: " in card
    assert all(f"{fqn}: {lab}" in card for fqn, lab in plan["layers"].items())


def test_target_bpw_to_gguf_writes_the_types_it_chose(tmp_path, capsys):
    import gguf
    from families import tiny_family, tiny_tokenizer
    tiny_family("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    q = discq_here(capsys, "quantize", tmp_path / "m", "--method", "rtn", "--target-bpw", "6",
                   "--candidates", "Q4_0,Q5_0,Q8_0", "--format", "gguf", "--gguf-pre", "gpt-2",
                   "--calib", CALIB_TEXT, "--n-calib", "2", "--seq-len", "32",
                   "--eval-windows", "0", "--out", tmp_path / "g")
    assert q["bits_per_weight"] <= 6
    (file,) = (tmp_path / "g").glob("*-6.0bpw.gguf")
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(file)).tensors}
    assert {"Q8_0", "Q4_0"} <= types or {"Q8_0", "Q5_0"} <= types  # mixed, per tensor


@pytest.mark.parametrize("args, message", [
    (["--candidates", "2,3"], "give both"),
    (["--format", "gguf"], "GGML-type --candidates"),
    (["--target-bpw", "3", "--format", "gguf"], "every candidate must be a GGML type"),
    (["--target-bpw", "3", "--stream"], "drop --stream"),
    (["--target-bpw", "3", "--candidates", "2,x"], "is not <bits>"),
    (["--target-bpw", "3", "--candidates", "qtip:Q4_0"], "GGML types are affine")])
def test_target_bpw_says_what_it_needs_before_any_work(tmp_path, args, message, capsys):
    rc, _, err = discq_in_process(capsys, "quantize", TINY_LLAMA, "--method", "gptq", *args,
                                  "--out", tmp_path / "x")
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
