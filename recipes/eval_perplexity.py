"""Perplexity of one or more models side by side: a float checkpoint, its PTQ on the fly, saved int4 checkpoints.

    tune run eval_perplexity --config eval_perplexity model.path=out/smollm2_135m/int4
    tune run eval_perplexity --config eval_perplexity quantize=gptq quantizer.scheme=4w seq_len=2048 \
        dataset.name=wikitext dataset.config=wikitext-2-raw-v1 dataset.split=test

PTQ on the fly (`quantize: rtn | gptq`) follows the `quantizer:` section, the same keys and the same rule
(qatune.quantization.ptq_) as qat_recipe's PTQ rows: the same model and settings give the same perplexity.

Writes `output_dir/perplexity.json` ({name: {"perplexity": ..., ...}}) and prints one line per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qatune.data import DatasetConfig, check_dataset_config, load_texts
from qatune.device import check_device, resolve_device
from qatune.errors import ConfigError
from qatune.evaluation import check_eval_args, perplexity
from qatune.files import atomic_write_json, check_output_dir
from qatune.gptq import calibration_from
from qatune.models import ModelConfig, check_model_config, check_model_path, load_model, load_tokenizer
from qatune.quantization import PTQ_QUANTIZER, check_ptq_method, ptq_, resolve_quantizer


@dataclass
class ModelEntry:
    name: str = "model"
    path: str = "${model.path}"
    quantize: str | None = None  # PTQ on the fly: null | rtn | gptq, with the config's quantizer section


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantize: str | None = None  # PTQ `model` on the fly: null | rtn | gptq
    quantizer: dict[str, Any] = field(default_factory=lambda: dict(PTQ_QUANTIZER))  # qat_recipe's section
    calibration_dataset: DatasetConfig = field(default_factory=DatasetConfig)  # GPTQ's calibration text
    compare_with: list[ModelEntry] = field(default_factory=list)  # more models, evaluated on the same text
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="validation"))
    seq_len: int = 2048
    protocol: str = "gptq"  # gptq | lm_eval | sliding
    stride: int | None = None  # for protocol=sliding
    batch_size: int = 1
    device: str = "auto"
    output_dir: str = "out/eval_perplexity"


def check_config(cfg: DictConfig) -> None:
    """Checks that need no weights, run by `tune validate` and before `tune run` starts: every model's path (the
    compare_with ones too, so that no evaluation is lost to a typo in the last), the text, the protocol, output_dir."""
    check_model_config(cfg.model)
    check_dataset_config(cfg.dataset)
    check_eval_args(cfg.seq_len, cfg.protocol, cfg.batch_size, cfg.stride)
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    names = [cfg.quantize or "model"]
    for i, entry in enumerate(cfg.compare_with):
        check_model_path(entry.path, f"compare_with[{i}].path")
        if entry.name in names:
            raise ConfigError(f"compare_with[{i}].name {entry.name!r} is taken; give each model its own name")
        names.append(entry.name)
    resolve_quantizer(cfg.quantizer)
    for i, entry in enumerate([cfg, *cfg.compare_with]):
        check_ptq_method(entry.quantize, "quantize" if i == 0 else f"compare_with[{i - 1}].quantize")
    if any(entry.quantize == "gptq" for entry in [cfg, *cfg.compare_with]):
        check_dataset_config(cfg.calibration_dataset, "calibration_dataset")


def main(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    texts = load_texts(cfg.dataset)
    name = cfg.quantize or "model"
    q = resolve_quantizer(cfg.quantizer)
    entries = [dict(name=name, path=cfg.model.path, quantize=cfg.quantize)]
    entries += [dict(e) for e in cfg.compare_with]

    results = {}
    for entry in entries:
        model = load_model(entry["path"], dtype=cfg.model.dtype, device=device)
        tokenizer = load_tokenizer(entry["path"])
        if entry["quantize"]:
            ids = calibration_from(cfg.calibration_dataset, tokenizer, q.gptq) if entry["quantize"] == "gptq" else None
            ptq_(model, q, entry["quantize"], ids)
        result = perplexity(
            model,
            tokenizer,
            texts,
            seq_len=cfg.seq_len,
            protocol=cfg.protocol,
            stride=cfg.stride,
            batch_size=cfg.batch_size,
        )
        results[entry["name"]] = {"path": entry["path"], "quantize": entry["quantize"], **result}
        print(
            f"{entry['name']:<12} ppl {result['perplexity']:9.4f}  tokens {result['tokens']:>8}  "
            f"{result['wall_s']:7.1f} s  {result['tokens_per_s']:8.1f} tok/s"
        )
        del model

    out = Path(cfg.output_dir) / "perplexity.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")
    return results
