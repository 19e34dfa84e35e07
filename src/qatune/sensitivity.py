"""Which layers does quantization hurt, and what does keeping a few of them in float buy?

The analysis (`analyze`), on a float model and a validation text, for one quantization scheme:

1. Sensitivity. A *unit* is one transformer block (`model.layers.7`: its 7 linears) or one linear layer
   (`model.layers.7.mlp.down_proj`), plus every linear outside the blocks (`lm_head`) and, with `quantizer.embedding`
   set, the token embedding (`model.embed_tokens`; `quantizer.skip` keeps it float like a linear) as units of their
   own. Each unit is quantized alone (PTQ with `skip` = every other one) and the perplexity measured; units are
   ranked by how much that raises perplexity over the float model. The reverse for the top few and the bottom one:
   everything quantized except that unit.
2. Statistics per linear: the weight quantization error ||W - deq(q(W))||_F / ||W||_F and the fraction of weights
   the quantizer clamped (both read back from torchao's own quantized tensor), and the input activations' absolute
   max, kurtosis (Pearson: a Gaussian has 3) and channel outlier ratio (largest per-channel abs max over the median
   one) from the first `calibration_batches` batches of the float model's evaluation.
3. A `quantizer.skip` suggestion for a budget (at most `max_layers` units and/or `max_mb` MB of weights kept in
   bf16), greedy down the ranking, and its perplexity/size trade-off for each prefix of the suggestion.

Cost. The model is PTQ'd once, whole; a trial is a copy sharing the float model's tensors (`shared_float_copy`)
whose chosen linears take that PTQ's weights (`mixed_trial`: torchao quantizes each linear on its own, so this is
exactly PTQ with `skip` = the other linears), so a trial costs one evaluation. The float evaluation records each
decoder block's output (`BlockRecorder`); a trial that quantizes nothing before block i replays those outputs instead
of recomputing blocks 0..i-1 (same tensors, bit-identical perplexity), about a third off a per-block sweep.
"""

from __future__ import annotations

import copy
import io
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_

from qatune.errors import ConfigError
from qatune.evaluation import perplexity
from qatune.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from qatune.measure import tensor_bytes
from qatune.quantization import QuantScheme, quantize_ptq_, quantized_embedding_names, quantized_linear_names

GRANULARITIES = ("block", "layer")
BLOCK = re.compile(r"^(.*\.layers\.\d+)\.")  # the decoder block a linear belongs to: model.layers.7
MB = 1e6
QRANGE = {torch.int4: (-8, 7), torch.int8: (-128, 127)}
SAMPLE_SIZE = 16384  # activation values kept per layer for its histogram
CHART_UNITS = 40  # the bar chart shows at most this many units (layer granularity has hundreds)


# ---------------------------------------------------------------------------------------------- units and trials


def group_units(linear_names: Sequence[str], granularity: str) -> dict[str, list[str]]:
    """Unit name -> its linear layers: decoder blocks (granularity=block) or single linears (granularity=layer).

    Linears outside the decoder blocks (lm_head) are units of their own under both granularities."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    units: dict[str, list[str]] = {}
    for name in linear_names:
        block = BLOCK.match(name) if granularity == "block" else None
        units.setdefault(block.group(1) if block else name, []).append(name)
    return units


def unit_pattern(unit: str, layers: Sequence[str]) -> str:
    """The `quantizer.skip` pattern that keeps exactly this unit in float."""
    return unit if list(layers) == [unit] else f"{unit}.*"


def shared_float_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are the original's tensors (no weight is copied).

    PTQ on the copy swaps new quantized weights into the copy's modules only; the original stays float."""
    memo = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return copy.deepcopy(module, memo)


def mixed_trial(model: nn.Module, quantized: nn.Module, quantize: set[str]) -> nn.Module:
    """A shared copy of the float `model` whose linears in `quantize` take their weights from `quantized` (the same
    model PTQ'd once, whole). torchao quantizes each linear on its own, so this is the model PTQ with `skip` = every
    other linear would give (tests check it against `quantize_` itself), without re-quantizing for every trial."""
    trial = shared_float_copy(model)
    for name in quantize:
        trial.get_submodule(name).weight = quantized.get_submodule(name).weight
    return trial


# ---------------------------------------------------------------------------------------------- prefix replay


