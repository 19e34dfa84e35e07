"""ExecuTorch for phones: the torchao 8da4w model lowered to XNNPACK, whose kernels run the int4 weights and the
int8 dynamic activations natively, with attention and the KV cache on ExecuTorch's own LLM kernels. A quantized
token embedding (quantizer.embedding) becomes ExecuTorch's quantized embedding op (`quantized_decomposed::
embedding_4bit` / `embedding_byte`, from its quant fusion pass), which reads the int codes and scales as they are."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from qatune.errors import ConfigError
from qatune.files import atomic_write_bytes
from qatune.quantization import quantized_scheme, refuse_fake_quantized


def _executorch_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention of an exported program: ExecuTorch's LLM kernels write the new keys/values into this layer's cache in
    place (`llama::update_cache`) and attend over it causally from `start_pos` (`llama::custom_sdpa`, which reads the
    grouped key/value heads as they are). Transformers' own path would build a mask and repeat the key/value heads
    over the whole cache and copy the cache every step, on portable kernels: most of a decode step's time."""
    start_pos = kwargs["position_ids"][0, 0].item()
    torch._check(start_pos >= 0)
    torch._check(start_pos < module.et_k_cache.size(1))
    # [batch, heads, seq, head_dim] -> the kernels' [batch, seq, heads, head_dim]
    torch.ops.llama.update_cache(key.transpose(1, 2), module.et_k_cache, start_pos)
    torch.ops.llama.update_cache(value.transpose(1, 2), module.et_v_cache, start_pos)
    out = torch.ops.llama.custom_sdpa(
        query.transpose(1, 2), module.et_k_cache, module.et_v_cache, start_pos, None, 0.0, True, scaling
    )
    return out, None


class _ExecuTorchDecoder(nn.Module):
    """forward(input_ids [1, n], cache_position [n]) -> logits [1, n, vocab]; the KV cache lives in buffers
    `et_k_cache` / `et_v_cache` [1, max_seq_len, kv_heads, head_dim] of every attention module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=cache_position.unsqueeze(0), use_cache=False).logits


def export_executorch(
    model: nn.Module, path: str | os.PathLike, *, max_seq_len: int = 2048, allow_float: bool = False
) -> Path:
    """Lower a torchao 8da4w model with a static KV cache to an XNNPACK ExecuTorch program (`.pte`).

    The program's `forward(input_ids [1, n], cache_position [n]) -> logits [1, n, vocab]` takes the prompt in one
    call (n up to max_seq_len - 1) and then one token at a time; `generate_pte` runs it. Linear layers run in XNNPACK,
    attention and the cache update in ExecuTorch's LLM kernels (`llama::custom_sdpa`, `llama::update_cache`), as its
    own Llama export does: a runtime must link those kernels (ExecuTorch's LLM runner does; from Python, import
    `executorch.extension.llm.custom_ops.custom_ops` first, as `generate_pte` does). Needs the `executorch` extra.
    XNNPACK keeps group scales in bf16: the program matches torchao eager exactly only when the scales are
    bf16-representable (else ~1-2% logit drift). Lowering SmolLM2-135M takes ~6.5 min on 2 CPU cores.
    `allow_float=True` also lowers a float model (XNNPACK fp32): the twin that benchmarks compare with.
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers the llama:: kernels)
    except ImportError:
        raise ImportError("ExecuTorch export needs the executorch extra: pip install 'qatune[executorch]'") from None
    from transformers import AttentionInterface

    refuse_fake_quantized(model)
    if quantized_scheme(model) is None and not allow_float:
        raise ConfigError("model has no quantized weights: convert it (convert_to_int4) or quantize_ptq_ it first")
    config = model.config
    if max_seq_len < 2 or max_seq_len > config.max_position_embeddings:
        raise ConfigError(f"max_seq_len={max_seq_len}: choose 2..{config.max_position_embeddings}")
    if (window := getattr(config, "sliding_window", None)) and window < max_seq_len:
        raise ConfigError(f"sliding_window={window}: the .pte attends to its whole cache; use max_seq_len<={window}")
    model.eval().requires_grad_(False)  # loaded int4 weights may say requires_grad; export cannot unwrap those
    AttentionInterface.register("qatune_executorch", _executorch_attention)
    attention_before = config._attn_implementation
    # padding_idx only shapes gradients, but it is an argument of aten.embedding that ExecuTorch's quantized-embedding
    # fusion pattern does not have: without it the lookup becomes quantized_decomposed::embedding_{4bit,byte}.
    embedding = model.get_input_embeddings()
    padding_before, embedding.padding_idx = embedding.padding_idx, None
    attentions = [layer.self_attn for layer in model.model.layers]
    dtype = embedding.weight.dtype
    for attn in attentions:
        shape = (1, max_seq_len, config.num_key_value_heads, attn.head_dim)
        attn.register_buffer("et_k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        attn.register_buffer("et_v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
    seq_len = torch.export.Dim("seq_len", min=1, max=max_seq_len - 1)
    try:
        model.set_attn_implementation("qatune_executorch")
        with torch.no_grad():
            # strict=True: a non-strict graph fails in XNNPACK lowering ("expected compiled_fn to be GraphModule")
            exported = torch.export.export(
                _ExecuTorchDecoder(model),
                (torch.zeros(1, 2, dtype=torch.long), torch.arange(2)),
                dynamic_shapes={"input_ids": {1: seq_len}, "cache_position": {0: seq_len}},
                strict=True,
            )
    finally:  # the caller's model is left as it was
        model.set_attn_implementation(attention_before)
        embedding.padding_idx = padding_before
        for attn in attentions:
            del attn.et_k_cache, attn.et_v_cache
    # RMSNorm's mean stays on a portable kernel, which the IR validity check would reject.
    edge = to_edge_transform_and_lower(
        exported, partitioner=[XnnpackPartitioner()], compile_config=EdgeCompileConfig(_check_ir_validity=False)
    )
    # Quant fusion: torchao's dequantize_affine + embedding becomes quantized_decomposed::embedding_{4bit,byte}.
    program = edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True))
    return atomic_write_bytes(path, program.buffer)


def load_pte(path: str | os.PathLike):
    """The `.pte`'s forward method in ExecuTorch's Python runtime, with the kernels qatune's programs call."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama:: attention and cache kernels)
    from executorch.kernels import quantized  # noqa: F401  (quantized_decomposed:: embedding kernels)
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path)).load_method("forward")


def generate_pte(path: str | os.PathLike, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with an exported `.pte`: one prefill call, then one call per new token (its KV cache)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ExecuTorch program at {str(path)!r}")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: give at least one token id")
    forward = load_pte(path)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    logits = forward.execute([ids, torch.arange(len(prompt_ids))])[0]
    out = []
    for step in range(max_new_tokens):
        out.append(int(logits[0, -1].argmax()))
        if step + 1 < max_new_tokens:
            pos = len(prompt_ids) + step
            logits = forward.execute([torch.tensor([[out[-1]]]), torch.tensor([pos])])[0]
    return out
