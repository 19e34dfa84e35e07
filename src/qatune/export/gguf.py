"""GGUF for llama.cpp: Q4_0 blocks that hold the converted model's int4 codes and scales exactly.

Re-quantizing a QAT model on the way to a runtime throws away the grid it was trained on: llama.cpp's own Q4_0 rule
picks different scales and changes about half of the int4 codes. So `export_gguf` copies torchao's int4 codes and
per-group scales into Q4_0 blocks as they are (nibble = q + 8, fp16 scale; a group of 64..256 becomes 2..8 blocks of 32
sharing its scale), and refuses anything that has no exact Q4_0 form. A quantized token embedding (quantizer.embedding)
goes the same way: int4 as Q4_0, int8 as Q8_0 (fp16 scale + 32 int8 codes per block). When lm_head's int4 table holds
the same codes and scales as the embedding's (a tied model with embedding: int4 at the linears' group size), it is
written once: without `output.weight` llama.cpp multiplies by `token_embd` (one table, half the bytes of two).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qatune.errors import ConfigError
from qatune.files import atomic_file
from qatune.quantization import quantized_scheme, refuse_fake_quantized

logger = logging.getLogger(__name__)

FLOAT_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
Q4_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0][0]  # 32 weights per block (Q8_0's too)
INT_TYPES = {torch.int4: gguf.GGMLQuantizationType.Q4_0, torch.int8: gguf.GGMLQuantizationType.Q8_0}

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. convert_hf_to_gguf.py finds the
# name by hashing the tokens of this text; these are the hashes of the tokenizers qatune's configs use.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def _int_parts(
    weight: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = (torch.int4,)
) -> tuple[torch.Tensor, torch.Tensor, gguf.GGMLQuantizationType] | None:
    """(codes as int8 [n, k], per-group scales [n, k // group], Q4_0 or Q8_0) of a torchao int weight whose dtype is
    in `dtypes`; None for a float one. Raises ConfigError for a quantized weight with no exact GGUF form."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not isinstance(weight, torch.Tensor) or weight.__class__ in (torch.Tensor, nn.Parameter):
        return None
    if not isinstance(weight, IntxUnpackedToInt8Tensor):
        raise ConfigError(
            f"{name}: weight type {type(weight).__name__} has no exact GGUF form; GGUF export takes torchao's "
            "IntxUnpackedToInt8Tensor int4 weights (schemes 8da4w and 4w)"
        )
    if weight.target_dtype not in dtypes:
        raise ConfigError(
            f"{name}: {weight.target_dtype} weights (e.g. 8da8w) are not exported to GGUF Q4_0; use a 4-bit scheme "
            "(8da4w or 4w), or format=executorch / format=hf for 8-bit weights"
        )
    rows, group = weight.block_size
    if weight.qdata.ndim != 2 or rows != 1 or group % Q4_0_BLOCK:
        raise ConfigError(
            f"{name}: block size {tuple(weight.block_size)} does not map onto Q4_0 blocks; use per-group int4 with "
            "group_size 32, 64, 128 or 256"
        )
    if torch.any(weight.zero_point != 0):
        raise ConfigError(
            f"{name}: asymmetric int4 (non-zero zero points) has no exact Q4_0 form; quantize weights symmetrically"
        )
    scale = weight.scale.float()
    if scale.abs().max() > torch.finfo(torch.float16).max:
        raise ConfigError(f"{name}: a group scale exceeds float16's range, so Q4_0 cannot hold it")
    return weight.qdata, scale, INT_TYPES[weight.target_dtype]


def _same_int_table(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two torchao int weights holding the same codes, scales and zero points (a tied embedding and lm_head)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not (isinstance(a, IntxUnpackedToInt8Tensor) and isinstance(b, IntxUnpackedToInt8Tensor)):
        return False
    if a.target_dtype != b.target_dtype or tuple(a.block_size) != tuple(b.block_size):
        return False
    return all(torch.equal(getattr(a, part), getattr(b, part)) for part in ("qdata", "scale", "zero_point"))


def pack(codes: torch.Tensor, scale: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return pack_q4_0(codes, scale) if qtype == gguf.GGMLQuantizationType.Q4_0 else pack_q8_0(codes, scale)


def pack_q8_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks (uint8 [n, k / 32 * 34]) holding int8 `codes` [n, k] and group `scale` [n, k / g] exactly: an fp16
    scale d then 32 int8 codes, decoding to d * q (gguf.quants' layout; its quantizer would pick d = amax / 127)."""
    n, k = codes.shape
    d = scale.repeat_interleave(k // scale.shape[1] // Q4_0_BLOCK, dim=1).numpy().astype(np.float16)  # [n, k / 32]
    q = codes.numpy().astype(np.int8).reshape(n, k // Q4_0_BLOCK, Q4_0_BLOCK)
    return np.concatenate([d.view(np.uint8).reshape(n, -1, 2), q.view(np.uint8)], axis=-1).reshape(n, -1)


def pack_q4_0(codes: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Q4_0 blocks (uint8 [n, k / 32 * 18]) holding int4 `codes` [n, k] in [-8, 7] and group `scale` [n, k / g] exactly.

    A block is an fp16 scale d then 16 bytes; byte j holds element j (low nibble) and element j + 16 (high nibble),
    each as q + 8, and decodes to d * (nibble - 8). gguf.quants has no "pack these codes" entry point (its Q4_0
    quantizer picks its own scales, which is what we must avoid), so the packing is written out here.
    """
    n, k = codes.shape
    blocks_per_group = k // scale.shape[1] // Q4_0_BLOCK
    d = scale.repeat_interleave(blocks_per_group, dim=1).numpy().astype(np.float16)  # [n, k / 32]
    nibbles = (codes.to(torch.int16) + 8).numpy().astype(np.uint8).reshape(n, k // Q4_0_BLOCK, 2, Q4_0_BLOCK // 2)
    packed = nibbles[:, :, 0, :] | (nibbles[:, :, 1, :] << np.uint8(4))  # [n, k / 32, 16]
    return np.concatenate([d.view(np.uint8).reshape(n, -1, 2), packed], axis=-1).reshape(n, -1)


def permute_for_llama_cpp(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k projection output rows from HF's rotate-half RoPE layout to llama.cpp's interleaved pairs.

    The same transform as convert_hf_to_gguf.py's LlamaModel.permute. It moves whole rows, so int4 codes and their
    per-row group scales move together and stay exact.
    """
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _float_tensor(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    return gguf.quants.quantize(t.detach().float().cpu().numpy(), qtype)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`) for a HF BPE tokenizer, as convert_hf_to_gguf finds it."""
    tokens = tokenizer.encode(PRE_TOKENIZER_CHECK_TEXT)
    name = PRE_TOKENIZER_BY_HASH.get(hashlib.sha256(str(tokens).encode()).hexdigest())
    if name is not None:
        return name
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    if type(pre).__name__ == "ByteLevel":  # a bare ByteLevel pre-tokenizer splits with GPT-2's regex
        return "gpt-2"
    raise ConfigError(
        f"unknown pre-tokenizer {type(pre).__name__} for GGUF: known are {sorted(PRE_TOKENIZER_BY_HASH.values())}; "
        "pass pre_tokenizer=<llama.cpp name> to export_gguf"
    )


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre_tokenizer: str | None) -> None:
    """Tokens, token types, merges, special ids and chat template, as convert_hf_to_gguf's `_set_vocab_gpt2`."""
    bpe = getattr(tokenizer, "backend_tokenizer", None) and tokenizer.backend_tokenizer.model
    if type(bpe).__name__ != "BPE" or bpe.byte_fallback:  # byte fallback: SentencePiece-style (Llama 2, Mistral)
        raise ConfigError(
            f"GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3); got {type(tokenizer).__name__} "
            f"with a {type(bpe).__name__} model{' with byte fallback' if getattr(bpe, 'byte_fallback', False) else ''}"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
    by_id = {i: tok for tok, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the tokenizer (padding to a round vocab size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # gguf.SpecialVocab reads merges, special ids and the chat template from the files HF writes.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _add_hparams(writer: gguf.GGUFWriter, config, file_type: int) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_parameters(config).get("rope_theta", 10000.0))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_parameters(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _rope_freqs(config) -> np.ndarray | None:
    """Llama 3.1-style RoPE scaling as llama.cpp wants it: per-frequency divisors in a `rope_freqs` tensor."""
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(f"rope_type {rope_type!r} is not exported to GGUF; supported: default, llama3")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = rope.get("rope_theta", 10000.0)
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.float()).numpy().astype(np.float32)


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    embeddings: str = "f16",
    pre_tokenizer: str | None = None,
    name: str | None = None,
    allow_float: bool = False,
) -> Path:
    """Write a converted (torchao int4) Llama model as a llama.cpp GGUF whose Q4_0 blocks hold its exact int4 codes.

    `embeddings` (f16 | q8_0 | f32) is the type of the float 2D tensors: the token embedding, and the output layer
    or any linear left in float. Norms stay f32 (llama.cpp wants them so). Writes atomically; returns the path.
    `allow_float=True` also writes a float model (2D tensors as `embeddings`): the twin that benchmarks compare with.
    """
    if embeddings not in FLOAT_TYPES:
        raise ConfigError(f"embeddings={embeddings!r}: choose one of {', '.join(FLOAT_TYPES)}")
    config = model.config
    if config.model_type != "llama" or type(model).__name__ != "LlamaForCausalLM":
        raise ConfigError(f"GGUF export supports LlamaForCausalLM models; got {type(model).__name__}")
    refuse_fake_quantized(model)
    float_type = FLOAT_TYPES[embeddings]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name)
    float_file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    is_int4 = quantized_scheme(model) is not None
    what = "int4 codes and scales copied from a torchao (QAT or PTQ) checkpoint" if is_int4 else "a float checkpoint"
    writer.add_description(f"{what}, written by qatune")
    file_type = (
        gguf.LlamaFileType.MOSTLY_Q4_0 if is_int4 else float_file_types.get(embeddings, gguf.LlamaFileType.MOSTLY_Q8_0)
    )
    _add_hparams(writer, config, file_type)
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)

    n_int4 = 0
    state = dict(model.named_parameters(remove_duplicate=False))
    embedding, output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    one_table = embedding is output or _same_int_table(embedding, output)
    embedding_name = next(n for n, t in state.items() if t is embedding)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and one_table:
            continue  # llama.cpp multiplies by token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"no GGUF name for tensor {hf_name!r}")
        dtypes = (torch.int4, torch.int8) if hf_name == embedding_name else (torch.int4,)
        parts = _int_parts(tensor, hf_name, dtypes)
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        n_head = next((h for key, h in heads.items() if f".{key}." in hf_name), None)
        if parts is not None:
            codes, scale, qtype = parts
            if n_head:
                codes, scale = permute_for_llama_cpp(codes, n_head), permute_for_llama_cpp(scale, n_head)
            writer.add_tensor(gguf_name, pack(codes, scale, qtype), raw_dtype=qtype)
            n_int4 += hf_name != embedding_name
            continue
        data = tensor.detach()
        if n_head:
            data = permute_for_llama_cpp(data, n_head)
        qtype = float_type if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            qtype = gguf.GGMLQuantizationType.F16
        writer.add_tensor(gguf_name, _float_tensor(data, qtype), raw_dtype=qtype)
    if n_int4 == 0 and not allow_float:
        raise ConfigError(
            "model has no int4 weights: convert it first (qatune.quantization.convert_to_int4 after QAT, or "
            "quantize_ptq_) so its int4 codes can be copied"
        )
    if (freqs := _rope_freqs(config)) is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)

    path = Path(path)
    # GGUFWriter streams to a path (a 4 GB file should not sit in memory), so it writes a temp name that is renamed.
    with atomic_file(path) as tmp:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("wrote %s (%d int4 linears as Q4_0%s)", path, n_int4, ", one shared output table" if one_table else "")
    return path
