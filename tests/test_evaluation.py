"""Perplexity protocols checked against independent reference loops and against lm-evaluation-harness itself."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from qatune.data import python_docs
from qatune.errors import ConfigError
from qatune.evaluation import lm_eval_windows, perplexity


def validation_text(chars: int) -> list[str]:
    """The first documents of the Python-docs validation split, cut to about `chars` characters in all."""
    docs, total = [], 0
    for doc in python_docs("validation"):
        docs.append(doc[: chars - total])
        total += len(docs[-1])
        if total >= chars:
            return docs
    return docs


def reference_gptq_perplexity(model, tokenizer, text: str, seq_len: int) -> float:
    """The GPTQ repo's eval loop: non-overlapping windows, HF's own shifted loss, tail dropped."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    n_windows = ids.shape[1] // seq_len
    nll_sum = 0.0
    for i in range(n_windows):
        window = ids[:, i * seq_len : (i + 1) * seq_len]
        with torch.no_grad():
            loss = model(window, labels=window).loss  # mean over the seq_len - 1 predicted tokens
        nll_sum += loss.item() * (seq_len - 1)
    return math.exp(nll_sum / (n_windows * (seq_len - 1)))


def reference_sliding_perplexity(model, tokenizer, text: str, seq_len: int, stride: int) -> float:
    """Hugging Face's perplexity guide (docs/source/en/perplexity.md), verbatim but for names."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    n = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)  # labels are shifted inside
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tokens)


def test_gptq_matches_reference_loop(tiny_llama, tiny_tokenizer):
    docs = validation_text(3500)
    result = perplexity(tiny_llama, tiny_tokenizer, docs, seq_len=128, progress=False)
    expected = reference_gptq_perplexity(tiny_llama, tiny_tokenizer, "\n\n".join(docs), 128)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    n_ids = len(tiny_tokenizer("\n\n".join(docs)).input_ids)
    assert result["windows"] == n_ids // 128
    assert result["tokens"] == result["windows"] * 127
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]))
    # A random model over a 512-token vocabulary is close to uniform, but not exactly.
    assert 300 < result["perplexity"] < 2000
    assert result["protocol"] == "gptq" and result["seq_len"] == 128 and result["tokens_per_s"] > 0


@pytest.mark.parametrize("protocol", ["gptq", "lm_eval", "sliding"])
def test_batch_size_does_not_change_the_result(tiny_llama, tiny_tokenizer, protocol):
    # lm_eval and sliding have windows of unequal length: batching them exercises the right padding.
    docs = validation_text(1200)
    kwargs = {"stride": 48} if protocol == "sliding" else {}
    one = perplexity(tiny_llama, tiny_tokenizer, docs, seq_len=96, protocol=protocol, progress=False, **kwargs)
    four = perplexity(
        tiny_llama, tiny_tokenizer, docs, seq_len=96, protocol=protocol, batch_size=4, progress=False, **kwargs
    )
    assert one["tokens"] == four["tokens"]
    assert four["nll"] == pytest.approx(one["nll"], rel=1e-5)


def test_sliding_with_stride_seq_len_is_gptq_windowing(tiny_llama, tiny_tokenizer):
    # Trim the text until its token count is a multiple of seq_len: then sliding has no tail window to add.
    seq_len = 64
    text = "\n\n".join(validation_text(2500))
    while len(tiny_tokenizer(text).input_ids) % seq_len:
        text = text[:-1]
    gptq = perplexity(tiny_llama, tiny_tokenizer, text, seq_len=seq_len, progress=False)
    sliding = perplexity(
        tiny_llama, tiny_tokenizer, text, seq_len=seq_len, protocol="sliding", stride=seq_len, progress=False
    )
    assert sliding["tokens"] == gptq["tokens"] and sliding["windows"] == gptq["windows"]
    assert sliding["perplexity"] == pytest.approx(gptq["perplexity"], rel=1e-6)


def test_sliding_matches_hugging_face_guide(tiny_llama, tiny_tokenizer):
    docs = validation_text(1200)
    result = perplexity(tiny_llama, tiny_tokenizer, docs, seq_len=96, protocol="sliding", stride=40, progress=False)
    expected = reference_sliding_perplexity(tiny_llama, tiny_tokenizer, "\n\n".join(docs), 96, 40)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert result["tokens"] == len(tiny_tokenizer("\n\n".join(docs)).input_ids) - 1  # every token but the first


def test_lm_eval_windows_are_lm_evals_rolling_windows():
    utils = pytest.importorskip("lm_eval.utils", reason="lm-eval is an optional extra: pip install 'qatune[lm-eval]'")
    rng = random.Random(0)
    for n_tokens in [1, 5, 16, 17, 33, 100]:
        ids = [rng.randrange(3, 500) for _ in range(n_tokens)]
        theirs = [
            utils.make_disjoint_window(pair)
            for pair in utils.get_rolling_token_windows(ids, prefix_token=0, max_seq_len=16, context_len=1)
        ]
        ours = lm_eval_windows(ids, 16, prefix_token=0)
        assert len(ours) == len(theirs)
        for (inputs, targets), (context, continuation) in zip(ours, theirs, strict=True):
            # lm-eval feeds (context + continuation)[:-1] and scores the last len(continuation) positions.
            assert inputs == (context + continuation)[:-1]
            assert [t for t in targets if t != -100] == continuation
            assert targets[len(targets) - len(continuation) :] == continuation


def lm_eval_harness_metrics(model, tokenizer, docs: list[str], max_length: int) -> dict:
    """lm-eval's own wikitext computation: HFLM.loglikelihood_rolling + the task's process_results + aggregations."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=1)
    requests = [Instance(request_type="loglikelihood_rolling", doc={"page": d}, arguments=(d,), idx=0) for d in docs]
    loglikelihoods = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    items = [process_results({"page": d}, (ll,)) for d, ll in zip(docs, loglikelihoods, strict=True)]
    return {
        "word_perplexity": weighted_perplexity([i["word_perplexity"] for i in items]),
        "byte_perplexity": weighted_perplexity([i["byte_perplexity"] for i in items]),
        "bits_per_byte": bits_per_byte([i["bits_per_byte"] for i in items]),
    }


