"""Sensitivity analysis on tiny random Llamas: the ranking against brute force, statistics against known answers,
the budget, the skip list the quantizer accepts, and the recipe end to end."""

import copy
import json
import math
import sys

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torchao.quantization import quantize_

from qatune.cli import load_recipe_config
from qatune.data import python_docs
from qatune.evaluation import perplexity
from qatune.quantization import (
    QuantScheme,
    fake_quantize_,
    float_linear_names,
    quantize_ptq_,
    quantized_linear_names,
    resolve_quantizer,
)
from qatune.sensitivity import (
    ActivationStats,
    BlockRecorder,
    analyze,
    group_units,
    mixed_trial,
    suggest_skip,
    unit_pattern,
    validation_text,
    weight_stats,
    write_sensitivity,
)

SEQ_LEN = 64
PLANTED = "model.layers.2"


def planted_llama() -> nn.Module:
    """4 blocks; block 2's output projections get one large weight per group of 32 inputs, so int4 rounds the rest
    of each group coarsely: quantizing that block alone should hurt most."""
    model = make_tiny_llama(layers=4, tie_word_embeddings=True)
    with torch.no_grad():
        block = model.model.layers[2]
        for linear in (block.self_attn.o_proj, block.mlp.down_proj):
            linear.weight[:, ::32] = 0.5
    return model


@pytest.fixture(scope="module")
def text(tiny_tokenizer):
    return validation_text(tiny_tokenizer, python_docs("validation"), 8 * SEQ_LEN)


@pytest.fixture(scope="module")
def analysis(tiny_tokenizer, text):
    model = planted_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report, samples = analyze(
        model, tiny_tokenizer, text, QuantScheme(), seq_len=SEQ_LEN, batch_size=4, reverse_top_k=1, max_layers=2,
        log=None,
    )  # fmt: skip
    return model, before, report, samples


