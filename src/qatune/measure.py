"""What int4 buys: model size (real storage and ideal packed), peak memory, prefill and decode speed.

Size. torchao's 8da4w weights are `IntxUnpackedToInt8Tensor`s: int4 *values* held in int8 storage, plus a
scale (model dtype) and a zero point (int8) per group. We report both what that really occupies
(`total_bytes`) and what a packed runtime (ExecuTorch, llama.cpp) would hold: 4 bits a weight + scales,
zero points only where they are not all zero (`packed_bytes`). Linear layers alone give the bits per
weight: int4 g32 with bf16 scales = 4 + 16/32 = 4.5 packed, 8 + 16/32 + 8/32 = 8.75 stored.

Peak memory. CUDA: `reset_peak_memory_stats` + `max_memory_allocated`. CPU: the process's peak RSS during
the call. Linux lets a process reset its own RSS high-water mark (`echo 5 > /proc/self/clear_refs`, read
back as VmHWM in /proc/self/status), which is exact and costs nothing; `ru_maxrss` cannot be reset, so
elsewhere we fall back to sampling RSS with psutil in a thread every millisecond (may miss short spikes).
Before either, freed heap pages go back to the OS (`qatune.device.release_free_heap`): otherwise a new
tensor can land on pages a freed one left resident, and the peak never moves.
Either way it is the whole process: weights, activations, and anything else alive in it. Compare models
by peak memory only when each is measured in its own fresh process (benchmarks/memory_throughput.py).

Speed. Batch 1. Prefill = one forward over `prompt_len` tokens; decode = `decode_tokens` greedy steps of
one token each with Hugging Face's KV cache. Warm-up runs excluded, median of the timed runs. CUDA is timed
with events after a synchronize, the CPU with `time.perf_counter`.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qatune.device import release_free_heap
from qatune.errors import ConfigError, check_at_least

# ---------------------------------------------------------------------------------------------- size


def _bits(dtype: torch.dtype) -> int:
    if dtype.is_floating_point:
        return torch.finfo(dtype).bits
    match = re.search(r"(\d+)$", str(dtype))  # torch.int4, torch.uint4, torch.int8, torch.int32 ...
    if match:
        return int(match.group(1))
    return torch.empty(0, dtype=dtype).element_size() * 8  # torch.bool


def _inner_tensors(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The plain tensors a tensor subclass (torchao quantized weights) is made of; {} for a plain tensor."""
    if not hasattr(t, "__tensor_flatten__"):
        return {}
    names, _ = t.__tensor_flatten__()
    return {name: getattr(t, name) for name in names}


