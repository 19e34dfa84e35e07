"""The run's report: report.json (machine readable), report.md (a table a person reads), report.png (a chart).

Schema: {"model": {"path": ...}, "config": {...}, "results": {name: {"perplexity": ..., measure fields}},
"recovery": float | None, "training": {steps, tokens, tokens_per_s, peak_memory_bytes, wall_s}, ...}.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qatune.files import atomic_write_bytes, atomic_write_json, atomic_write_text

# Rows in this order, then any other models in the order they were added.
MODEL_ORDER = ("bf16", "ptq", "gptq", "qat", "qat_vllm", "qat_llama_cpp", "qat_executorch", "bf16_finetuned",
               "ptq_finetuned", "gptq_finetuned")  # fmt: skip


def _ppl(results: Mapping[str, Any], name: str) -> float | None:
    entry = results.get(name)
    value = entry.get("perplexity") if isinstance(entry, Mapping) else None
    return float(value) if value is not None else None


# What each row is, for the report's legend.
MODEL_NOTES = {
    "bf16": "the original model, float",
    "ptq": "the original model, post-training quantized (round to nearest)",
    "gptq": "the original model, post-training quantized by GPTQ (quantizer.gptq's calibration)",
    "qat": "fine-tuned with fake quantization, then converted to int4 (eager torchao)",
    "qat_vllm": "the qat int4 export served by vLLM",
    "qat_llama_cpp": "the qat int4 GGUF run by llama.cpp",
    "qat_executorch": "the qat int4 .pte run by ExecuTorch",
    "bf16_finetuned": "the same fine-tuning without fake quantization, float",
    "ptq_finetuned": "bf16_finetuned, then post-training quantized (round to nearest)",
    "gptq_finetuned": "bf16_finetuned, then post-training quantized by GPTQ",
}


def recovery(results: Mapping[str, Any], ptq: str = "ptq_finetuned") -> float | None:
    """Share of PTQ's perplexity loss that QAT wins back: (ptq_finetuned - qat) / (ptq_finetuned - bf16_finetuned);
    with ptq="gptq_finetuned", the share of what GPTQ still loses.

    Only against the fair baseline, the same fine-tuning without fake quant (compare.finetune_baseline=true): QAT
    also fine-tunes, so against PTQ of the *original* model it mixes what fine-tuning and QAT each buy (and comes
    out above 100% on in-domain data). None when an entry is missing or PTQ loses nothing.
    """
    baseline, quantized = _ppl(results, "bf16_finetuned"), _ppl(results, ptq)
    qat = _ppl(results, "qat")
    if baseline is None or quantized is None or qat is None or quantized == baseline:
        return None
    return (quantized - qat) / (quantized - baseline)


def _ordered(results: Mapping[str, Any]) -> list[str]:
    return [n for n in MODEL_ORDER if n in results] + [n for n in results if n not in MODEL_ORDER]


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f} MiB"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of formatted cells per model (Δ is vs bf16)."""
    header = ["model", "perplexity", "Δ ppl", "Δ %", "size", "packed size", "linear bits/w", "peak memory",
              "prefill tok/s", "decode tok/s"]  # fmt: skip
    base = _ppl(results, "bf16")
    rows = []
    for name in _ordered(results):
        r = results[name] if isinstance(results[name], Mapping) else {}
        ppl = _ppl(results, name)
        delta = ppl - base if ppl is not None and base is not None else None
        delta_pct = 100 * delta / base if delta is not None and base else None
        rows.append([
            name,
            _num(ppl, ".3f"),
            _num(delta, "+.3f"),
            _num(delta_pct, "+.1f") + ("%" if delta_pct is not None else ""),
            _mib(r.get("size_bytes")),
            _mib(r.get("packed_size_bytes")),  # int4 values at 4 bits, as a packed runtime would hold them
            _num(r.get("linear_bits_per_weight"), ".2f"),
            _mib(r.get("peak_memory_bytes")),
            _num(r.get("prefill_tokens_per_s"), ".1f"),
            _num(r.get("decode_tokens_per_s"), ".2f"),
        ])  # fmt: skip
    return header, rows


def format_table(results: Mapping[str, Any]) -> str:
    """The results table as aligned plain text, for the console."""
    header, rows = table_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table, columns padded so it also reads well as plain text (first column left, others right)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return [line(header), rule, *map(line, rows)]


def _training_rows(report: Mapping[str, Any]) -> list[list[str]]:
    runs = report.get("training_runs") or ({"qat": report["training"]} if report.get("training") else {})
    rows = []
    for name, t in runs.items():
        rows.append([
            name,
            str(t.get("steps", "—")),
            str(t.get("tokens", "—")),
            _num(t.get("tokens_per_s"), ".1f"),
            _mib(t.get("peak_memory_bytes")),
            _num(t.get("wall_s"), ".1f"),
            f"{t['trainable_params']:,}" if t.get("trainable_params") else "—",
        ])  # fmt: skip
    return rows