def in_unit(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def ppl(model, tokenizer, text) -> float:
    return perplexity(model, tokenizer, text, seq_len=SEQ_LEN, batch_size=4, progress=False)["perplexity"]


def test_ranking_matches_brute_force(analysis, tiny_tokenizer, text):
    model, before, report, _ = analysis
    q = QuantScheme()
    # Brute force, with torchao directly: a full copy per unit, quantize_ filtered to that unit's linears.
    brute = {}
    for unit in ["model.layers.0", "model.layers.1", "model.layers.2", "model.layers.3", "lm_head"]:
        trial = copy.deepcopy(model)
        quantize_(trial, q.base_config(), filter_fn=lambda m, n, u=unit: isinstance(m, nn.Linear) and in_unit(n, u))
        brute[unit] = ppl(trial, tiny_tokenizer, text)
    assert {u["name"]: u["perplexity"] for u in report["units"]} == pytest.approx(brute, rel=1e-6)
    assert [u["name"] for u in report["units"]] == sorted(brute, key=lambda u: -brute[u])
    assert [u["rank"] for u in report["units"]] == [1, 2, 3, 4, 5]
    assert report["units"][0]["name"] == PLANTED
    assert report["float_perplexity"] == pytest.approx(ppl(model, tiny_tokenizer, text), rel=1e-6)
    everything = copy.deepcopy(model)
    quantize_(everything, q.base_config())
    assert report["quantized_perplexity"] == pytest.approx(ppl(everything, tiny_tokenizer, text), rel=1e-6)

    # Reverse: everything quantized except the top unit recovers more than except the bottom one.
    top, bottom = report["reverse"]
    assert (top["rank"], bottom["rank"]) == (1, 5)
    all_but_top = copy.deepcopy(model)
    quantize_(all_but_top, q.base_config(), filter_fn=lambda m, n: isinstance(m, nn.Linear) and not in_unit(n, PLANTED))
    assert top["perplexity"] == pytest.approx(ppl(all_but_top, tiny_tokenizer, text), rel=1e-6)
    assert top["perplexity"] < bottom["perplexity"] and top["recovered"] > bottom["recovered"]

    # The analysis left the float model as it was (trials share its tensors but never write them).
    assert float_linear_names(model) == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_suggested_skip_is_what_the_quantizer_and_qat_accept(analysis, tiny_tokenizer, text):
    model, _, report, _ = analysis
    s = report["suggestion"]
    assert s["units"] == [u["name"] for u in report["units"][:2]] and s["skip"][0] == f"{PLANTED}.*"
    kept = sorted(n for u in report["units"][:2] for n in u["layers"])
    q = resolve_quantizer({"scheme": "8da4w", "group_size": 32, "skip": s["skip"]})
    ptq = quantize_ptq_(copy.deepcopy(model), q)
    assert sorted(float_linear_names(ptq)) == kept
    assert s["perplexity"] == pytest.approx(ppl(ptq, tiny_tokenizer, text), rel=1e-6)
    assert s["curve"][-1]["perplexity"] == s["perplexity"] and len(s["curve"]) == 3
    assert s["curve"][0]["perplexity"] == report["quantized_perplexity"]
    qat = fake_quantize_(copy.deepcopy(model), q)  # the QAT recipe's prepare
    assert sorted(float_linear_names(qat)) == kept
    # bf16 MB of the kept weights; the tied lm_head costs nothing (its weight is the embedding's).
    bf16 = sum(model.get_submodule(n).weight.numel() * 2 for n in kept if n != "lm_head") / 1e6
    assert s["bf16_mb"] == pytest.approx(bf16)
    assert s["linear_mb"]["quantized"] < s["linear_mb"]["suggested"] < s["linear_mb"]["bf16"]


def test_replayed_prefix_gives_the_same_perplexity(tiny_tokenizer, text):
    model = make_tiny_llama(layers=3)
    with BlockRecorder(model) as recorder:
        ppl(model, tiny_tokenizer, text)
    assert [len(outputs) for outputs in recorder.outputs] == [2, 2, 2]  # 8 windows in batches of 4
    full = quantize_ptq_(copy.deepcopy(model), QuantScheme())
    for unit, skipped in [("model.layers.2", 2), ("lm_head", 3), ("model.layers.0", 0)]:
        names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and in_unit(n, unit)}
        replayed = mixed_trial(model, full, names)
        assert recorder.replay_(replayed, names) == skipped
        assert ppl(replayed, tiny_tokenizer, text) == ppl(mixed_trial(model, full, names), tiny_tokenizer, text)
    assert recorder.first_block({"model.layers.1.mlp.up_proj", "lm_head"}) == 1
    with BlockRecorder(model, max_bytes=1000) as small:  # over its memory cap it records nothing: trials run whole
        ppl(model, tiny_tokenizer, text)
    assert not small.ok and small.replay_(mixed_trial(model, full, {"lm_head"}), {"lm_head"}) == 0


def test_units_and_patterns(tiny_llama):
    linears = [n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)]
    blocks = group_units(linears, "block")
    assert list(blocks) == ["model.layers.0", "model.layers.1", "lm_head"]
    assert len(blocks["model.layers.1"]) == 7 and blocks["lm_head"] == ["lm_head"]
    assert unit_pattern("model.layers.1", blocks["model.layers.1"]) == "model.layers.1.*"
    assert unit_pattern("lm_head", ["lm_head"]) == "lm_head"
    assert list(group_units(linears, "layer")) == linears
    with pytest.raises(ValueError, match="granularity 'blocks'"):
        group_units(linears, "blocks")
    # model.layers.1.* must not keep model.layers.10+ in float: check on a 12-block model's names.
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(12)]
    model = nn.Module()
    for name in names:
        parent = model
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module("down_proj", nn.Linear(64, 8, bias=False))
    quantize_ptq_(model, QuantScheme(skip=["model.layers.1.*"]))
    assert float_linear_names(model) == ["model.layers.1.mlp.down_proj"]