def tensor_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(storage bytes, ideal packed bytes) of one tensor; equal except for int-in-wider-storage weights."""
    inner = _inner_tensors(t)
    if not inner:
        n = t.numel() * t.element_size()
        return n, n
    storage = packed = 0
    for sub in inner.values():
        s, p = tensor_bytes(sub)
        storage, packed = storage + s, packed + p
    target = getattr(t, "target_dtype", None)
    qdata = inner.get("qdata")
    if target is not None and qdata is not None and _bits(target) < _bits(qdata.dtype):
        # Sub-byte values stored one per int8: the packed form holds them at their real width.
        packed += qdata.numel() * _bits(target) // 8 - qdata.numel() * qdata.element_size()
        zero_point = inner.get("zero_point")
        if zero_point is not None:
            zp_storage = zero_point.numel() * zero_point.element_size()
            zp_packed = 0 if not torch.any(zero_point) else zero_point.numel() * _bits(target) // 8  # symmetric
            packed += zp_packed - zp_storage
    return storage, packed


def _dir_size(path: Path) -> dict[str, Any]:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return {"kind": "checkpoint", "path": str(path), "total_bytes": sum(files.values()), "files": files}


def model_size(model_or_dir: nn.Module | str | Path) -> dict[str, Any]:
    """Bytes of a saved checkpoint (a dir: all its files; or one file), or of an in-memory model.

    For a model: `total_bytes` (parameters + buffers as stored; tied weights once), `packed_bytes` (int4
    values at 4 bits), and for the linear layers alone `linear_bits_per_weight` (packed) and
    `linear_storage_bits_per_weight` (as stored), over `linear_weights` weights.
    """
    if isinstance(model_or_dir, str | Path):
        path = Path(model_or_dir)
        if path.is_dir():
            return _dir_size(path)
        if path.is_file():
            return {"kind": "checkpoint", "path": str(path), "total_bytes": path.stat().st_size}
        raise FileNotFoundError(f"model_size: {str(path)!r} is neither a checkpoint directory nor a file")
    if not isinstance(model_or_dir, nn.Module):
        raise ValueError(f"model_size takes an nn.Module or a checkpoint path, got {type(model_or_dir).__name__}")
    model = model_or_dir

    param = [tensor_bytes(p) for p in model.parameters()]  # parameters() yields a tied weight once
    buffer = [tensor_bytes(b) for b in model.buffers()]
    linear_storage = linear_packed = linear_weights = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            s, p = tensor_bytes(module.weight)
            linear_storage, linear_packed = linear_storage + s, linear_packed + p
            linear_weights += module.weight.numel()  # the logical shape, also for quantized tensors
    return {
        "kind": "model",
        "total_bytes": sum(s for s, _ in param + buffer),
        "packed_bytes": sum(p for _, p in param + buffer),
        "parameter_bytes": sum(s for s, _ in param),
        "buffer_bytes": sum(s for s, _ in buffer),
        "linear_weights": linear_weights,
        "linear_bytes": linear_storage,
        "linear_packed_bytes": linear_packed,
        "linear_bits_per_weight": linear_packed * 8 / linear_weights if linear_weights else None,
        "linear_storage_bits_per_weight": linear_storage * 8 / linear_weights if linear_weights else None,
    }


# -------------------------------------------------------------------------------------- peak memory

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _vm_hwm() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024


def _reset_vm_hwm() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def current_memory(device: torch.device | str = "cpu") -> int:
    """Bytes in use now: CUDA memory allocated by torch, or this process's RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    import psutil  # an accelerate dependency

    release_free_heap()
    return psutil.Process().memory_info().rss


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start a new peak on `device`: CUDA's peak stats, or this process's RSS high-water mark (Linux), after freed
    heap pages went back to the OS. False where the CPU peak cannot be reset (peak_memory_since_reset is then the
    process's lifetime peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    release_free_heap()
    return _STATUS.exists() and _reset_vm_hwm()


def peak_memory_since_reset(device: torch.device | str = "cpu") -> int:
    """Peak bytes in use since reset_peak_memory(device): CUDA allocated memory, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if _STATUS.exists():
        return _vm_hwm()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory(
    fn: Callable[[], Any], device: torch.device | str = "cpu", interval_s: float = 0.001
) -> tuple[Any, int]:
    """Run `fn()`; return (its result, the peak bytes in use while it ran).

    CUDA: torch's peak allocated memory on `device`. CPU: the process's peak RSS (see the module docstring).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not reset_peak_memory(device):
        return _peak_rss_sampled(fn, interval_s)
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, peak_memory_since_reset(device)


def _peak_rss_sampled(fn: Callable[[], Any], interval_s: float) -> tuple[Any, int]:
    import psutil

    process = psutil.Process()
    peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(interval_s):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak, process.memory_info().rss)