class _Replay(nn.Module):
    """Stands in for a decoder block a trial leaves float and whose input cannot change (every block before the first
    quantized one): the last of them returns the float model's recorded output, batch by batch; the others pass
    their input through, unused."""

    def __init__(self, block: nn.Module, outputs: list[torch.Tensor] | None):
        super().__init__()
        self.outputs, self.calls = outputs, 0
        if hasattr(block, "attention_type"):  # some models (Qwen2) pick each block's mask by it
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.outputs is None:
            return hidden_states
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        if out.shape != hidden_states.shape:
            raise RuntimeError("replayed block output does not fit this batch: evaluate on the recorded batches")
        return out


class BlockRecorder:
    """Records every decoder block's output during one evaluation of the float model. A trial that quantizes nothing
    before block i then replays blocks 0..i-1 instead of recomputing them: the same tensors the float model computed
    from the same batches, so perplexities are bit-identical and a one-block trial costs about half a forward."""

    def __init__(self, model: nn.Module, max_bytes: int = 2 * 2**30):
        self.list_name, self.blocks = _decoder_blocks(model)
        self.outputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self.max_bytes, self.bytes, self.ok = max_bytes, 0, bool(self.blocks)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.output_name = next((n for n, m in model.named_modules() if m is output), None)  # lm_head: after blocks
        self.handles: list = []

    def __enter__(self) -> BlockRecorder:
        for i, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self.ok:
                return
            self.bytes += output.numel() * output.element_size() if isinstance(output, torch.Tensor) else 0
            if not isinstance(output, torch.Tensor) or self.bytes > self.max_bytes:  # too big: trials run whole
                self.ok, self.outputs = False, [[] for _ in self.blocks]
                return
            self.outputs[i].append(output.detach())

        return hook

    def first_block(self, quantized: set[str]) -> int:
        """Index of the first block whose output the quantized linears can change."""
        first = len(self.blocks)
        for name in quantized:
            block = BLOCK.match(name)
            if block and block.group(1).rpartition(".")[0] == self.list_name:
                first = min(first, int(block.group(1).rpartition(".")[2]))
            elif name != self.output_name:  # a linear we cannot place: recompute everything
                return 0
        return first

    def replay_(self, trial: nn.Module, quantized: set[str]) -> int:
        """Swap the trial's unchanged leading blocks for replays, in place; returns how many."""
        start = self.first_block(quantized) if self.ok else 0
        blocks = trial.get_submodule(self.list_name) if start else []
        for j in range(start):
            blocks[j] = _Replay(blocks[j], self.outputs[j] if j == start - 1 else None)
        return start


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList | list]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] == "layers" and len(module):
            return name, module
    return "", []


# ---------------------------------------------------------------------------------------------- statistics


def weight_stats(linear: nn.Module, q: QuantScheme, quantized_weight: torch.Tensor | None = None) -> dict:
    """Quantization error of one linear's (or the embedding's) weight, read back from torchao's quantized tensor for
    `q`'s scheme (`quantized_weight` if given, e.g. from a PTQ'd copy of the model; else `quantize_` on a copy)."""
    qw = quantized_weight
    if qw is None:
        quantized = shared_float_copy(linear)
        quantize_(quantized, q.base_config())
        qw = quantized.weight
    w = linear.weight.detach().float()
    err = w - qw.dequantize().float()
    clipped = None
    if all(hasattr(qw, a) for a in ("qdata", "scale", "block_size")) and qw.target_dtype in QRANGE:
        scale = qw.scale.float()
        for dim, size in enumerate(qw.block_size):  # one scale per block -> one per weight
            scale = scale.repeat_interleave(size, dim=dim) if scale.shape[dim] != w.shape[dim] else scale
        qmin, qmax = QRANGE[qw.target_dtype]
        # Clamped: at an end of the grid and at least half a step beyond it, which rounding alone cannot do (the
        # tolerance counts torchao's symmetric case: scale = absmax / 7.5, so a group's max sits at +7.5 -> 7).
        beyond = ((qw.qdata == qmax) & (err > 0)) | ((qw.qdata == qmin) & (err < 0))
        clipped = (beyond & (err.abs() >= 0.5 * scale * (1 - 1e-3))).float().mean().item()
    return {
        "params": w.numel(),
        "weight_rel_error": (err.norm() / w.norm()).item(),
        "clipped_fraction": clipped,
        "weight_absmax": w.abs().max().item(),
        "quant_bytes": tensor_bytes(qw)[1],  # packed: what a runtime holding 4-bit values stores
    }


