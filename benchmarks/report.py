"""Turns the committed benchmark results into `benchmarks/results/README.md` with its plots:
perplexity (SmolLM2-135M, Gemma 3 270M) and embedding cosine (MiniLM) against bits per weight, one line per
method and peer; the Pareto check at 3 and 4 bits; the speed ratios per layer shape.

    python benchmarks/report.py [--quick]   (--quick: the bench-quick results, README_quick.md)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import sys

import matplotlib

sys.path.insert(0, str(Path(__file__).parent))
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def lines(rows: list[dict]) -> dict[str, list[dict]]:
    """Successful rows by plot line, each line sorted by bits per weight."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["ok"] and r["id"] != "fp32":
            out.setdefault(r["line"], []).append(r)
    return {k: sorted(v, key=lambda r: r["bits_per_weight"]) for k, v in sorted(out.items())}


def is_discq(line: str) -> bool:
    return line.startswith("discq")


def plot(rows: list[dict], metric: str, path: Path, title: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ref = next(r for r in rows if r["id"] == "fp32")[metric]
    count = {True: 0, False: 0}
    for line, pts in lines(rows).items():
        ours = is_discq(line)
        color = (plt.cm.tab10 if ours else plt.cm.Dark2)(count[ours] % (10 if ours else 8))
        count[ours] += 1
        x = [p["bits_per_weight"] for p in pts]
        y = [p[metric] for p in pts]
        ax.plot(x, y, "-o" if ours else "--s", label=line, markersize=4,
                linewidth=2 if ours else 1.2, color=color)
    ax.axhline(ref, color="black", linewidth=0.8, linestyle=":", label="fp32")
    if metric == "perplexity":
        ax.set_yscale("log")
        ax.set_ylim(ref * 0.95, ref * 4)  # 2-bit RTN and the like leave the plot upwards
        ticks = [t for t in (40, 45, 50, 60, 70, 80, 100, 125, 150) if ref * 0.95 <= t <= ref * 4]
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    else:
        ax.set_ylim(0.8, 1.001)
    ax.set_xlabel("bits per weight (decoder linears: codes, scales, zeros, codebooks)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def value(r: dict, metric: str, f: str) -> str:
    """The row's score, with its spread over calibration draws where it was measured:
    "50.98 ± 1.11 (3)" is the mean of 3 draws and their standard deviation."""
    sd = r.get(f"{metric}_sd")
    if sd is None:
        return format(r[metric], f)
    return f"{format(r[metric], f)} ± {format(sd, '.2g' if f.endswith('g') else f)} " \
           f"({len(r['draws'])})"


def within_spread(a: dict, b: dict, metric: str) -> bool | None:
    """Whether two rows' scores differ by no more than their spreads together (the sum of
    their standard deviations over calibration draws; a row whose spread was not measured is
    taken to spread as much as the other: a draw moves any calibrated method's rounding).
    None where neither row has a measured spread."""
    sa, sb = a.get(f"{metric}_sd"), b.get(f"{metric}_sd")
    if sa is None and sb is None:
        return None
    sa, sb = (sb if sa is None else sa), (sa if sb is None else sb)
    return abs(a[metric] - b[metric]) <= sa + sb


def table(rows: list[dict], metric_cols: list[tuple[str, str, str]]) -> list[str]:
    head = "| method | bits/weight | " + " | ".join(c[1] for c in metric_cols) + \
        " | time (s) | peak RSS (GiB) | env |"
    out = [head, "|" + "---|" * (5 + len(metric_cols))]
    fp32 = next(r for r in rows if r["id"] == "fp32")
    out.append("| fp32 | 32 | " + " | ".join(format(fp32.get(k, 0), f) for k, _, f in
                                              metric_cols) + " |  |  |  |")
    for line, pts in lines(rows).items():
        for r in pts:
            out.append(f"| {line} `{r['id'].split('-', 1)[1]}` | {r['bits_per_weight']:.3f} | "
                       + " | ".join(value(r, k, f) for k, _, f in metric_cols)
                       + f" | {r['seconds']:.0f} | {r['peak_rss_gib']:.2f} | {r['env']} |")
    for r in rows:
        if not r["ok"]:
            out.append(f"| {r['line']} `{r['id'].split('-', 1)[1]}` | did not run: "
                       f"{_one_line(r.get('error', '?'))} |" + " |" * (4 + len(metric_cols)))
    return out


def _one_line(s: str) -> str:
    return " ".join(s.split())[:300].replace("|", "/")


def pareto(rows: list[dict], metric: str, lower_is_better: bool = True) -> list[str]:
    """For every peer point between 3 and 6 bits: discq's best at no more bits than it, and
    whether the difference exceeds the rows' spread over calibration draws where measured."""
    ours = [r for r in rows if r["ok"] and is_discq(r["line"])]
    out = ["| peer point | bits | " + metric + " | discq's best at <= those bits | " + metric
           + " | discq on or below |", "|---|---|---|---|---|---|"]
    for line, pts in lines(rows).items():
        if is_discq(line):
            continue
        for p in pts:
            if not 3 <= p["bits_per_weight"] < 6:
                continue
            cands = [r for r in ours if r["bits_per_weight"] <= p["bits_per_weight"] + 1e-9]
            best = min(cands, key=lambda r: r[metric] if lower_is_better else -r[metric],
                       default=None)
            if best is None:
                out.append(f"| {line} `{p['id']}` | {p['bits_per_weight']:.3f} | "
                           f"{p[metric]:.4g} | none | | no |")
                continue
            ok = best[metric] <= p[metric] if lower_is_better else best[metric] >= p[metric]
            verdict = "yes" if ok else "**no**"
            if within_spread(best, p, metric):
                verdict = "level (within the spread)"
            out.append(f"| {line} | {p['bits_per_weight']:.3f} | {value(p, metric, '.4g')} | "
                       f"{best['line']} ({best['bits_per_weight']:.3f}) | "
                       f"{value(best, metric, '.4g')} | {verdict} |")
    return out


def missing(res: dict, name: str, quick: bool) -> list[str]:
    """Rows of the benchmark's table that these results do not have (a run cut short)."""
    from quality_rows import rows
    have = {r["id"] for r in res["rows"]}
    absent = [r.id for r in rows(name, "quick" if quick else "full") if r.id not in have]
    if not absent:
        return []
    return [f"Not in these results ({len(absent)} rows of the table; `python "
            f"benchmarks/quality.py --model {name} --resume` adds them): "
            + ", ".join(f"`{a}`" for a in absent), ""]


def budgets(rows: list[dict], metric: str, lower_is_better: bool = True,
            limits=(2.5, 3.5, 4.5)) -> list[str]:
    """Each quantizer's best score within a bits-per-weight budget: the one-glance summary."""
    out = ["| quantizer | " + " | ".join(f"best at <= {b} bits" for b in limits) + " |",
           "|---|" + "---|" * len(limits)]
    for line, pts in lines(rows).items():
        cells = []
        for b in limits:
            fit = [p for p in pts if p["bits_per_weight"] <= b + 1e-9]
            best = min(fit, key=lambda p: p[metric] if lower_is_better else -p[metric],
                       default=None)
            cells.append(f"{value(best, metric, '.4g')} ({best['bits_per_weight']:.2f})"
                         if best else "")
        out.append(f"| {line} | " + " | ".join(cells) + " |")
    return out


def configs(rows: list[dict]) -> list[str]:
    """One configuration per line as passed to the quantizer (the widest row's), so anyone can
    check that no peer was handicapped; every row's is in the JSON."""
    out = []
    for line, pts in lines(rows).items():
        r = pts[-1]
        out += [f"- **{line}** (`{r['id']}`; versions: "
                f"{', '.join(f'{k} {v}' for k, v in r.get('versions', {}).items())}):",
                f"  `{json.dumps(r.get('config', {}), default=str)}`"]
    return out


def speed_section(speed: dict | None) -> list[str]:
    if speed is None:
        return []
    layers = speed["layers"]
    shapes = list(dict.fromkeys(r["shape"] for r in layers if r["batch"] == 1))
    variants = [v for v in dict.fromkeys(r["variant"] for r in layers) if v != "fp32"]
    ms = {(r["shape"], r["variant"]): r["ms"] for r in layers if r["batch"] == 1}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ratio = [ms[(s, "fp32")] / ms[(s, v)] if (s, v) in ms else 0 for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ratio, width, label=v)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=20,
                  ha="right", fontsize=7)
    ax.set_ylabel("speed-up over fp32 (one token row)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "speed_layers.png", dpi=110)
    plt.close(fig)
    m = {**speed["machine"], **(speed.get("layers_from") or {})}  # the layer tables' machine
    out = ["## Speed per layer shape (CPU, one activation row)", "",
           f"From `speed_cpu.json` ({_machine(m)}, torch {m['torch']}, layer "
           f"tables of {m['date']}; command: "
           f"`{speed.get('command', 'python benchmarks/speed.py')}`). Bars: fp32 time / "
           f"variant time.", "", "![speed per layer](speed_layers.png)", ""]
    if speed.get("decode"):
        dm = speed["machine"]  # the decode table's machine
        out += [f"Decode of SmolLM2-135M (tokens/s, same run as llama.cpp; {_machine(dm)}, "
                f"{dm['date']}):", "",
                "| variant | tokens/s | MB/token | perplexity |", "|---|---|---|---|"]
        out += [f"| {d['variant']} | {d['tokens_per_s']:.1f} | "
                f"{d['bytes_per_token'] / 1e6:.0f} | {d.get('perplexity', float('nan')):.2f} |"
                for d in speed["decode"]]
        out.append("")
    return out


def machines(rows: list[dict], m: dict) -> str:
    """Which machines ran the rows (rows record theirs since 2026-12-07; `m`: the file's)."""
    named: dict[str, list[str]] = {}
    for r in rows:
        if r.get("id") != "fp32":
            named.setdefault(r.get("machine", ""), []).append(r.get("date", "?"))
    parts = [f"{m} ({len(d)} rows, {min(d)}–{max(d)})" for m, d in named.items() if m]
    if "" in named:
        d = named[""]
        parts.append(f"{m['cpu']}, {m['cores']} cores ({len(d)} rows, {min(d)}–{max(d)}; "
                     f"cache sizes not recorded then)")
    return "; ".join(parts)


def draws_note(rows: list[dict]) -> str:
    n = sorted({len(r["draws"]) for r in rows if r.get("draws") and len(r["draws"]) > 1})
    if not n:
        return (" Every row ran on one calibration draw: a difference of a few percent between "
                "rows is within the spread a different draw can cause.")
    ran = sorted({f"{dr['machine']} on {dr['date']}" for r in rows for dr in r.get("draws", ())
                  if "machine" in dr})
    return (f" Scores with ± are the mean of {'/'.join(map(str, n))} calibration draws (draw k: "
            f"the same number of sequences drawn with seed k; `--draws`) and their standard "
            f"deviation" + (f" (draws run on {'; '.join(ran)})" if ran else "")
            + "; the other rows ran on one draw. A difference smaller than the spreads is not a "
            "result, and the Pareto check says so (\"level\").")


def decode_sections() -> list[str]:
    """The decode-only runs, one per machine (speed.py --decode-only): tokens/s and prefill."""
    out = []
    for path in sorted(RESULTS.glob("speed_cpu_decode_*.json")):
        if path.stem.endswith("_quick"):
            continue
        r = json.loads(path.read_text())
        m, rows = r["machine"], r["decode"]
        lengths = sorted({int(S) for d in rows for S in (d.get("prefill_ms") or {})})
        out += [f"Decode and prefill of SmolLM2-135M ([{path.stem}.md]({path.stem}.md): "
                f"{_machine(m)}, {m['date']}; discq's kernels built for "
                f"{r.get('kernel_build')}):", "",
                "| variant | tokens/s |" + "".join(f" prefill {S} (ms) |" for S in lengths)
                + " perplexity |", "|---|---|" + "---|" * len(lengths) + "---|"]
        for d in rows:
            pre = d.get("prefill_ms") or {}
            out.append(f"| {d['variant']} | {d['tokens_per_s']:.1f} |"
                       + "".join(f" {pre[str(S)]:.1f} |" if str(S) in pre else " |"
                                 for S in lengths)
                       + (f" {d['perplexity']:.2f} |" if d.get("perplexity") else " |"))
        out.append("")
    return out


def _machine(m: dict) -> str:
    """The machine's full description where it was recorded (caches and ISA since
    2026-12-07), else its CPU and cores."""
    from _common import describe
    return describe(m) if "caches" in m else f"{m['cpu']}, {m['cores']} cores"


def header(res: dict) -> list[str]:
    m = res["machine"]
    cmds = sorted({r["command"] for r in res["rows"] if "command" in r})
    dates = sorted({r["date"] for r in res["rows"] if "date" in r})
    return [f"Machines: {machines(res['rows'], m)}; torch {m['torch']}; rows run "
            f"{dates[0]}–{dates[-1]} by `{'`, `'.join(cmds)}`. Calibration: the same "
            f"{res['n_calib']}x512 tokens of the calibration plays for every data-driven row; "
            f"eval: {res['eval'][0]}x{res['eval'][1]} held-out tokens (hamlet). Every row "
            f"quantizes the decoder's linear layers; embeddings and the output head stay fp32 "
            f"for all (stated separately: they are not in the bits). Bits per weight count what "
            f"each quantizer stores for those layers: codes at their width, 16-bit scales, "
            f"zeros as stored (discq and torchao: 8-bit integers; HQQ: 16-bit floats; "
            f"symmetric peers: none), codebooks and sign vectors; llama.cpp: its file's bytes. "
            f"Time: the quantization call alone; peak RSS: the row's own process (libraries and "
            f"the fp32 model included).{_set_time(res['rows'], res.get('run'))}"
            f"{draws_note(res['rows'])}", ""]


def _set_time(rows: list[dict], run: dict | None = None) -> str:
    """The set's time: that of its last uninterrupted run of every row (and which rows ran
    again after it), else each row's wall time (its process and its judging) summed."""
    if run is not None:
        later = sorted(r["id"] for r in rows if r.get("finished", "") > run["finished"])
        return (f" The whole set ran in one process in {run['seconds'] / 60:.0f} minutes "
                f"({run['rows']} rows, preparation and judging included; started "
                f"{run['started']}, `{run['command']}`)"
                + (f"; rerun after it: {', '.join(later)}." if later else "."))
    walls = [r["wall_seconds"] for r in rows if "wall_seconds" in r]
    if not walls:
        return ""
    missing = sum(1 for r in rows if r.get("id") != "fp32" and "wall_seconds" not in r)
    if not missing:
        return (f" The set took {sum(walls) / 60:.0f} minutes (each row's process and judging, "
                f"summed).")
    return (f" Wall time (process and judging) is recorded for {len(walls)} rows: "
            f"{sum(walls) / 60:.0f} minutes summed; the other {missing}, measured before it was "
            f"recorded, are not in that sum.")


CAUSAL = {"smollm2": "SmolLM2-135M", "gemma3": "Gemma 3 270M"}  # quality set -> model
NOTES = {  # what a reader must know to read a model's table right
    "gemma3": ["The reference is the bundled file's weights: Gemma 3 270M as a Q4_K_M GGUF, "
               "dequantized. llama.cpp's Q4_K_M row re-quantizes those weights onto the very "
               "grid they came from, so it reproduces them (KL 0): it measures nothing about "
               "quantization quality, and the Pareto check's \"no\" against it is that. Its "
               "Q4_0 and Q3_K_M rows re-quantize them onto other grids, as discq's rows do. "
               "The 640-wide rows are not whole 256-weight super-blocks, so llama.cpp's "
               "K-quants fall back to Q5_0/Q8_0 for most tensors (the rows' tensor_types).", ""],
}


def model_section(res: dict, name: str, quick: bool) -> list[str]:
    suffix = "_quick" if quick else ""
    if name in CAUSAL:
        cols = [("perplexity", "perplexity", ".2f"), ("kl", "KL", ".4f"), ("top1", "top-1", ".3f")]
        plot(res["rows"], "perplexity", RESULTS / f"quality_{name}{suffix}.png",
             f"{CAUSAL[name]}: held-out perplexity vs bits per weight", "perplexity (log)")
        title, metric, low = f"## {CAUSAL[name]}: perplexity against bits per weight", \
            "perplexity", True
    else:
        cols = [("cosine", "embedding cosine", ".5f")]
        plot(res["rows"], "cosine", RESULTS / f"quality_minilm{suffix}.png",
             "all-MiniLM-L6-v2: sentence-embedding cosine to fp32 vs bits per weight",
             "mean cosine similarity")
        title, metric, low = "## MiniLM encoder: embedding cosine against bits per weight", \
            "cosine", False
    out = [title, "", *header(res), *NOTES.get(name, []),
           f"![{name}](quality_{name}{suffix}.png)", "",
           f"Each quantizer's best {metric} within a budget of bits per weight (the bits it "
           f"used in brackets):", "", *budgets(res["rows"], metric, low), "",
           *table(res["rows"], cols), "", *missing(res, name, quick),
           "Between 3 and 6 bits, every peer point against discq's best at no more bits:", "",
           *pareto(res["rows"], metric, low), "", "Configurations as passed:", "",
           *configs(res["rows"]), ""]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    suffix = "_quick" if a.quick else ""
    out = ["# Benchmark results", "",
           "Generated by `python benchmarks/report.py` from the JSON files here (`make bench` "
           "regenerates everything; `make bench-quick` a small set into *_quick files). Every "
           "file records its machine, versions, date and command.", ""]
    for name in ("smollm2", "gemma3", "minilm"):
        res = load(f"quality_{name}{suffix}")
        if res is not None:
            out += model_section(res, name, a.quick)
    if not a.quick:
        out += speed_section(load("speed_cpu"))
        out += decode_sections()
        out += ["## Other results", ""]
        out += [f"- [{p.name}]({p.name}): {p.read_text().splitlines()[0].lstrip('# ')}"
                for p in sorted(RESULTS.glob("*.md"))
                if p.name != "README.md" and not p.stem.endswith("_quick")]
    (RESULTS / f"README{suffix}.md").write_text("\n".join(out) + "\n")
    print(f"wrote {RESULTS / f'README{suffix}.md'}")


if __name__ == "__main__":
    main()
