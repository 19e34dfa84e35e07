"""Int4 checkpoints that runtimes serve, without re-quantizing: one module per runtime behind `export_model`.

  hf          output_dir/int4              transformers + torchao (qatune.quantization.save_quantized)
  gguf        output_dir/model-q4_0.gguf   llama.cpp; Q4_0 blocks hold the int4 codes (qatune.export.gguf)
  executorch  output_dir/model-8da4w.pte   ExecuTorch, XNNPACK (qatune.export.executorch)
  vllm        output_dir/vllm              vLLM; compressed-tensors pack-quantized (qatune.export.vllm)

Each writes the converted model's int4 codes and scales as they are; the only change is rounding the scales to the
runtime's dtype (fp16 in GGUF, bf16 in XNNPACK and vLLM).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from qatune.errors import ConfigError
from qatune.export.executorch import export_executorch, generate_pte
from qatune.export.gguf import FLOAT_TYPES, export_gguf, permute_for_llama_cpp
from qatune.export.vllm import check_vllm_export, check_vllm_scheme, export_vllm
from qatune.quantization import quantized_scheme

EXPORT_FORMATS = ("hf", "gguf", "executorch", "vllm")

__all__ = [
    "EXPORT_FORMATS",
    "check_export_formats",
    "export_executorch",
    "export_gguf",
    "export_model",
    "export_vllm",
    "generate_pte",
    "permute_for_llama_cpp",
    "quantized_scheme",
]


def check_export_formats(
    formats: list[str] | tuple[str, ...],
    embeddings: str = "f16",
    scheme: str | None = None,
    group_size: int | None = None,
    vllm_scheme: str = "w4a16",
) -> None:
    """One-line errors for a bad `format` / `export.formats` / `embeddings` / `vllm_scheme`, and for a quantizer
    (`scheme`, `group_size`, where known) a chosen runtime cannot hold, before any weights are loaded."""
    if embeddings not in FLOAT_TYPES:
        raise ConfigError(f"embeddings={embeddings!r}: choose one of {', '.join(FLOAT_TYPES)}")
    check_vllm_scheme(vllm_scheme)
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"format={fmt!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if "gguf" in formats and scheme is not None and scheme not in ("8da4w", "4w"):
        raise ConfigError(f"format gguf: quantizer scheme {scheme} has no Q4_0 form; use 8da4w or 4w")
    if "vllm" in formats and scheme is not None:
        check_vllm_export(scheme, group_size, vllm_scheme)
    if "executorch" in formats and importlib.util.find_spec("executorch") is None:
        raise ConfigError("export format executorch needs the executorch extra: pip install 'qatune[executorch]'")


def export_model(
    model: nn.Module,
    tokenizer,
    fmt: str,
    output_dir: str | os.PathLike,
    *,
    embeddings: str = "f16",
    max_seq_len: int = 2048,
    vllm_scheme: str = "w4a16",
) -> Path:
    """Write a converted int4 model in one runtime's format into `output_dir`; returns the file or directory.

    hf -> output_dir/int4 (transformers + torchao), gguf -> output_dir/model-q4_0.gguf (llama.cpp),
    executorch -> output_dir/model-<scheme>.pte (XNNPACK), vllm -> output_dir/vllm (compressed-tensors).
    The int4 codes are copied, never re-quantized.
    """
    check_export_formats([fmt], embeddings, vllm_scheme=vllm_scheme)
    out = Path(output_dir)
    if fmt == "gguf":
        return export_gguf(model, tokenizer, out / "model-q4_0.gguf", embeddings=embeddings)
    if fmt == "executorch":
        return export_executorch(model, out / f"model-{quantized_scheme(model)}.pte", max_seq_len=max_seq_len)
    if fmt == "vllm":
        return export_vllm(model, tokenizer, out / "vllm", vllm_scheme=vllm_scheme)
    from qatune.quantization import save_quantized

    save_quantized(model, tokenizer, out / "int4")
    return out / "int4"
