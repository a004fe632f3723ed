"""The rows of the quality benchmark (`benchmarks/quality.py`): which quantizer, which width,
which settings, in which Python environment. One place, so that the full and quick sets, the
peers' configurations and the report's lines are read from the same table.

Every data-driven quantizer, discq's and the peers', is given the same calibration tokens
(`CALIB` sequences of 512 tokens of the calibration plays); heads and embeddings stay fp32 for
all. A peer's settings are the ones its documentation recommends for the width (its README's
example or preset), changed only where this 2-core machine forces it, and the row says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CALIB = {"full": 32, "quick": 8}  # calibration sequences of 512 tokens
WIDTHS = [(2, 128), (2, 64), (3, 128), (3, 64), (4, 128), (4, 64)]  # (bits, group size)


@dataclass(frozen=True)
class Row:
    id: str          # unique, file-name safe: "discq-gptq-3b-g64"
    line: str        # the plot's line / the table's method: "discq GPTQ"
    runner: str      # module in benchmarks/runners/
    env: str         # "main" (discq's environment) or "peers" (benchmarks/.peers, see Makefile)
    spec: dict = field(default_factory=dict)  # passed to the runner: bits, group_size, settings
    model: str = "smollm2"                    # "smollm2" (causal LM) or "minilm" (encoder)
    sets: tuple = ("full",)


def _discq(method: str, line: str, widths, settings: dict, quick=None, model="smollm2",
           name: str | None = None):
    """`name`: the rows' id part where one method has several lines (default: the method)."""
    for bits, g in widths:
        tag = f"{bits}b" + (f"-g{g}" if g else "")
        sets = ("full", "quick") if (bits, g) == quick else ("full",)
        yield Row(f"{model}-discq-{name or method}-{tag}", line, "discq_runner", "main",
                  {"method": method, "bits": bits, "group_size": g, **settings}, model, sets)


def _peer(name: str, line: str, runner: str, env: str, widths, settings: dict, quick=None,
          model="smollm2", quick_settings: dict | None = None):
    """`quick_settings`: what the quick set's row changes (a smaller budget), if anything."""
    for bits, g in widths:
        tag = f"{bits}b" + (f"-g{g}" if g else "")
        spec = {"bits": bits, "group_size": g, **settings}
        if (bits, g) == quick and quick_settings:
            yield Row(f"{model}-{name}-{tag}", line, runner, env, {**spec, **quick_settings},
                      model, ("quick",))
        sets = ("full", "quick") if (bits, g) == quick and not quick_settings else ("full",)
        yield Row(f"{model}-{name}-{tag}", line, runner, env, spec, model, sets)


def _llamacpp(types, quick, model="smollm2"):
    for t in types:
        sets = ("full", "quick") if t == quick else ("full",)
        yield Row(f"{model}-llamacpp-{t}", "llama.cpp (no imatrix)", "llamacpp_runner", "main",
                  {"type": t}, model, sets)


def _mixed(method: str, line: str, budgets, widths, settings: dict, name: str):
    """Each matrix the candidate (method at one of `widths`) that minimizes the predicted KL
    within `budget` bits per weight (`quantize_(model, budget=bits(b), candidates=[...])`)."""
    candidates = [{"method": method, "bits": b, "group_size": g, **settings} for b, g in widths]
    for b in budgets:
        yield Row(f"smollm2-discq-mixed-{name}-{b}b", line, "discq_runner", "main",
                  {"method": method, "bits": b, "group_size": None, "budget": b,
                   "candidates": candidates})