# ---------------------------------------------------------------------------------------- throughput


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def speed_prompt(tokenizer_or_vocab: Any, vocab_size: int, prompt_len: int) -> torch.Tensor:
    """`prompt_len` token ids: real English through the tokenizer, or seeded random ids given a vocab size."""
    if isinstance(tokenizer_or_vocab, int):
        if tokenizer_or_vocab < 1:
            raise ValueError(f"vocab size must be a positive int, got {tokenizer_or_vocab}")
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, min(tokenizer_or_vocab, vocab_size), (1, prompt_len), generator=generator)
    from pydoc_data.topics import topics  # English text shipped with every CPython

    text = topics["for"] + topics["while"] + topics["if"]
    ids = tokenizer_or_vocab(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (prompt_len // len(ids) + 1))[:prompt_len]
    return torch.tensor([ids]).clamp_(max=vocab_size - 1)


class _Timer:
    """Seconds between start() and stop(): CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.t0


@torch.no_grad()
def _one_run(model: nn.Module, prompt: torch.Tensor, decode_tokens: int, timer: _Timer) -> tuple[float, float]:
    timer.start()
    out = model(input_ids=prompt, use_cache=True)
    prefill_s = timer.stop()
    cache, next_id = out.cache, out.logits[:, -1:].argmax(-1)
    timer.start()
    for _ in range(decode_tokens):
        out = model(input_ids=next_id, cache=cache, use_cache=True)
        cache, next_id = out.cache, out.logits[:, -1:].argmax(-1)
    decode_s = timer.stop()
    return prefill_s, decode_s


def check_measure_args(prompt_len: int, decode_tokens: int, runs: int, warmup: int = 1, prefix: str = "") -> None:
    """The speed measurement's rules, checked before anything loads (`prefix`: the keys' section, e.g. "eval.")."""
    for key, value in (("prompt_len", prompt_len), ("decode_tokens", decode_tokens), ("runs", runs)):
        check_at_least(prefix + key, value, 1)
    check_at_least(prefix + "warmup", warmup, 0)


def throughput(
    model: nn.Module,
    tokenizer_or_vocab: Any,
    *,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    runs: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Batch-1 prefill and greedy KV-cache decode speed (tokens/s, median of `runs` after `warmup`)."""
    check_measure_args(prompt_len, decode_tokens, runs, warmup)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and prompt_len + decode_tokens > max_positions:
        raise ConfigError(
            f"prompt_len + decode_tokens = {prompt_len + decode_tokens} exceeds the model's "
            f"max_position_embeddings {max_positions}"
        )
    device = _model_device(model)
    prompt = speed_prompt(tokenizer_or_vocab, model.config.vocab_size, prompt_len).to(device)
    timer = _Timer(device)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _one_run(model, prompt, decode_tokens, timer)
        times = [_one_run(model, prompt, decode_tokens, timer) for _ in range(runs)]
    finally:
        model.train(was_training)
    prefill_s = [p for p, _ in times]
    decode_s = [d for _, d in times]
    return {
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill_s),
        "decode_tokens_per_s": decode_tokens / statistics.median(decode_s),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "runs": runs,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def measure_model(
    model: nn.Module,
    tokenizer_or_vocab: Any,
    *,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    runs: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Size, peak memory (during the speed runs) and prefill/decode speed of one model, flat for the report."""
    size = model_size(model)
    device = _model_device(model)
    before = current_memory(device)
    speed, peak = peak_memory(
        lambda: throughput(
            model, tokenizer_or_vocab, prompt_len=prompt_len, decode_tokens=decode_tokens, runs=runs, warmup=warmup
        ),
        device,
    )
    return {
        "size_bytes": size["total_bytes"],
        "packed_size_bytes": size["packed_bytes"],
        "linear_bits_per_weight": size["linear_bits_per_weight"],
        "linear_storage_bits_per_weight": size["linear_storage_bits_per_weight"],
        "peak_memory_bytes": peak,  # whole process (CPU) / all of torch's CUDA memory: see the module docstring
        "memory_before_bytes": before,
        "prefill_tokens_per_s": speed["prefill_tokens_per_s"],
        "decode_tokens_per_s": speed["decode_tokens_per_s"],
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "runs": runs,
        "threads": speed["threads"],
        "device": speed["device"],
    }