class ActivationStats:
    """Forward pre-hooks on linear layers that summarise their inputs over the model's first `max_batches` calls."""

    def __init__(self, model: nn.Module, names: Sequence[str], max_batches: int, sample_size: int = SAMPLE_SIZE):
        self.model, self.names, self.max_batches, self.sample_size = model, list(names), max_batches, sample_size
        self.batches = 0
        self.sums: dict[str, torch.Tensor] = {}  # n, sum y, y^2, y^3, y^4 with y = x - shift (float64)
        self.shift: dict[str, float] = {}
        self.last_input: torch.Tensor | None = None
        self.last_stats: tuple = ()
        self.absmax: dict[str, torch.Tensor] = {}  # per input channel
        self.samples: dict[str, torch.Tensor] = {}  # a strided sample of the first batch, for histograms
        self.handles: list = []

    def __enter__(self) -> ActivationStats:
        def count(module, args, kwargs):
            self.batches += 1

        self.handles.append(self.model.register_forward_pre_hook(count, with_kwargs=True))
        modules = dict(self.model.named_modules())
        self.handles += [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.last_input = [], None

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.batches > self.max_batches:
                return
            if args[0] is self.last_input:  # q/k/v (and gate/up) read the same tensor: summarise it once
                self.sums[name], self.absmax[name], self.samples[name], self.shift[name] = self.last_stats
                return
            x = args[0].detach().float()
            # Moments of x - shift (the first batch's mean, so the raw-moment formula does not cancel), in float32
            # with float32 sums: 10x cheaper than float64 and ample for a kurtosis.
            shift = self.shift.setdefault(name, x.mean().item())
            flat = x.flatten() - shift
            square = flat * flat
            sums = [flat.numel(), flat.sum(), square.sum(), (square * flat).sum(), (square * square).sum()]
            sums = torch.tensor([float(t) for t in sums], dtype=torch.float64)
            channel_absmax = x.reshape(-1, x.shape[-1]).abs().amax(0).cpu()
            if name in self.sums:
                self.sums[name] += sums
                self.absmax[name] = torch.maximum(self.absmax[name], channel_absmax)
            else:
                self.sums[name], self.absmax[name] = sums, channel_absmax
                stride = max(1, flat.numel() // self.sample_size)
                self.samples[name] = (flat[::stride] + shift).cpu()
            self.last_input = args[0]  # held, so its memory cannot be reused by another tensor meanwhile
            self.last_stats = self.sums[name], self.absmax[name], self.samples[name], self.shift[name]

        return hook

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, (n, s1, s2, s3, s4) in ((k, v.tolist()) for k, v in self.sums.items()):
            mean = s1 / n
            var = s2 / n - mean**2
            m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4  # 4th central moment
            channels = self.absmax[name]
            median = channels.median().item()
            out[name] = {
                "act_absmax": channels.max().item(),
                "act_kurtosis": m4 / var**2 if var > 0 else float("nan"),
                "act_channel_outlier_ratio": channels.max().item() / median if median > 0 else float("inf"),
            }
        return out


# ---------------------------------------------------------------------------------------------- budget


def suggest_skip(
    ranked: Sequence[Mapping[str, Any]], max_layers: int | None = None, max_mb: float | None = None
) -> list[Mapping[str, Any]]:
    """Units to keep in float: down the ranking, every unit whose quantization hurts (delta_ppl > 0) and that still
    fits both budgets (`max_layers` units, `max_mb` MB of bf16 weights; None = no limit)."""
    if max_layers is None and max_mb is None:
        raise ConfigError("budget: set max_layers (units kept in bf16) and/or max_mb (MB of bf16 weights)")
    kept: list[Mapping[str, Any]] = []
    mb = 0.0
    for unit in ranked:
        if unit["delta_ppl"] <= 0 or (max_layers is not None and len(kept) >= max_layers):
            continue
        if max_mb is not None and mb + unit["bf16_mb"] > max_mb:
            continue
        kept.append(unit)
        mb += unit["bf16_mb"]
    return kept


# ---------------------------------------------------------------------------------------------- the analysis


def validation_text(tokenizer, texts: Sequence[str], max_tokens: int | None) -> str:
    """The documents joined as the gptq protocol joins them, cut to the first `max_tokens` tokens."""
    text = "\n\n".join(texts)
    if max_tokens is None:
        return text
    ids = tokenizer(text, verbose=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def analyze(
    model: nn.Module,
    tokenizer,
    text: str,
    q: QuantScheme,
    *,
    granularity: str = "block",
    seq_len: int = 256,
    batch_size: int = 8,
    reverse_top_k: int = 3,
    max_layers: int | None = 3,
    max_mb: float | None = None,
    calibration_batches: int = 1,
    log: Callable[[str], None] | None = print,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run the whole analysis (module docstring) on a float model; returns (report, activation samples per layer).

    The model is left as it was (float). Perplexity: `qatune.evaluation.perplexity`, gptq protocol."""
    start = time.perf_counter()
    log = log or (lambda line: None)
    if quantized_linear_names(model):
        raise ConfigError("model is already quantized; sensitivity analysis starts from a float model")

    def ppl(m: nn.Module) -> dict:
        return perplexity(m, tokenizer, text, seq_len=seq_len, protocol="gptq", batch_size=batch_size, progress=False)

    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    with ActivationStats(model, linears, calibration_batches) as acts, BlockRecorder(model) as recorder:
        float_eval = ppl(model)
    float_ppl = float_eval["perplexity"]
    full = quantize_ptq_(shared_float_copy(model), q)  # honours q.skip and the group-size rule
    # quantizer.embedding: the token embedding is a unit like any linear (mixed_trial swaps its weight the same way)
    embeddings = quantized_embedding_names(full)
    quantizable = [*embeddings, *quantized_linear_names(full)]
    quant_ppl = ppl(full)["perplexity"]
    log(f"float ppl {float_ppl:.4f}  all quantized ppl {quant_ppl:.4f}  ({len(quantizable)} layers quantized)")

    tied = {id(m.weight) for m in modules.values() if isinstance(m, nn.Embedding)}
    layers, activations = {}, acts.summary()
    for name in quantizable:
        stats = weight_stats(modules[name], q, full.get_submodule(name).weight)
        weight = modules[name].weight
        tied_head = id(weight) in tied and name not in embeddings  # a float tied lm_head is the embedding's table
        stats["bf16_bytes"] = 0 if tied_head else weight.numel() * 2
        layers[name] = stats | activations.get(name, {})

    cache: dict[frozenset, float] = {frozenset(quantizable): quant_ppl}

    def ppl_quantizing(names: set[str]) -> float:
        key = frozenset(names)
        if key not in cache:
            trial = mixed_trial(model, full, set(names))
            recorder.replay_(trial, set(names))
            cache[key] = ppl(trial)["perplexity"]
        return cache[key]

    units = group_units(quantizable, granularity)
    rows = []
    for i, (unit, names) in enumerate(units.items()):
        p = ppl_quantizing(set(names))
        rows.append({
            "name": unit,
            "pattern": unit_pattern(unit, names),
            "layers": names,
            "perplexity": p,
            "delta_ppl": p - float_ppl,
            "delta_pct": 100 * (p - float_ppl) / float_ppl,
            "bf16_mb": sum(layers[n]["bf16_bytes"] for n in names) / MB,
            "quant_mb": sum(layers[n]["quant_bytes"] for n in names) / MB,
        })  # fmt: skip
        log(f"[{i + 1}/{len(units)}] {unit:<40} quantized alone: ppl {p:.4f} ({p - float_ppl:+.4f})  "
            f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    rows.sort(key=lambda r: -r["delta_ppl"])  # stable: equal deltas keep model order
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank

    def recovered(p: float) -> float | None:
        return (quant_ppl - p) / (quant_ppl - float_ppl) if quant_ppl != float_ppl else None

    everything = set(quantizable)
    reverse = []
    for row in [*rows[:reverse_top_k], *rows[max(reverse_top_k, len(rows) - 1) :]]:  # the top k and the bottom one
        p = ppl_quantizing(everything - set(row["layers"]))
        reverse.append({"name": row["name"], "rank": row["rank"], "perplexity": p, "recovered": recovered(p)})
        log(f"all but {row['name']} (rank {row['rank']}): ppl {p:.4f}")

    def linear_mb(kept: set[str]) -> float:
        return sum(s["bf16_bytes"] if n in kept else s["quant_bytes"] for n, s in layers.items()) / MB

    chosen = suggest_skip(rows, max_layers, max_mb)
    curve = []
    for k in range(len(chosen) + 1):
        kept = {n for row in chosen[:k] for n in row["layers"]}
        p = ppl_quantizing(everything - kept)
        curve.append({"kept": [r["name"] for r in chosen[:k]], "perplexity": p, "recovered": recovered(p),
                      "linear_mb": linear_mb(kept)})  # fmt: skip
    kept_all = {n for row in chosen for n in row["layers"]}
    suggestion = {
        "budget": {"max_layers": max_layers, "max_mb": max_mb},
        "skip": [*q.skip, *(row["pattern"] for row in chosen)],
        "units": [row["name"] for row in chosen],
        "bf16_mb": sum(row["bf16_mb"] for row in chosen),
        "perplexity": curve[-1]["perplexity"],
        "recovered": curve[-1]["recovered"],
        "linear_mb": {"bf16": linear_mb(everything), "quantized": linear_mb(set()), "suggested": linear_mb(kept_all)},
        "curve": curve,
    }
    log(f"suggested skip {suggestion['skip']}: ppl {suggestion['perplexity']:.4f}")
    report = {
        "scheme": q.scheme,
        "group_size": q.group_size,
        "base_skip": list(q.skip),
        "granularity": granularity,
        "seq_len": seq_len,
        "tokens": float_eval["tokens"],
        "windows": float_eval["windows"],
        "calibration_batches": calibration_batches,
        "float_perplexity": float_ppl,
        "quantized_perplexity": quant_ppl,
        "units": rows,
        "reverse": reverse,
        "suggestion": suggestion,
        "layers": layers,
        "trials": len(cache) + 1,  # + the float model
        "wall_s": time.perf_counter() - start,
    }
    return report, acts.samples


# ---------------------------------------------------------------------------------------------- report files


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pct(fraction: float | None) -> str:
    return "—" if fraction is None else f"{100 * fraction:.1f}%"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 2) -> list[str]:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def worst_layers(report: Mapping[str, Any], k: int) -> list[str]:
    """One linear per top-ranked unit, its largest weight error first: the layers worth a histogram."""
    layers = report["layers"]
    return [max(u["layers"], key=lambda n: layers[n]["weight_rel_error"]) for u in report["units"][:k]]


def format_markdown(report: Mapping[str, Any], charts: Sequence[str] = ()) -> str:
    r, s = report, report["suggestion"]
    layers = r["layers"]
    lines = [
        "# Quantization sensitivity",
        "",
        f"Model `{r.get('model', '?')}`, scheme {r['scheme']} (group size {r['group_size']}), granularity "
        f"{r['granularity']}; perplexity (gptq protocol) on {r['tokens']} predicted tokens in {r['windows']} "
        f"windows of {r['seq_len']}. {r['trials']} evaluations, {r['wall_s']:.0f} s.",
        "",
        f"Float perplexity **{r['float_perplexity']:.4f}**, everything quantized **{r['quantized_perplexity']:.4f}**.",
        "",
        "## Each unit quantized alone (everything else float), most harmful first",
        "",
    ]
    rows = []
    for u in r["units"]:
        worst = max(u["layers"], key=lambda n: layers[n]["weight_rel_error"])
        kurt = max((layers[n].get("act_kurtosis", float("nan")) for n in u["layers"]), default=float("nan"))
        rows.append([str(u["rank"]), f"`{u['name']}`", f"{u['perplexity']:.4f}", f"{u['delta_ppl']:+.4f}",
                     f"{u['delta_pct']:+.2f}%", f"{u['bf16_mb']:.2f}", f"{layers[worst]['weight_rel_error']:.4f}",
                     _fmt(kurt, ".1f")])  # fmt: skip
    lines += _table(["rank", "unit", "ppl", "Δ ppl", "Δ %", "bf16 MB", "max weight err", "max act kurtosis"], rows)
    lines += ["", "## Everything quantized except one unit", ""]
    rows = [[str(v["rank"]), f"`{v['name']}`", f"{v['perplexity']:.4f}", _pct(v["recovered"])]
            for v in r["reverse"]]  # fmt: skip
    lines += _table(["rank", "kept in float", "ppl", "recovers of PTQ's loss"], rows)
    budget = ", ".join(f"{k}={v}" for k, v in s["budget"].items() if v is not None)
    lines += [
        "",
        f"## Suggested skip list ({budget})",
        "",
        "```yaml",
        "quantizer:",
        f"  skip: [{', '.join(s['skip'])}]",
        "```",
        "",
        f"Keeps {len(s['units'])} unit(s), {s['bf16_mb']:.2f} MB of bf16 weights: perplexity "
        f"{s['perplexity']:.4f} vs {r['quantized_perplexity']:.4f} all quantized and {r['float_perplexity']:.4f} "
        f"float. Weights of the analysed linears: {s['linear_mb']['suggested']:.1f} MB vs "
        f"{s['linear_mb']['quantized']:.1f} MB all quantized (packed) and {s['linear_mb']['bf16']:.1f} MB bf16.",
        "",
    ]
    rows = [[str(len(c["kept"])), ", ".join(f"`{n}`" for n in c["kept"]) or "(none)", f"{c['perplexity']:.4f}",
             _pct(c["recovered"]), f"{c['linear_mb']:.1f}"]
            for c in s["curve"]]  # fmt: skip
    lines += _table(["kept", "units in float", "ppl", "recovers", "linear MB"], rows)
    lines += ["", "## Layers with the largest weight error (all layers: sensitivity.json)", ""]
    rows = []
    for name in sorted(layers, key=lambda n: -layers[n]["weight_rel_error"])[:20]:
        x = layers[name]
        rows.append([f"`{name}`", f"{x['weight_rel_error']:.4f}", _fmt(x["clipped_fraction"], ".4f"),
                     f"{x['weight_absmax']:.3f}", _fmt(x.get("act_absmax"), ".2f"), _fmt(x.get("act_kurtosis"), ".1f"),
                     _fmt(x.get("act_channel_outlier_ratio"), ".1f")])  # fmt: skip
    lines += _table(["layer", "weight rel err", "clipped", "weight absmax", "act absmax", "act kurtosis",
                     "act outlier ratio"], rows, text_columns=1)  # fmt: skip
    lines += [""] + [f"![{Path(c).stem}]({c})" for c in charts] + [""]
    return "\n".join(lines)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # the Agg canvas without touching pyplot's global backend
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def plot_sensitivity(report: Mapping[str, Any]) -> bytes:
    """Horizontal bars: perplexity increase of each unit quantized alone, most harmful on top."""
    units = report["units"][:CHART_UNITS]
    fig = _figure(8, 0.25 * len(units) + 1.5)
    ax = fig.add_subplot()
    ax.barh([u["name"] for u in units][::-1], [u["delta_ppl"] for u in units][::-1], color="#3b75af")
    ax.set_xlabel("perplexity increase when quantized alone")
    more = f" (top {len(units)} of {len(report['units'])})" if len(report["units"]) > len(units) else ""
    ax.set_title(f"{report['scheme']} sensitivity per {report['granularity']}{more}")
    ax.tick_params(axis="y", labelsize=7)
    return _png(fig)


def plot_histograms(name: str, weight: torch.Tensor, activations: torch.Tensor | None, stats: Mapping) -> bytes:
    """Weight and input-activation histograms of one linear (log counts: outliers stay visible)."""
    fig = _figure(10, 3.2)
    w = weight.detach().float().flatten()
    w = w[:: max(1, w.numel() // 1_000_000)]
    clipped = _fmt(stats["clipped_fraction"], ".4f")
    panels = [(w, f"weights: rel err {stats['weight_rel_error']:.4f}, clipped {clipped}")]
    if activations is not None:
        kurtosis = _fmt(stats.get("act_kurtosis"), ".1f")
        panels.append((activations, f"inputs: absmax {stats.get('act_absmax', 0):.1f}, kurtosis {kurtosis}"))
    for i, (values, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.hist(values.numpy(), bins=120, log=True, color="#3b75af")
        ax.set_title(title, fontsize=9)
    fig.suptitle(name, fontsize=10)
    return _png(fig)


def write_sensitivity(
    report: Mapping[str, Any],
    output_dir: str | Path,
    model: nn.Module | None = None,
    samples: Mapping[str, torch.Tensor] | None = None,
    histograms_top_k: int = 4,
) -> dict[str, Path]:
    """sensitivity.json, sensitivity.md and (with matplotlib, the `plot` extra) sensitivity.png plus weight and
    activation histograms of the worst layers in histograms/; every file written atomically."""
    out = Path(output_dir)
    paths: dict[str, Path] = {"json": atomic_write_json(out / "sensitivity.json", report)}
    charts: list[str] = []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("sensitivity: matplotlib not installed (pip install 'qatune[plot]'): charts skipped")
    else:
        paths["png"] = atomic_write_bytes(out / "sensitivity.png", plot_sensitivity(report))
        charts.append("sensitivity.png")
        modules = dict(model.named_modules()) if model is not None else {}
        for name in worst_layers(report, histograms_top_k) if modules else []:
            png = plot_histograms(name, modules[name].weight, (samples or {}).get(name), report["layers"][name])
            rel = f"histograms/{name}.png"
            paths[rel] = atomic_write_bytes(out / rel, png)
            charts.append(rel)
    paths["md"] = atomic_write_text(out / "sensitivity.md", format_markdown(report, charts))
    return paths
