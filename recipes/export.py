"""Export an int4 checkpoint to a runtime's format without re-quantizing it.

    tune run export --config export model.path=out/int4 format=gguf        # -> out/model-q4_0.gguf
    tune run export --config export model.path=out/int4 format=executorch  # -> out/model-8da4w.pte
    tune run export --config export model.path=out/int4 format=vllm        # -> out/vllm (compressed-tensors)
    tune run export --config export model.path=HuggingFaceTB/SmolLM2-135M-Instruct quantize=8da4w format=gguf

`model.path` is the int4 directory qat_recipe writes (`output_dir/int4`). A float checkpoint is refused unless
`quantize=` asks for post-training quantization on the fly (which throws away what QAT would have bought).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from qatune.errors import ConfigError
from qatune.export import check_export_formats, export_model, quantized_scheme
from qatune.files import check_output_dir
from qatune.models import ModelConfig, check_model_config, load_model, load_tokenizer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    format: str = "gguf"  # gguf | executorch | vllm | hf
    output_dir: str | None = None  # null: beside the checkpoint (the parent of model.path), else out/export
    embeddings: str = "f16"  # gguf: f16 | q8_0 | f32 for the token embedding (and any float linear)
    max_seq_len: int = 2048  # executorch: KV-cache length, prompt + generated tokens
    vllm_scheme: str = "w4a16"  # vllm: w4a16 | w4a8 (8da4w only: int8 dynamic activations)
    quantize: str | None = None  # PTQ a float checkpoint on the fly: null | 8da4w | 4w
    group_size: int = 32


def check_config(cfg: DictConfig) -> None:
    """Checks that need no weights (the scheme of a saved int4 dir is checked once it loads)."""
    check_model_config(cfg.model)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    if cfg.quantize is not None:
        from qatune.quantization import resolve_quantizer

        resolve_quantizer({"scheme": cfg.quantize, "group_size": cfg.group_size})
    check_export_formats([cfg.format], cfg.embeddings, cfg.quantize, cfg.group_size, cfg.vllm_scheme)


def output_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    local = Path(cfg.model.path).expanduser()
    return local.parent if local.is_dir() else Path("out/export")


def main(cfg: DictConfig) -> Path:
    check_config(cfg)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device="cpu")  # export and lowering run on the CPU
    tokenizer = load_tokenizer(cfg.model.path)
    if quantized_scheme(model):
        if cfg.quantize:
            raise ConfigError(f"{cfg.model.path} is already quantized; drop quantize={cfg.quantize}")
    elif cfg.quantize:
        from qatune.quantization import quantize_ptq_, resolve_quantizer

        quantize_ptq_(model, resolve_quantizer({"scheme": cfg.quantize, "group_size": cfg.group_size}))
    else:
        raise ConfigError(
            f"{cfg.model.path} is a float checkpoint, not an int4 one: run `tune run qat_recipe` first and export "
            "its output_dir/int4, or pass quantize=8da4w to quantize it now (PTQ)"
        )

    path = export_model(
        model, tokenizer, cfg.format, output_dir(cfg),
        embeddings=cfg.embeddings, max_seq_len=cfg.max_seq_len, vllm_scheme=cfg.vllm_scheme,
    )  # fmt: skip
    print(f"wrote {path}")
    return path