def test_lm_eval_protocol_matches_lm_evaluation_harness(tiny_llama, tiny_tokenizer):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'qatune[lm-eval]'")
    docs = [d[:1200] for d in python_docs("validation")[:3]]  # several rolling windows per document
    ours = perplexity(tiny_llama, tiny_tokenizer, docs, seq_len=128, protocol="lm_eval", progress=False)
    theirs = lm_eval_harness_metrics(tiny_llama, tiny_tokenizer, docs, max_length=128)
    assert ours["documents"] == 3 and ours["windows"] > 3
    for metric in ["word_perplexity", "byte_perplexity", "bits_per_byte"]:
        assert ours[metric] == pytest.approx(theirs[metric], rel=5e-3), metric
    assert ours["bits_per_byte"] == pytest.approx(math.log2(ours["byte_perplexity"]))


@pytest.mark.parametrize(
    ("texts", "kwargs", "message"),
    [
        ("", {}, "no text to evaluate"),
        ([], {}, "no text to evaluate"),
        (["", ""], {"protocol": "lm_eval"}, "no text to evaluate"),
        ("some text", {"seq_len": 1024}, "seq_len=1024 must be between 2 and the model's context \\(512"),
        ("short text", {"seq_len": 64}, "text has 7 tokens, fewer than one window of seq_len=64"),
        (
            "some text",
            {"protocol": "wikitext", "seq_len": 8},
            "protocol 'wikitext' is not one of gptq",
        ),
        ("some text", {"stride": 8, "seq_len": 8}, "stride=8 is only used by protocol sliding"),
        (
            "some text",
            {"protocol": "sliding", "stride": 0, "seq_len": 8},
            "stride=0: give an integer between 1 and",
        ),
        ("some text", {"batch_size": 0, "seq_len": 8}, "batch_size=0: give an integer >= 1"),
    ],
)
def test_bad_input_is_a_one_line_value_error(tiny_llama, tiny_tokenizer, texts, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        perplexity(tiny_llama, tiny_tokenizer, texts, progress=False, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_gptq_matches_reference_on_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    docs = validation_text(7000)  # ~1.6k tokens: 3 windows of 512
    result = perplexity(model, tokenizer, docs, seq_len=512, batch_size=2, progress=False)
    expected = reference_gptq_perplexity(model, tokenizer, "\n\n".join(docs), 512)
    assert result["windows"] == 3
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert 5 < result["perplexity"] < 40  # a real model on English prose (FACTS: 14.8 on the whole split)


# --- the lm-eval adapter recipe ---------------------------------------------------------------------------


def write_local_task(tmp_path, docs: list[str]) -> str:
    """A wikitext-like loglikelihood_rolling task over a local jsonl file: runs offline."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in docs))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "tiny_docs.yaml").write_text(
        "task: tiny_docs\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{page}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return str(task_dir)


def eleuther_cfg(tmp_path, model_dir, include_path, **overrides):
    cfg = {
        "model": {"path": str(model_dir), "dtype": "fp32"},
        "tasks": ["tiny_docs"],
        "include_path": include_path,
        "limit": None,
        "batch_size": 2,
        "max_length": 128,
        "quantize": None,
        "quantizer": {"scheme": "8da4w", "group_size": 32, "skip": ["lm_head"]},
        "calibration_dataset": {"name": "python_docs", "split": "train"},
        "device": "cpu",
        "output_dir": str(tmp_path / "out"),
    }
    return OmegaConf.create(cfg | overrides)


@pytest.fixture
def saved_tiny_llama(tmp_path, tiny_llama, tiny_tokenizer):
    model_dir = tmp_path / "model"
    tiny_llama.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("quantize", [None, "rtn"])
def test_eleuther_eval_recipe_runs_a_local_task(tmp_path, saved_tiny_llama, tiny_tokenizer, quantize):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'qatune[lm-eval]'")
    from qatune.models import load_model
    from qatune.quantization import quantize_ptq_, resolve_quantizer
    from qatune.registry import load_recipe

    docs = [d[:700] for d in python_docs("validation")[:4]]
    include_path = write_local_task(tmp_path, docs)
    cfg = eleuther_cfg(tmp_path, saved_tiny_llama, include_path, limit=3, quantize=quantize)
    results = load_recipe("eleuther_eval").main(cfg)

    written = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = written["results"]["tiny_docs"]
    assert metrics["word_perplexity,none"] == pytest.approx(results["results"]["tiny_docs"]["word_perplexity,none"])
    assert written["qatune"]["quantize"] == quantize and written["qatune"]["max_length"] == 128

    # The same model through our lm_eval protocol, on the 3 documents `limit` kept.
    model = load_model(str(saved_tiny_llama), dtype="fp32")
    if quantize:
        quantize_ptq_(model, resolve_quantizer({"scheme": "8da4w", "group_size": 32, "skip": ["lm_head"]}))
    ours = perplexity(model, tiny_tokenizer, docs[:3], seq_len=128, protocol="lm_eval", progress=False)
    for metric in ["word_perplexity", "byte_perplexity", "bits_per_byte"]:
        assert metrics[f"{metric},none"] == pytest.approx(ours[metric], rel=5e-3), metric


def test_eleuther_eval_unknown_task_fails_before_loading(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'qatune[lm-eval]'")
    from qatune.registry import load_recipe

    include_path = write_local_task(tmp_path, ["one document"])
    model_dir = tmp_path / "not_loaded"  # passes the config's checks (a config.json); no weights: none load
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    cfg = eleuther_cfg(tmp_path, model_dir, include_path, tasks=["tiny_doc"])
    with pytest.raises(ValueError, match="unknown lm-eval task 'tiny_doc'.*did you mean tiny_docs"):
        load_recipe("eleuther_eval").main(cfg)


def test_eleuther_eval_config_errors(tmp_path):
    from qatune.registry import load_recipe

    recipe = load_recipe("eleuther_eval")
    (tmp_path / "config.json").write_text("{}")  # tmp_path stands for the model directory
    with pytest.raises(ConfigError, match="include_path .*missing.* is not a directory"):
        recipe.check_config(eleuther_cfg(tmp_path, tmp_path, str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="tasks is empty"):
        recipe.check_config(eleuther_cfg(tmp_path, tmp_path, None, tasks=[]))
    with pytest.raises(ValueError, match="limit=0 must be positive"):
        recipe.check_config(eleuther_cfg(tmp_path, tmp_path, None, limit=0))