def format_markdown(report: Mapping[str, Any], png_name: str | None = None) -> str:
    results = report.get("results", {})
    lines = ["# qatune report", ""]
    if report.get("model", {}).get("path"):
        lines += [f"Model: `{report['model']['path']}`", ""]
    if report.get("eval_dtype"):  # QAT's int4 model too: its scales and float parts, like the baselines' weights
        lines += [f"Every row evaluated in {report['eval_dtype']} (`model.dtype`).", ""]
    lines += markdown_table(*table_rows(results))
    measured = [r for r in results.values() if isinstance(r, Mapping) and "threads" in r]
    if measured:
        r = measured[0]
        lines += [
            "",
            f"Speed: batch 1, {r.get('prompt_len', '?')}-token prefill, {r.get('decode_tokens', '?')} greedy decode "
            f"steps with KV cache, median of {r.get('runs', '?')} runs; device {r.get('device')}, {r.get('threads')} "
            "threads, eager PyTorch: torchao's int4 weights are dequantized on every matmul there, so eager int4 "
            "(ptq, qat) is slower than float; that is not how int4 is served (docs/serving.md). Size: storage in "
            "memory (torchao keeps int4 values in int8); packed size and bits/w: int4 at 4 bits + scales. Peak "
            "memory: the whole process (Python, torch, data and every model alive in it).",
        ]
    served = {n: r for n, r in results.items() if isinstance(r, Mapping) and r.get("runtime")}
    for name, r in served.items():
        if r.get("error"):
            lines += ["", f"`{name}`: {r['runtime']} could not serve the export: {r['error'].splitlines()[0]}"]
        elif r["runtime"] != "vllm":
            lines += [
                "",
                f"`{name}`: the int4 export `{r.get('file')}` run by {r['runtime']} in the recipe's process "
                f"({r.get('threads')} threads): perplexity from its own logits on the same windows, batch-1 speed.",
            ]
        else:
            lines += [
                "",
                f"`{name}`: the int4 export as {r['runtime']} serves it (`vllm serve` on 127.0.0.1, kernels "
                f"{', '.join(r.get('kernels') or ['?'])}; loaded in {r.get('load_s', 0):.0f} s): perplexity from its "
                "own prompt logprobs on the same windows, speed as an HTTP client sees it (batch 1, same prompt).",
            ]
    lines += ["", *(f"- `{n}`: {MODEL_NOTES[n]}" for n in _ordered(results) if n in MODEL_NOTES), ""]
    lines += [headline(results), ""]
    training_rows = _training_rows(report)
    if training_rows:
        lines += ["## Training", ""]
        header = ["run", "steps", "tokens", "tokens/s", "peak memory", "wall s", "trainable params"]
        lines += markdown_table(header, training_rows)
        lines += [""]
    if png_name:
        lines += [f"![perplexity per model]({png_name})", ""]
    return "\n".join(lines)


def headline(results: Mapping[str, Any]) -> str:
    """The run's one-line verdict: the recovery against the fair baseline, or why there is none."""
    rec = recovery(results)
    if rec is not None:
        line = (f"**Recovery: {100 * rec:.1f}%** of the perplexity that fine-tune-then-PTQ loses is won back by QAT "
                "((ptq_finetuned − qat) / (ptq_finetuned − bf16_finetuned)).")  # fmt: skip
        if (gptq := _ppl(results, "gptq_finetuned")) is not None:
            qat = _ppl(results, "qat")
            verdict = "beats" if qat < gptq else "does not beat"
            line += f" QAT int4 {verdict} GPTQ int4 of the same fine-tuned model: {qat:.3f} vs {gptq:.3f}."
        return line
    if "qat" in results and "bf16_finetuned" not in results:
        return ("No recovery figure: `qat` is fine-tuned, `bf16` and `ptq` are not, so their gap mixes fine-tuning "
                "with quantization. `compare.finetune_baseline=true` adds the same fine-tuning without fake quant "
                "(`bf16_finetuned`, `ptq_finetuned`) and the recovery against it.")  # fmt: skip
    return "No recovery figure: PTQ lost nothing or a model is missing."


def plot_perplexity(results: Mapping[str, Any]) -> bytes | None:
    """A PNG bar chart of perplexity per model, or None when matplotlib (the `plot` extra) is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = [n for n in _ordered(results) if _ppl(results, n) is not None]
    values = [_ppl(results, n) for n in names]
    fig = Figure(figsize=(1.2 * max(len(names), 3) + 1, 3.5))
    FigureCanvasAgg(fig)  # the Agg canvas without touching pyplot's global backend
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color=["#888888" if n.startswith("bf16") else "#3b75af" for n in names])
    ax.bar_label(bars, fmt="%.2f")
    ax.margins(y=0.12)  # room for the labels above the tallest bar
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity per model")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(report: Mapping[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.png (skipped with a note without matplotlib) into `output_dir`."""
    if "results" not in report:
        raise ValueError(
            f"report needs a 'results' entry ({{model name: {{'perplexity': ...}}}}), got keys {list(report)}"
        )
    out = Path(output_dir)
    paths = {"json": atomic_write_json(out / "report.json", report)}
    png = plot_perplexity(report["results"])
    if png is None:
        print("report: matplotlib not installed (pip install 'qatune[plot]'): report.png skipped")
    else:
        paths["png"] = atomic_write_bytes(out / "report.png", png)
    paths["md"] = atomic_write_text(out / "report.md", format_markdown(report, "report.png" if png else None))
    return paths