def test_weight_stats_on_a_weight_with_a_known_grid():
    # Two groups of 32 on the grid step s = 1/8: integer multiples of s in [-7, 7] are exact; each group's abs max
    # is 7.5 s (torchao's symmetric scale is absmax / 7.5 = s). +7.5 s rounds to 8, clamped to 7: clipped, error
    # s/2. -7.5 s rounds to -8, inside the grid: error s/2, not clipped.
    s = 1 / 8
    ints = torch.tensor([(i % 15) - 7 for i in range(31)], dtype=torch.float32)
    row = torch.cat([ints, torch.tensor([7.5]), -ints, torch.tensor([-7.5])]) * s
    linear = nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(row[None])
    stats = weight_stats(linear, QuantScheme())
    assert stats["clipped_fraction"] == pytest.approx(1 / 64)
    assert stats["weight_rel_error"] == pytest.approx(math.sqrt(2) * s / 2 / row.norm().item(), rel=1e-6)
    assert stats["weight_absmax"] == 7.5 * s and stats["params"] == 64
    assert stats["quant_bytes"] == 64 // 2 + 2 * 4  # 4-bit values + one fp32 scale per group (zero points all 0)
    # int8 per channel: scale = absmax / 127.5, so the row's +7.5 s lands on 127.5 -> 128 -> clamped to 127.
    assert weight_stats(linear, QuantScheme(scheme="8da8w"))["clipped_fraction"] == pytest.approx(1 / 64)


