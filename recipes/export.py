"""Export an int4 checkpoint to a runtime's format without re-quantizing it.

    tune run export --config export model.path=out/int4 format=gguf        # -> out/model-q4_0.gguf
    tune run export --config export model.path=out/int4 format=executorch  # -> out/model-8da4w.pte
    tune run export --config export model.path=out/int4 format=vllm        # -> out/vllm (compressed-tensors)
    tune run export --config export model.path=HuggingFaceTB/SmolLM2-135M-Instruct quantize=gptq format=vllm

`model.path` is the int4 directory qat_recipe writes (`output_dir/int4`). A float checkpoint is refused unless
`quantize=rtn | gptq` asks for post-training quantization on the fly (which throws away what QAT would have bought),
on the `quantizer:` section's grid by the same rule as qat_recipe's PTQ rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qatune.data import DatasetConfig, check_dataset_config
from qatune.errors import ConfigError
from qatune.export import check_export_formats, export_model, quantized_scheme
from qatune.files import check_output_dir
from qatune.gptq import calibration_from
from qatune.models import ModelConfig, check_model_config, load_model, load_tokenizer
from qatune.quantization import PTQ_QUANTIZER, check_ptq_method, ptq_, resolve_quantizer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    format: str = "gguf"  # gguf | executorch | vllm | hf
    output_dir: str | None = None  # null: beside the checkpoint (the parent of model.path), else out/export
    embeddings: str = "f16"  # gguf: f16 | q8_0 | f32 for the token embedding (and any float linear)
    max_seq_len: int = 2048  # executorch: KV-cache length, prompt + generated tokens
    vllm_scheme: str = "w4a16"  # vllm: w4a16 | w4a8 (8da4w only: int8 dynamic activations)
    quantize: str | None = None  # PTQ a float checkpoint on the fly: null | rtn | gptq
    quantizer: dict[str, Any] = field(default_factory=lambda: dict(PTQ_QUANTIZER))  # qat_recipe's section
    calibration_dataset: DatasetConfig = field(default_factory=DatasetConfig)  # GPTQ's calibration text


def check_config(cfg: DictConfig) -> None:
    """Checks that need no weights (the scheme of a saved int4 dir is checked once it loads)."""
    check_model_config(cfg.model)
    if cfg.output_dir:
        check_output_dir(cfg.output_dir)
    check_ptq_method(cfg.quantize)
    q = resolve_quantizer(cfg.quantizer)
    if cfg.quantize == "gptq":
        check_dataset_config(cfg.calibration_dataset, "calibration_dataset")
    scheme, group_size = (q.scheme, q.group_size) if cfg.quantize else (None, None)  # a saved dir's: once loaded
    check_export_formats([cfg.format], cfg.embeddings, scheme, group_size, cfg.vllm_scheme)


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
        q = resolve_quantizer(cfg.quantizer)
        ids = calibration_from(cfg.calibration_dataset, tokenizer, q.gptq) if cfg.quantize == "gptq" else None
        ptq_(model, q, cfg.quantize, ids)
    else:
        raise ConfigError(
            f"{cfg.model.path} is a float checkpoint, not an int4 one: run `tune run qat_recipe` first and export "
            "its output_dir/int4, or pass quantize=rtn (or gptq) to quantize it now (PTQ)"
        )

    path = export_model(
        model, tokenizer, cfg.format, output_dir(cfg),
        embeddings=cfg.embeddings, max_seq_len=cfg.max_seq_len, vllm_scheme=cfg.vllm_scheme,
    )  # fmt: skip
    print(f"wrote {path}")
    return path
