"""Quantization sensitivity: which layers int4 hurts, their weight/activation statistics, and a skip list to keep.

    tune run sensitivity --config sensitivity model.path=HuggingFaceTB/SmolLM2-135M-Instruct
    tune run sensitivity --config sensitivity granularity=layer budget.max_mb=20 output_dir=out/sens_layers

Writes `output_dir/sensitivity.json` and `sensitivity.md` (ranking, reverse check, layer statistics, the suggested
`quantizer.skip` with its perplexity/size trade-off), `sensitivity.png` and histograms of the worst layers in
`output_dir/histograms/` (charts need matplotlib, the `plot` extra). See docs/sensitivity.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from qatune.data import DatasetConfig, check_dataset_config, load_texts
from qatune.device import check_device, resolve_device
from qatune.errors import ConfigError, check_at_least
from qatune.files import check_output_dir
from qatune.models import ModelConfig, check_model_config, load_model, load_tokenizer
from qatune.quantization import check_quantizer_fits, resolve_quantizer
from qatune.sensitivity import GRANULARITIES, analyze, validation_text, write_sensitivity


@dataclass
class BudgetConfig:
    max_layers: int | None = 3  # units (blocks or layers, per granularity) kept in bf16
    max_mb: float | None = None  # MB (1e6 bytes) of bf16 weights kept; a tied lm_head costs 0 (it is the embedding)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="validation"))
    max_tokens: int | None = 2048  # cut the validation text to this many tokens (null: all of it)
    seq_len: int = 256
    batch_size: int = 8
    quantizer: dict[str, Any] = field(default_factory=lambda: {"scheme": "8da4w", "group_size": 32})
    granularity: str = "block"  # block | layer
    reverse_top_k: int = 3  # everything quantized except one unit, for the top k (and the bottom one)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    calibration_batches: int = 1  # batches of the float evaluation whose linear inputs are summarised
    histograms_top_k: int = 4
    output_dir: str = "out/sensitivity"
    device: str = "auto"


def check_config(cfg: DictConfig) -> None:
    """Checks that need no weights, run by `tune validate` and before `tune run` starts."""
    check_model_config(cfg.model)
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    check_quantizer_fits(resolve_quantizer(cfg.quantizer), cfg.model.path)
    check_dataset_config(cfg.dataset)
    if cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"granularity {cfg.granularity!r} is not one of {', '.join(GRANULARITIES)}")
    for key in ("seq_len", "batch_size", "calibration_batches"):
        check_at_least(key, cfg[key], 1)
    for key in ("reverse_top_k", "histograms_top_k"):
        check_at_least(key, cfg[key], 0)
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.seq_len:
        raise ConfigError(f"max_tokens={cfg.max_tokens} is less than one window of seq_len={cfg.seq_len}")
    b = cfg.budget
    if b.max_layers is None and b.max_mb is None:
        raise ConfigError("budget: set max_layers (units kept in bf16) and/or max_mb (MB of bf16 weights)")
    if (b.max_layers is not None and b.max_layers < 1) or (b.max_mb is not None and b.max_mb <= 0):
        raise ConfigError(f"budget max_layers={b.max_layers}, max_mb={b.max_mb}: use a positive number or null")


def main(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    q = resolve_quantizer(cfg.quantizer)
    tokenizer = load_tokenizer(cfg.model.path, revision=cfg.model.revision)
    text = validation_text(tokenizer, load_texts(cfg.dataset), cfg.max_tokens)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=device, revision=cfg.model.revision)
    report, samples = analyze(
        model, tokenizer, text, q, granularity=cfg.granularity, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
        reverse_top_k=cfg.reverse_top_k, max_layers=cfg.budget.max_layers, max_mb=cfg.budget.max_mb,
        calibration_batches=cfg.calibration_batches,
    )  # fmt: skip
    report = {"model": cfg.model.path, "device": str(device), "threads": torch.get_num_threads(), **report,
              "config": OmegaConf.to_container(cfg, resolve=True)}  # fmt: skip
    paths = write_sensitivity(report, cfg.output_dir, model, samples, cfg.histograms_top_k)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    top, bottom = report["units"][0], report["units"][-1]
    print(f"most sensitive: {top['name']} ({top['delta_ppl']:+.4f} ppl); least: {bottom['name']} "
          f"({bottom['delta_ppl']:+.4f}); suggested quantizer.skip: {report['suggestion']['skip']}")  # fmt: skip
    return report
