"""Any lm-evaluation-harness task on a qatune checkpoint: float, PTQ'd on the fly, or a saved int4 model.

    pip install 'qatune[lm-eval]'
    tune run eleuther_eval --config eleuther_eval model.path=out/smollm2_135m/int4 tasks=[hellaswag]
    tune run eleuther_eval --config eleuther_eval quantize=rtn include_path=my_tasks/ tasks=[my_wikitext]

The model is loaded by qatune (so torchao int4 checkpoints and PTQ work), wrapped in lm-eval's `HFLM`, and run
through `lm_eval.simple_evaluate`. `include_path` is a folder of task YAMLs (lm-eval's format) whose tasks join the
built-in ones: with `dataset_path: json` and local `data_files` they run offline. Writes `output_dir/results.json`
(lm-eval's results dict, plus what was evaluated under "qatune") and prints lm-eval's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qatune.data import DatasetConfig
from qatune.device import check_device, resolve_device
from qatune.errors import ConfigError, check_at_least
from qatune.files import atomic_write_json, check_output_dir
from qatune.gptq import calibration_from
from qatune.models import ModelConfig, check_model_config, load_model, load_tokenizer
from qatune.quantization import PTQ_QUANTIZER, check_ptq_method, ptq_, resolve_quantizer


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[str] = field(default_factory=lambda: ["wikitext"])  # lm-eval task or group names
    include_path: str | None = None  # folder of extra task YAMLs (local, offline tasks)
    limit: float | None = None  # documents per task: a count, or a fraction when < 1; null = all
    batch_size: int = 1
    max_length: int | None = 2048  # tokens per window; null = lm-eval's rule (the model's context)
    quantize: str | None = None  # PTQ on the fly: null | rtn | gptq, on the quantizer section's grid
    quantizer: dict[str, Any] = field(default_factory=lambda: dict(PTQ_QUANTIZER))  # qat_recipe's section
    calibration_dataset: DatasetConfig = field(default_factory=DatasetConfig)  # GPTQ's calibration text
    device: str = "auto"
    output_dir: str = "out/eleuther_eval"


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked without lm-eval's task index or the weights."""
    check_model_config(cfg.model)
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    check_at_least("batch_size", cfg.batch_size, 1)
    if not cfg.tasks:
        raise ConfigError("tasks is empty; name at least one lm-eval task, e.g. tasks=[wikitext]")
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(f"include_path {cfg.include_path!r} is not a directory of lm-eval task YAMLs")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"limit={cfg.limit} must be positive (a count of documents, or a fraction < 1), or null")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"max_length={cfg.max_length} must be at least 2 tokens, or null")
    check_ptq_method(cfg.quantize)
    resolve_quantizer(cfg.quantizer)


def find_tasks(task_names: list[str], include_path: str | None):
    """lm-eval's TaskManager that knows every name in `task_names` (a ValueError naming the unknown one if not).

    When `include_path` alone provides them all, the built-in tasks are not indexed: that takes ~15 s on a small CPU.
    """
    import difflib

    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(task_names) <= set(local.all_tasks):
            return local
    task_manager = TaskManager(include_path=include_path)
    known = set(task_manager.all_tasks)
    for name in task_names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks`"
            where = f" nor in include_path {include_path!r}" if include_path else ""
            raise ConfigError(f"unknown lm-eval task {name!r}: not a built-in task{where}; {hint}")
    return task_manager


def main(cfg: DictConfig) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.utils import make_table
    except ImportError:
        raise ImportError("the eleuther_eval recipe needs lm-eval: pip install 'qatune[lm-eval]'") from None

    check_config(cfg)
    tasks = list(cfg.tasks)
    task_manager = find_tasks(tasks, cfg.include_path)  # before loading weights: a typo fails in seconds

    device = resolve_device(cfg.device)
    model = load_model(cfg.model.path, dtype=cfg.model.dtype, device=device)
    tokenizer = load_tokenizer(cfg.model.path)
    context = model.config.max_position_embeddings
    if cfg.max_length is not None and cfg.max_length > context:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the model's context of {context} positions")
    if cfg.quantize is not None:
        q = resolve_quantizer(cfg.quantizer)
        ids = calibration_from(cfg.calibration_dataset, tokenizer, q.gptq) if cfg.quantize == "gptq" else None
        ptq_(model, q, cfg.quantize, ids)
    model.eval()

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=cfg.max_length, batch_size=cfg.batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=cfg.limit,
        task_manager=task_manager,
        log_samples=False,  # per-document records are big; the metrics are what we keep
    )
    results["qatune"] = {
        "model": cfg.model.path,
        "dtype": cfg.model.dtype,
        "quantize": cfg.quantize,
        "quantizer": OmegaConf.to_container(cfg.quantizer) if cfg.quantize else None,
        "max_length": lm.max_length,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    print(make_table(results))
    out = Path(cfg.output_dir) / "results.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")
    return results