class Fork(nn.Module):
    """Two linears reading the same input (as q/k/v do), then a third reading another tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 4), nn.Linear(16, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_activation_stats_moments_and_batch_limit():
    torch.manual_seed(0)
    model = Fork()
    batches = [torch.randn(3, 5, 16) ** 3 + 0.5, torch.randn(2, 5, 16) * 4, torch.full((1, 5, 16), 1000.0)]
    with ActivationStats(model, ["a", "b", "c"], max_batches=2) as acts:
        for x in batches:
            model(x)
    seen = torch.cat([b.reshape(-1, 16) for b in batches[:2]]).double()  # the third batch is past the limit
    centered = seen - seen.mean()
    stats = acts.summary()
    assert stats["a"]["act_kurtosis"] == pytest.approx(((centered**4).mean() / (centered**2).mean() ** 2).item())
    assert stats["a"]["act_absmax"] == pytest.approx(seen.abs().max().item())
    channels = seen.abs().amax(0)
    assert stats["a"]["act_channel_outlier_ratio"] == pytest.approx((channels.max() / channels.median()).item())
    assert stats["b"] == stats["a"] and stats["c"] != stats["a"]
    with torch.no_grad():
        c_inputs = torch.cat([(model.a(b) + model.b(b)).reshape(-1, 4) for b in batches[:2]])
    assert stats["c"]["act_absmax"] == pytest.approx(c_inputs.abs().max().item())
    assert acts.samples["a"].numel() == 3 * 5 * 16 and not model.a._forward_pre_hooks  # hooks removed on exit


def test_suggest_skip_budget():
    ranked = [
        {"name": "a", "delta_ppl": 3.0, "bf16_mb": 5.0},
        {"name": "b", "delta_ppl": 2.0, "bf16_mb": 50.0},
        {"name": "c", "delta_ppl": 1.0, "bf16_mb": 5.0},
        {"name": "d", "delta_ppl": 0.5, "bf16_mb": 0.0},  # a tied lm_head: its weight is the embedding
        {"name": "e", "delta_ppl": -0.1, "bf16_mb": 1.0},  # quantizing it does not hurt: never kept
    ]
    names = lambda kept: [u["name"] for u in kept]  # noqa: E731
    assert names(suggest_skip(ranked, max_layers=2)) == ["a", "b"]
    assert names(suggest_skip(ranked, max_mb=10)) == ["a", "c", "d"]
    assert names(suggest_skip(ranked, max_layers=2, max_mb=10)) == ["a", "c"]
    assert names(suggest_skip(ranked, max_layers=10)) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="max_layers"):
        suggest_skip(ranked)


def test_validation_text_is_cut_to_max_tokens(tiny_tokenizer):
    text = validation_text(tiny_tokenizer, python_docs("validation"), 300)
    assert abs(len(tiny_tokenizer(text)["input_ids"]) - 300) <= 1
    assert text == "\n\n".join(python_docs("validation"))[: len(text)]


def test_write_without_matplotlib(analysis, tmp_path, monkeypatch, capsys):
    _, _, report, _ = analysis
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_sensitivity(report, tmp_path)
    assert set(paths) == {"json", "md"} and "charts skipped" in capsys.readouterr().out
    assert json.loads((tmp_path / "sensitivity.json").read_text())["units"][0]["name"] == PLANTED


def test_recipe_end_to_end(tiny_checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    overrides = [f"model.path={tiny_checkpoint}", f"output_dir={out}", "seq_len=64", "max_tokens=256",
                 "granularity=layer", "reverse_top_k=1", "histograms_top_k=2", "budget.max_mb=0.2"]  # fmt: skip
    module, cfg = load_recipe_config("sensitivity", "sensitivity", overrides)
    report = module.main(cfg)
    saved = json.loads((out / "sensitivity.json").read_text())
    assert len(saved["units"]) == 15 and saved["granularity"] == "layer" and saved["model"] == str(tiny_checkpoint)
    assert saved["suggestion"]["bf16_mb"] <= 0.2 and saved["suggestion"] == report["suggestion"]
    assert len(saved["layers"]) == 15 and all(0 < x["weight_rel_error"] < 1 for x in saved["layers"].values())
    md = (out / "sensitivity.md").read_text()
    assert f"  skip: [{', '.join(saved['suggestion']['skip'])}]" in md
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(pngs) == 3 and "sensitivity.png" in pngs
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("granularity=blocks", "granularity 'blocks'"),
        ("budget.max_layers=null", "budget: set max_layers"),
        ("max_tokens=100", "max_tokens=100 is less than one window"),
        ("quantizer.scheme=int3", "scheme 'int3'"),
        ("reverse_top_k=-1", "reverse_top_k=-1"),
    ],
)
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe_config("sensitivity", "sensitivity", [override])


def test_the_embedding_is_ranked_like_any_layer(tiny_tokenizer, text):
    """quantizer.embedding: the token embedding is a unit of its own; its trial is torchao's PTQ of the embedding
    alone, and its pattern is a skip entry the quantizer honours for embeddings as for linears."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    from qatune.quantization import quantized_embedding_names

    model = make_tiny_llama(layers=2)
    q = QuantScheme(embedding="int4")
    report, _ = analyze(model, tiny_tokenizer, text, q, seq_len=SEQ_LEN, batch_size=4, reverse_top_k=1, max_layers=1,
                        log=None)  # fmt: skip
    units = {u["name"]: u for u in report["units"]}
    assert set(units) == {"model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"}
    brute = copy.deepcopy(model)
    only_embedding = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    quantize_(brute, only_embedding, filter_fn=lambda m, n: isinstance(m, nn.Embedding))
    assert units["model.embed_tokens"]["perplexity"] == pytest.approx(ppl(brute, tiny_tokenizer, text), rel=1e-6)
    assert units["model.embed_tokens"]["bf16_mb"] == pytest.approx(512 * 256 * 2 / 1e6)  # its own table
    everything = quantize_ptq_(copy.deepcopy(model), q)
    assert report["quantized_perplexity"] == pytest.approx(ppl(everything, tiny_tokenizer, text), rel=1e-6)

    # The trials swap the embedding's weight like a linear's: all but the embedding == PTQ with it in `skip`.
    pattern = units["model.embed_tokens"]["pattern"]
    ptq = quantize_ptq_(copy.deepcopy(model), resolve_quantizer({"embedding": "int4", "skip": [pattern]}))
    assert quantized_embedding_names(ptq) == [] and float_linear_names(ptq) == []
    names = set(quantized_embedding_names(everything) + quantized_linear_names(everything)) - {"model.embed_tokens"}
    trial = mixed_trial(model, everything, names)
    assert ppl(trial, tiny_tokenizer, text) == pytest.approx(ppl(ptq, tiny_tokenizer, text), rel=1e-6)
