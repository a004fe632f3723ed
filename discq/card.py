"""The model card (`README.md`) that `discq quantize` writes next to a quantized model: what it
is, how it was made, what it measured, and how to load it."""
from __future__ import annotations


def model_card(summary: dict, *, calibration: str | None, evaluation: dict | None,
               config: dict | None, fmt: str = "hf", coverage: str | None = None,
               widths: str | None = None) -> str:
    """Markdown for a model quantized from `summary["model"]` with `summary["method"]`, saved
    as `fmt` ("hf", "gguf:<type>", "compressed-tensors").
    `evaluation`: {"data", "windows", "perplexity", "kl", "top1", "reference_perplexity"} and/or
    "tasks" (`discq.tasks.side_by_side` rows: zero-shot task scores beside the original's);
    `coverage`: `Coverage.describe()` of the run (matrices kept in full precision and why,
    experts calibrated on few tokens); `widths`: `Plan.describe()` of a mixed-width run (each
    matrix's candidate)."""
    name = summary.get("model", "a model")
    lines = ["---", "library_name: transformers", "tags: [discq, quantized, "
             f"{summary.get('method', 'quantized')}]", "---", "",
             f"# {name}, {summary.get('gguf') or str(summary.get('bits')) + '-bit'} "
             f"{summary.get('method')} (discq)", "",
             f"Weights of `{name}` rounded by discq with "
             f"**{summary.get('method')}**: {summary.get('bits_per_weight')} bits per weight on "
             f"average over the quantized layers (codes, scales and zero points counted).", "",
             "| setting | value |", "|---|---|"]
    config = dict(config or {})
    tuned = config.get("finetune", False)
    # a GGUF mixture decides the grid: the affine grid's fields do not apply
    grid_keys = ("bits", "group_size", "symmetric", "group_along", "scale_dtype")
    for key, value in config.items():
        skip = key == "version" or (not tuned and key.startswith(("finetune_", "ft_"))) \
            or (config.get("gguf") and key in grid_keys)
        if not skip and value not in (None, False, 0, ""):
            lines.append(f"| {key} | {value} |")
    lines.append(f"| calibration data | {calibration or 'none (data-free)'} |")
    if coverage:  # what was quantized, what stayed in full precision and why
        lines += ["", "## Weights", "", "```", coverage, "```"]
    if widths:  # mixed widths: what each matrix got, predicted KL against uniform widths
        lines += ["", "## Widths", "", "```", widths, "```"]
    lines += ["", *_evaluation(evaluation), "## Use", "", *USAGE[fmt.split(":")[0]], ""]
    return "\n".join(lines)


USAGE = {
    "hf": ["```python",
           "import discq  # registers the \"discq\" quantization method with transformers",
           "from transformers import AutoModelForCausalLM",
           "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")", "```", "",
           "Without `import discq`, transformers refuses the checkpoint (the quantized layers "
           "hold no full-precision weights)."],
    "gguf": ["The `.gguf` file here runs in llama.cpp and the tools built on it, e.g. "
             "`llama-cli -m <file>.gguf`; its quantized tensors are llama.cpp's own block types "
             "holding discq's rounding."],
    "compressed-tensors": ["`pack-quantized` compressed-tensors: vLLM (`vllm.LLM(\"<this "
                           "directory>\")`) and transformers with `compressed-tensors` "
                           "installed (`AutoModelForCausalLM.from_pretrained`) load it."],
}


def _evaluation(ev: dict | None) -> list[str]:
    if not ev:
        return ["No evaluation was run (`--eval-windows 0`).", ""]
    tasks = _tasks(ev.get("tasks"))
    if "perplexity" not in ev:
        return tasks
    return [f"## Evaluation ({ev['windows']} windows of {ev['seq_len']} tokens of "
            f"{ev['data']}, held out from calibration)", "",
            "| model | perplexity | KL to the original | top-1 agreement |", "|---|---|---|---|",
            f"| original | {ev['reference_perplexity']:.2f} | 0 | 1 |",
            f"| this | {ev['perplexity']:.2f} | {ev['kl']:.4f} | {ev['top1']:.3f} |", "",
            *tasks]


def _tasks(rows: list[dict] | None) -> list[str]:
    """Zero-shot task scores (lm-evaluation-harness), this model beside the original."""
    if not rows:
        return []
    lines = ["## Zero-shot tasks (lm-evaluation-harness)", "",
             "| task | metric | original | this | stderr |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r.get('original', '')} | {r['this']} "
                     f"| {r['stderr']} |")
    return [*lines, ""]
