"""Size, peak memory and speed measurements on tiny Llamas (fp32 and torchao 8da4w)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

from qatune import measure
from qatune.measure import measure_model, model_size, peak_memory, throughput


def ptq_8da4w(model: torch.nn.Module, group_size: int = 32) -> torch.nn.Module:
    quantize_(
        model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    )
    return model


def linear_weight_count(c) -> int:
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + lm_head


def parameter_count(c, tied: bool) -> int:
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    return linear_weight_count(c) + norms + embed - (embed if tied else 0)


@pytest.mark.parametrize("tied", [False, True])
def test_model_size_of_float_model_is_parameter_count_times_bytes(tied):
    model = make_tiny_llama(tie_word_embeddings=tied)
    c = model.config
    size = model_size(model)
    assert size["parameter_bytes"] == parameter_count(c, tied) * 4  # fp32, a tied weight counted once
    assert size["buffer_bytes"] > 0  # rotary inv_freq
    assert size["total_bytes"] == size["packed_bytes"] == size["parameter_bytes"] + size["buffer_bytes"]
    assert size["linear_weights"] == linear_weight_count(c)
    assert size["linear_bits_per_weight"] == size["linear_storage_bits_per_weight"] == 32.0

    half = model_size(make_tiny_llama(tie_word_embeddings=tied).to(torch.bfloat16))
    assert half["parameter_bytes"] == parameter_count(c, tied) * 2
    assert half["linear_bits_per_weight"] == 16.0


@pytest.mark.parametrize(
    ("dtype", "packed_bits", "storage_bits"), [(torch.float32, 5.0, 9.25), (torch.bfloat16, 4.5, 8.75)]
)
def test_ptq_8da4w_bits_per_weight(dtype, packed_bits, storage_bits):
    # int4 values held in int8 (8 bits) + one scale (model dtype) and one int8 zero point per 32 weights;
    # packed: 4 bits + the scale, the all-zero symmetric zero points dropped.
    model = ptq_8da4w(make_tiny_llama().to(dtype))
    c, n = model.config, linear_weight_count(model.config)
    size = model_size(model)
    assert size["linear_weights"] == n
    assert size["linear_storage_bits_per_weight"] == storage_bits
    assert size["linear_bits_per_weight"] == packed_bits
    scale_bytes = torch.finfo(dtype).bits // 8
    embed_and_norms = (c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size) * scale_bytes
    assert size["parameter_bytes"] == embed_and_norms + n + n // 32 * (scale_bytes + 1)
    assert size["packed_bytes"] == embed_and_norms + n // 2 + n // 32 * scale_bytes + size["buffer_bytes"]


def test_ptq_with_tied_embeddings_keeps_a_float_embedding():
    model = ptq_8da4w(make_tiny_llama(tie_word_embeddings=True))
    c = model.config
    size = model_size(model)
    assert size["linear_bits_per_weight"] == 5.0  # lm_head quantized too
    # The embedding stays fp32 beside the now-quantized lm_head: both are in memory.
    assert size["parameter_bytes"] > c.vocab_size * c.hidden_size * 4 + size["linear_bytes"]


def test_model_size_of_checkpoint_dir_is_bytes_on_disk(tmp_path):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    size = model_size(tmp_path / "ckpt")
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ckpt") for f in fs)
    assert size["total_bytes"] == on_disk
    assert set(size["files"]) >= {"model.safetensors", "config.json"}
    assert size["files"]["model.safetensors"] > model_size(model)["parameter_bytes"]  # + header
    assert model_size(tmp_path / "ckpt" / "config.json")["total_bytes"] == size["files"]["config.json"]
    with pytest.raises(FileNotFoundError, match="nope"):
        model_size(tmp_path / "nope")
    with pytest.raises(ValueError, match="dict"):
        model_size({})


def _allocate(mib: int) -> int:
    t = torch.ones(mib * 2**20 // 4)  # ones: the pages are touched, so they count in RSS
    return int(t.numel())


def test_peak_memory_sees_a_temporary_allocation():
    before_result, before_peak = peak_memory(lambda: _allocate(1))
    result, peak = peak_memory(lambda: _allocate(128))
    assert before_result == 2**18 and result == 2**25  # fn's result comes back
    assert peak - before_peak > 120 * 2**20
    # The high-water mark is reset per call: a small call after a big one reads small again.
    _, after_peak = peak_memory(lambda: _allocate(1))
    assert after_peak < peak - 100 * 2**20


def test_peak_rss_sampled_fallback_sees_an_allocation(monkeypatch):
    import time

    def hold():
        t = torch.ones(128 * 2**18)
        time.sleep(0.05)  # the sampler runs every millisecond
        return t.numel()

    monkeypatch.setattr(measure, "_reset_vm_hwm", lambda: False)  # as where /proc/self/clear_refs is missing
    _, small = peak_memory(lambda: _allocate(1))
    result, peak = peak_memory(hold)
    assert result == 128 * 2**18
    assert peak - small > 120 * 2**20


# Run in a fresh interpreter with mmap off, so every tensor comes from glibc's heap: a freed 256 MiB tensor
# below a live one stays resident, and a new 128 MiB tensor reuses its pages. This is what made CI's
# long-lived test process read a 0-byte peak for a 128 MiB tensor.
_RESIDENT_FREED_HEAP = """
import psutil, torch
from qatune.measure import peak_memory
rss = psutil.Process().memory_info().rss
freed = torch.ones(256 * 2**18)
pin = torch.ones(2**20)  # allocated above `freed`, so freeing `freed` cannot shrink the heap
del freed
resident = psutil.Process().memory_info().rss - rss
_, small = peak_memory(lambda: torch.ones(2**18).numel())
_, big = peak_memory(lambda: torch.ones(128 * 2**18).numel())
print(resident, big - small)
"""


def test_peak_memory_counts_pages_a_freed_tensor_left_resident():
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _RESIDENT_FREED_HEAP], env=env, capture_output=True, text=True, check=True
    ).stdout
    resident, seen = (int(x) for x in out.split())
    assert resident > 250 * 2**20  # the trap is set: the freed tensor's pages are still counted in RSS
    assert seen > 120 * 2**20  # and the new 128 MiB tensor still shows in the peak


# transformers 5.24 renamed `past_key_values` to `cache` and drops the old name in 5.40: fail on the warning now.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_throughput_returns_positive_speeds_and_run_count(tiny_tokenizer):
    model = make_tiny_llama()
    speed = throughput(model, tiny_tokenizer, prompt_len=16, decode_tokens=4, runs=5, warmup=1)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert math.isfinite(speed[key]) and speed[key] > 0
    assert len(speed["prefill_s"]) == len(speed["decode_s"]) == speed["runs"] == 5
    assert speed["threads"] == torch.get_num_threads()
    assert speed["device"] == "cpu"
    assert not model.training

    by_vocab = throughput(ptq_8da4w(make_tiny_llama()), 512, prompt_len=8, decode_tokens=2, runs=3, warmup=0)
    assert len(by_vocab["decode_s"]) == 3 and by_vocab["decode_tokens_per_s"] > 0


def test_throughput_rejects_bad_arguments():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="runs"):
        throughput(model, 512, runs=0)
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        throughput(model, 512, prompt_len=500, decode_tokens=32)
    with pytest.raises(ValueError, match="vocab size"):
        throughput(model, 0)


def test_measure_model_has_the_report_keys(tiny_tokenizer):
    model = ptq_8da4w(make_tiny_llama())
    m = measure_model(model, tiny_tokenizer, prompt_len=16, decode_tokens=4, runs=5, warmup=1)
    assert {"size_bytes", "linear_bits_per_weight", "peak_memory_bytes", "prefill_tokens_per_s",
            "decode_tokens_per_s", "threads", "device"} <= set(m)  # fmt: skip
    assert m["size_bytes"] == model_size(model)["total_bytes"]
    assert m["linear_bits_per_weight"] == 5.0
    assert m["peak_memory_bytes"] >= m["size_bytes"]  # the whole process, weights included
    assert m["prefill_tokens_per_s"] > 0 and m["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_smollm2_size_fp32_and_8da4w(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from qatune.quantization import quantize_ptq_, resolve_quantizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    c = model.config
    assert parameter_count(c, tied=True) == 134_515_008  # SmolLM2-135M, embeddings tied
    assert model_size(model)["parameter_bytes"] == 134_515_008 * 4
    quantize_ptq_(model, resolve_quantizer({"scheme": "8da4w", "group_size": 32}))
    size = model_size(model)
    assert size["linear_weights"] == linear_weight_count(c)  # every linear, lm_head included, is int4
    assert size["linear_bits_per_weight"] == 5.0 and size["linear_storage_bits_per_weight"] == 9.25