def smollm2_rows() -> list[Row]:
    no_groups = [(2, None), (3, None), (4, None)]
    rows = [
        *_discq("rtn", "discq RTN", WIDTHS, {}, quick=(3, 64)),
        *_discq("gptq", "discq GPTQ", WIDTHS, {}, quick=(3, 64)),
        # the same rounding with the input factor of the whole model's KL Hessian (YAQA)
        *_discq("gptq", "discq GPTQ, KL Hessians", [(2, 64), (3, 64), (4, 64)],
                {"hessian": "kl"}, name="gptq-kl"),
        # DiscQuant's paper runs 1024 steps of 8x512 tokens on a GPU; 64 steps of 2x128 here,
        # warm-started from RTN, is what 2 cores afford per width
        *_discq("disc", "discq DiscQuant", [(2, 64), (3, 64), (4, 64)],
                {"steps": 64, "batch_size": 2, "seq_len": 128, "init": "rtn", "warmup": 6}),
        # the same budget from GPTQ's codes (GPTQ on the same tokens first)
        *_discq("disc", "discq DiscQuant from GPTQ", [(2, 64), (3, 64), (4, 64)],
                {"steps": 64, "batch_size": 2, "seq_len": 128, "init": "gptq", "warmup": 6},
                name="disc-gptq"),
        # and from GPTQ's codes with KL Hessians
        *_discq("disc", "discq DiscQuant from GPTQ, KL Hessians", [(3, 64)],
                {"steps": 64, "batch_size": 2, "seq_len": 128, "init": "kl", "warmup": 6},
                name="disc-kl"),
        # the smaller budget: 16 steps from each start (3-bit)
        *_discq("disc", "discq DiscQuant, 16 steps", [(3, 64)],
                {"steps": 16, "batch_size": 2, "seq_len": 128, "init": "rtn", "warmup": 2},
                name="disc-16"),
        *_discq("disc", "discq DiscQuant from GPTQ, 16 steps", [(3, 64)],
                {"steps": 16, "batch_size": 2, "seq_len": 128, "init": "gptq", "warmup": 2},
                name="disc-gptq-16"),
        *_discq("disc", "discq DiscQuant from GPTQ, KL Hessians, 16 steps", [(3, 64)],
                {"steps": 16, "batch_size": 2, "seq_len": 128, "init": "kl", "warmup": 2},
                name="disc-kl-16"),
        # the 64-step run from GPTQ's codes with its decoder blocks compiled (torch.compile)
        *_discq("disc", "discq DiscQuant from GPTQ, compiled step", [(3, 64)],
                {"steps": 64, "batch_size": 2, "seq_len": 128, "init": "gptq", "warmup": 6,
                 "compile_step": True}, name="disc-gptq-compiled"),
        # k-means iterations cut from GPTVQ's 100 to 10 (time); codebook update kept
        *_discq("gptvq", "discq GPTVQ (2-D)", no_groups, {"dim": 2, "kmeans_iters": 10}),
        *_discq("quip-sharp", "discq QuIP#", no_groups, {"finetune": False}, quick=(3, None)),
        # 12-bit trellis state (QTIP: 16, over 20 minutes a width here), no fine-tuning
        *_discq("qtip", "discq QTIP", no_groups, {"finetune": False, "state_bits": 12},
                quick=(3, None)),
        *_discq("qtip", "discq QTIP, KL Hessians", [(2, None), (3, None)],
                {"finetune": False, "state_bits": 12, "hessian": "kl"}, name="qtip-kl"),
        *_discq("gptvq", "discq GPTVQ (2-D), KL Hessians", [(2, None), (3, None)],
                {"dim": 2, "kmeans_iters": 10, "hessian": "kl"}, name="gptvq-kl"),
        # mixed widths under a size budget, against the same method's uniform widths
        *_mixed("qtip", "discq QTIP, mixed widths", [2.5, 3.25],
                [(2, None), (3, None), (4, None)], {"finetune": False, "state_bits": 12},
                name="qtip"),
        *_mixed("gptq", "discq GPTQ, KL Hessians, mixed widths", [2.5, 3.25],
                [(2, 64), (3, 64), (4, 64)], {"hessian": "kl"}, name="gptq-kl"),
        *_peer("torchao-rtn", "torchao RTN (intx, asym)", "torchao_runner", "main",
               WIDTHS + [(5, 64), (6, 64), (8, 64)], {"algorithm": "affine"}, quick=(3, 64)),
        *_peer("torchao-hqq", "torchao HQQ (scale only)", "torchao_runner", "main", WIDTHS,
               {"algorithm": "hqq_scale_only"}, quick=(3, 64)),
        *_peer("hqq", "HQQ", "hqq_runner", "peers", WIDTHS, {}, quick=(3, 64)),
        *_peer("llmcompressor-gptq", "llm-compressor GPTQ", "llmcompressor_runner", "peers",
               WIDTHS, {}, quick=(3, 64)),
        # ~7 minutes a width on 2 cores even with the light recipe: the 3- and 4-bit presets
        *_peer("autoround", "AutoRound", "autoround_runner", "peers",
               [(3, 128), (4, 128)], {}, quick=(3, 128), quick_settings={"iters": 10}),
        *_llamacpp(["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q6_K"],
                   quick="Q3_K_S"),
    ]
    return rows


def gemma3_rows() -> list[Row]:
    """Gemma 3 270M (the second real model): the grids and codes people deploy at 3 and 4
    bits beside llama.cpp's own quantizer."""
    m, widths, no_groups = "gemma3", [(3, 64), (4, 64)], [(3, None), (4, None)]
    return [
        *_discq("rtn", "discq RTN", widths, {}, quick=(4, 64), model=m),
        *_discq("gptq", "discq GPTQ", widths, {}, quick=(4, 64), model=m),
        *_discq("quip-sharp", "discq QuIP#", no_groups, {"finetune": False}, model=m),
        *_discq("qtip", "discq QTIP", no_groups, {"finetune": False, "state_bits": 12},
                model=m),
        *_llamacpp(["Q3_K_M", "Q4_0", "Q4_K_M"], quick="Q4_0", model=m),
    ]


def minilm_rows() -> list[Row]:
    m = "minilm"
    widths = [(2, 64), (3, 64), (4, 64)]
    return [
        *_discq("rtn", "discq RTN", widths, {}, quick=(3, 64), model=m),
        *_discq("gptq", "discq GPTQ", widths, {}, quick=(3, 64), model=m),
        *_discq("quip-sharp", "discq QuIP#", [(2, None), (3, None), (4, None)],
                {"finetune": False}, model=m),
        # mixed widths under a size budget, against the same method's uniform widths
        *_mixed("qtip", "discq QTIP, mixed widths", [2.5, 3.25],
                [(2, None), (3, None), (4, None)], {"finetune": False, "state_bits": 12},
                name="qtip"),
        *_mixed("gptq", "discq GPTQ, KL Hessians, mixed widths", [2.5, 3.25],
                [(2, 64), (3, 64), (4, 64)], {"hessian": "kl"}, name="gptq-kl"),
        *_peer("torchao-rtn", "torchao RTN (intx, asym)", "torchao_runner", "main", widths,
               {"algorithm": "affine"}, quick=(3, 64), model=m),
        *_peer("hqq", "HQQ", "hqq_runner", "peers", widths, {}, quick=(3, 64), model=m),
        *_peer("llmcompressor-gptq", "llm-compressor GPTQ", "llmcompressor_runner", "peers",
               widths, {}, quick=(3, 64), model=m),
    ]


def rows(model: str, which: str) -> list[Row]:
    """The set's rows, 3 and 4 bits first: a run cut short still has every line there."""
    table = {"smollm2": smollm2_rows, "minilm": minilm_rows, "gemma3": gemma3_rows}[model]()
    chosen = [r for r in table if which in r.sets]
    return sorted(chosen, key=lambda r: r.spec.get("bits", 3) == 2)


# quantizers that read no calibration tokens: every calibration draw gives the same weights
DATA_FREE_RUNNERS = {"llamacpp_runner", "hqq_runner", "torchao_runner"}
DATA_FREE_METHODS = {"rtn"}


def uses_calibration(row: Row) -> bool:
    """Whether the row's result depends on the calibration draw (its spread is worth
    measuring); llama.cpp rows with an importance matrix do."""
    if row.runner == "discq_runner":
        return row.spec.get("method") not in DATA_FREE_METHODS
    if row.runner == "llamacpp_runner":
        return bool(row.spec.get("imatrix"))
    return row.runner not in DATA_FREE_RUNNERS
