"""Quantization-aware fine-tuning to int4, compared side by side with the float model and plain PTQ.

    tune run qat_recipe --config smollm2_135m                 # any CPU, offline, minutes
    tune run --nproc_per_node 8 qat_recipe --config llama3_8b   # GPUs (one GPU: --config llama3_8b_lora)

Flow: load (fp32 master weights) -> insert fake quantization -> fine-tune (every process) -> convert to real int4
-> save `output_dir/int4` (a Hugging Face + torchao checkpoint) -> evaluate it beside the float baseline and its
plain PTQ -> the report (report.json/.md/.png) -> optionally export the same int4 codes for llama.cpp (GGUF),
ExecuTorch and vLLM (`export.formats`). With `compare.finetune_baseline=true` the same fine-tuning also runs
without fake quantization and is then PTQ'd: the fair comparison (what QAT buys over "fine-tune, then quantize").
With several processes, training ends with the gather of the weights on the main process; the others exit then
and the main process evaluates alone on its device (nobody waits at a barrier through hours of evaluation).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM

from qatune.data import DatasetConfig, build_dataset, check_dataset_config, load_texts
from qatune.device import check_device, resolve_device
from qatune.errors import ConfigError, check_at_least
from qatune.evaluation import check_eval_args, perplexity, text_windows
from qatune.export import check_export_formats, export_model
from qatune.files import check_output_dir, check_previous_run, remove_previous_run
from qatune.fsdp import load_sharded
from qatune.lora import LoraConfig, add_lora_, check_lora_config, merge_lora_, save_adapter
from qatune.measure import check_measure_args, measure_model, model_size, speed_prompt
from qatune.models import (
    ModelConfig,
    check_model_config,
    load_model,
    load_tokenizer,
    model_dtype,
    resolve_dtype,
    to_dtype_,
)
from qatune.planner import check_plan_fits
from qatune.quantization import (
    check_quantizer_fits,
    convert_to_int4,
    enable_fake_quant,
    fake_quantize_,
    quantize_ptq_,
    resolve_quantizer,
    save_quantized,
    self_distillation_loss,
)
from qatune.report import format_table, headline, recovery, write_report
from qatune.runtimes import RUNTIME_MODULES, measure_runtime, runtime_installed
from qatune.training import (
    DistributedConfig,
    TrainConfig,
    check_distributed_config,
    check_resume,
    check_train_config,
    latest_checkpoint,
    main_process_first,
    make_accelerator,
    train,
    uses_fsdp2,
)
from qatune.vllm_server import find_vllm, measure_served


@dataclass
class EvalConfig:
    seq_len: int = 512
    protocol: str = "gptq"  # gptq | lm_eval | sliding (see qatune.evaluation)
    batch_size: int = 4
    measure: bool = True  # size, peak memory, prefill/decode tokens/s of each model (batch 1, median of runs)
    prompt_len: int = 128
    decode_tokens: int = 32
    runs: int = 5


@dataclass
class CompareConfig:
    baseline: bool = True  # evaluate the original float model and its PTQ
    finetune_baseline: bool = False  # also fine-tune without fake quant, then PTQ it (the fair comparison)


@dataclass
class ExportConfig:
    formats: list[str] = field(default_factory=lambda: ["hf"])  # hf (int4/, always) | gguf | executorch | vllm
    embeddings: str = "f16"  # gguf: f16 | q8_0 | f32 for the token embedding and any linear kept float
    max_seq_len: int = 2048  # executorch: KV-cache length
    vllm_scheme: str = "w4a16"  # vllm: w4a16 | w4a8 (8da4w only: int8 dynamic activations)


# What a run writes into output_dir: a second run there is refused unless overwrite=true (which removes these first)
# or resume=true (which continues the checkpoints under qat/ and bf16_finetuned/).
RUN_FILES = ("int4", "report.json", "report.md", "report.png", "vllm", "model-*.gguf", "model-*.pte", "qat",
             "bf16_finetuned", "adapter")  # fmt: skip


@dataclass
class Config(TrainConfig):
    output_dir: str = "out/qat"
    overwrite: bool = False  # replace a previous run's int4/, report and exports in output_dir (else refused)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    eval_dataset: DatasetConfig = field(default_factory=lambda: DatasetConfig(split="validation"))
    seq_len: int = 512
    optimizer: dict[str, Any] = field(default_factory=lambda: {"_component_": "torch.optim.AdamW", "lr": 2e-5})
    lr_scheduler: dict[str, Any] | None = None  # e.g. transformers.get_cosine_schedule_with_warmup
    quantizer: dict[str, Any] = field(default_factory=lambda: {"scheme": "8da4w", "group_size": 32})
    self_distillation: float = 0.0  # QAT loss = (1-w) CE + w KL(float || fake-quantized), same weights; 0 = off
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lora: LoraConfig | None = None  # adapters inside the fake-quantized weight (qatune.lora); null = full QAT
    export: ExportConfig = field(default_factory=ExportConfig)


def check_config(cfg: DictConfig) -> None:
    """Checks that need no weights, run by `tune validate` and before `tune run` starts."""
    check_train_config(cfg, cfg.optimizer)
    check_at_least("seq_len", cfg.seq_len, 2)
    check_distributed_config(cfg.distributed)
    check_device(cfg.device)
    check_output_dir(cfg.output_dir)
    check_previous_run(cfg.output_dir, RUN_FILES, overwrite=cfg.overwrite, resume=cfg.resume)
    if unknown := sorted(set(cfg.resume_allow_changes) - set(RUN_IDENTITY_KEYS)):
        raise ConfigError(f"resume_allow_changes: {', '.join(unknown)} not among {', '.join(RUN_IDENTITY_KEYS)}")
    q = resolve_quantizer(cfg.quantizer)
    check_model_config(cfg.model)
    check_dataset_config(cfg.dataset)
    check_quantizer_fits(q, cfg.model.path)
    check_lora_config(cfg.lora, cfg.model.path)
    if cfg.lora is not None and cfg.distributed.strategy == "fsdp2":
        raise ConfigError("lora with distributed.strategy=fsdp2: not supported; the frozen base is held once per GPU, "
                          "use distributed.strategy=ddp")  # fmt: skip
    check_dataset_config(cfg.eval_dataset, "eval_dataset")
    e = cfg.eval
    check_eval_args(e.seq_len, e.protocol, e.batch_size, prefix="eval.")
    if e.measure:
        check_measure_args(e.prompt_len, e.decode_tokens, e.runs, prefix="eval.")
    e = cfg.export
    check_export_formats(list(e.formats), e.embeddings, q.scheme, q.group_size, e.vllm_scheme)
    if not 0 <= cfg.self_distillation <= 1:
        raise ConfigError(f"self_distillation={cfg.self_distillation}: choose a weight in [0, 1] (0 = off)")


# What defines a training run: resume=true refuses a checkpoint saved with other values of these
# (resume_allow_changes names the ones to change on purpose). max_steps, logging, eval and export may change.
RUN_IDENTITY_KEYS = ("model.path", "model.revision", "quantizer", "lora", "self_distillation", "batch_size",
                     "gradient_accumulation_steps", "world_size", "distributed.strategy", "seq_len", "dataset",
                     "seed", "optimizer", "lr_scheduler", "clip_grad_norm", "epochs")  # fmt: skip


def run_identity(cfg: DictConfig, world_size: int, run: str) -> dict[str, Any]:
    """RUN_IDENTITY_KEYS' values for `run` (qat or bf16_finetuned, which has no quantizer)."""
    path = Path(cfg.model.path).expanduser()
    values = {
        "model.path": str(path.resolve()) if path.is_dir() else cfg.model.path,  # a hub id stays an id
        "model.revision": cfg.model.revision,
        "quantizer": OmegaConf.to_container(cfg.quantizer, resolve=True) if run == "qat" else None,
        "self_distillation": cfg.self_distillation if run == "qat" else 0.0,
        "world_size": world_size,
    }
    for key in RUN_IDENTITY_KEYS:
        if key not in values:
            value = OmegaConf.select(cfg, key)
            values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return values


def served_results(exported: dict[str, Path], tokenizer, eval_texts: list[str], e: DictConfig) -> dict:
    """The int4 exports as their runtimes run them, where installed: `qat_vllm` (`vllm serve` on 127.0.0.1, HTTP),
    `qat_llama_cpp` (the GGUF), `qat_executorch` (the .pte). Perplexity on the eval windows from the runtime's own
    logprobs, batch-1 speed; eager torchao's speed (the `qat` row) is not what a runtime serves."""
    windows = text_windows(tokenizer, eval_texts, e.seq_len, e.protocol)
    prompt = speed_prompt(tokenizer, len(tokenizer), e.prompt_len)[0].tolist()
    results, speed = {}, dict(decode_tokens=e.decode_tokens, runs=e.runs)
    for fmt, path in exported.items():
        vllm = fmt == "vllm" and find_vllm() is not None
        if not (vllm or runtime_installed(fmt)):
            continue
        name = "qat_vllm" if vllm else f"qat_{RUNTIME_MODULES[fmt]}"
        try:
            if vllm:
                results[name] = measure_served(path, windows, prompt, **speed)
            else:
                results[name] = measure_runtime(fmt, path, windows, prompt, threads=torch.get_num_threads(), **speed)
            results[name]["size_bytes"] = model_size(path)["total_bytes"]  # the file (or directory) it serves
        except (OSError, RuntimeError, TimeoutError) as err:  # the files are written; say why this row is missing
            print(f"warning: {fmt} runtime could not run {path}: {str(err).splitlines()[0]}")
            results[name] = {"runtime": fmt, "error": str(err)[-2000:]}
    return results


def main(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    eval_dtype = resolve_dtype(cfg.model.dtype, device)  # what every row of the report is evaluated in
    q = resolve_quantizer(cfg.quantizer)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(
        device, cfg.gradient_accumulation_steps, str(out), list(cfg.trackers), strategy=cfg.distributed.strategy,
        mixed_precision=cfg.mixed_precision, timeout_minutes=cfg.distributed.timeout_minutes,
    )  # fmt: skip
    if device.type == "cuda":  # a plan past the GPU's memory is refused before anything loads (tune estimate)
        check_plan_fits(cfg, accelerator.num_processes, torch.cuda.get_device_properties(device).total_memory)
    main_process = accelerator.is_main_process  # evaluates, saves and prints; every process trains
    sharded = uses_fsdp2(cfg.distributed.strategy, accelerator.num_processes)
    if cfg.overwrite and main_process:
        remove_previous_run(out, RUN_FILES)
    accelerator.wait_for_everyone()
    runs = ["bf16_finetuned", "qat"] if cfg.compare.finetune_baseline else ["qat"]
    for name in runs if cfg.resume else []:  # before anything loads: a checkpoint of another run is refused now
        if (ckpt := latest_checkpoint(out / name)) is not None:
            check_resume(ckpt, run_identity(cfg, accelerator.num_processes, name), cfg.resume_allow_changes)

    def load_data() -> tuple:
        tokenizer = load_tokenizer(cfg.model.path, revision=cfg.model.revision)
        # Validation loss during training (eval_every_n_steps): the held-out split packed like the training data.
        val_data = build_dataset(cfg.eval_dataset, tokenizer, cfg.seq_len) if cfg.eval_every_n_steps else None
        return tokenizer, build_dataset(cfg.dataset, tokenizer, cfg.seq_len), load_texts(cfg.eval_dataset), val_data

    tokenizer, train_data, eval_texts, val_data = main_process_first(accelerator, load_data)
    train_cfg = TrainConfig(**{k: cfg[k] for k in TrainConfig.__dataclass_fields__})

    def load() -> nn.Module:  # for evaluation, in model.dtype
        return load_model(cfg.model.path, dtype=cfg.model.dtype, device=device, revision=cfg.model.revision)

    def load_for_training(name: str) -> nn.Module:  # fp32 master weights, fake-quantized for QAT
        where = "cpu" if sharded else device  # FSDP2: rank 0 reads it into CPU memory and sends each rank its shards
        dtype = cfg.model.dtype if cfg.lora else "float32"  # LoRA: the frozen base in the model's dtype
        model = load_model(cfg.model.path, dtype=dtype, device=where, revision=cfg.model.revision)
        if name == "qat":
            fake_quantize_(model, q)
        torch.manual_seed(cfg.seed)  # the adapters' initial A: a function of `seed`, not of what ran before
        return add_lora_(model, cfg.lora) if cfg.lora else model  # after fake quant: it quantizes W + s B A

    def skeleton(config, name: str) -> nn.Module:  # the same architecture without trained weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if name == "qat":
            fake_quantize_(model, q)
        model.tie_weights()  # torchao's swap of a meta-device lm_head unties it from the embeddings
        return model

    def evaluate(model: nn.Module) -> dict:  # every row in eval_dtype, on the device
        e = cfg.eval
        to_dtype_(model, eval_dtype).to(device)
        result = {"dtype": model_dtype(model)}
        result |= perplexity(
            model, tokenizer, eval_texts, seq_len=e.seq_len, protocol=e.protocol, batch_size=e.batch_size
        )
        if e.measure:
            speed = dict(prompt_len=e.prompt_len, decode_tokens=e.decode_tokens, runs=e.runs)
            result |= measure_model(model, tokenizer, **speed)
        return result

    def fine_tune(name: str, on_step=None, loss_fn=None) -> tuple[nn.Module | None, dict]:
        if sharded:
            model = load_sharded(lambda: load_for_training(name), lambda c: skeleton(c, name), accelerator.device)
        else:
            model = main_process_first(accelerator, lambda: load_for_training(name))  # a download happens once

        def rebuild(state: dict) -> nn.Module:  # FSDP2 only: the whole model on rank 0 from gathered weights
            fresh = skeleton(config, name)
            fresh.load_state_dict(state)
            return fresh.to(device)

        config = model.config
        model, run = train(
            model, train_data, cfg=train_cfg, optimizer_cfg=cfg.optimizer, scheduler_cfg=cfg.lr_scheduler,
            accelerator=accelerator, output_dir=out / name, seed=cfg.seed, on_step=on_step, run_name=name,
            rebuild=rebuild, eval_dataset=val_data, loss_fn=loss_fn,
            run_identity=run_identity(cfg, accelerator.num_processes, name),
        )  # fmt: skip
        if cfg.lora and model is not None:
            if name == "qat" and main_process:  # the float adapters alone, for peft users (one writer under DDP)
                print(f"adapter (peft format): {save_adapter(model, out / 'adapter', cfg.lora, cfg.model.path)}")
            merge_lora_(model)  # the weight the fake quantizer saw, written back: convert gives its int4 codes
        return model, {k: v for k, v in vars(run).items() if k != "losses"}

    results, training = {}, {}
    start = time.perf_counter()
    # 1. Optional fair baseline: the same fine-tuning without fake quantization (evaluated, then PTQ'd, in 4.).
    finetuned = None
    if cfg.compare.finetune_baseline:
        finetuned, training["bf16_finetuned"] = fine_tune("bf16_finetuned")
        finetuned = finetuned.cpu() if main_process else None  # waits in CPU memory while QAT trains

    # 2. QAT: fake quantization in every linear layer not in quantizer.skip, fine-tuned by every process.
    def delayed_fake_quant(model: nn.Module, step: int) -> None:
        # Float fine-tuning for the first N steps, fake quant from then on (also right after a resume).
        enable_fake_quant(model, step >= q.fake_quant_after_n_steps)

    def distilled(model: nn.Module, batch: dict) -> torch.Tensor:
        return self_distillation_loss(model, batch, cfg.self_distillation)

    model, training["qat"] = fine_tune(
        "qat", delayed_fake_quant if q.fake_quant_after_n_steps else None, distilled if cfg.self_distillation else None
    )  # fmt: skip
    report = {
        "model": {"path": cfg.model.path},
        "eval_dtype": str(eval_dtype).removeprefix("torch."),  # every row's, QAT's included (`dtype` in each row)
        "config": OmegaConf.to_container(cfg, resolve=True),
        "results": results,
        "training": training["qat"],
        "training_runs": training,
    }
    if not main_process:
        return report  # this rank's work ended with the gather of the trained weights

    # 3. Convert to real int4 (from the fp32 master weights: the trained codes), in eval_dtype like every other row
    # (scales and float parts; bf16 on CUDA), and save the checkpoint before any long evaluation, then evaluate it.
    to_dtype_(convert_to_int4(enable_fake_quant(model, True), q), eval_dtype)
    save_quantized(model, tokenizer, out / "int4")
    print(f"int4 checkpoint: {out / 'int4'}")
    results["qat"] = evaluate(model)
    model.cpu()  # waits in CPU memory for the exports: each baseline row's peak is its own model's (they are freed)
    # 4. The baselines: the fine-tuned float model and its PTQ; the original model and its PTQ.
    if finetuned is not None:
        results["bf16_finetuned"] = evaluate(finetuned)
        results["ptq_finetuned"] = evaluate(quantize_ptq_(finetuned, q))
        del finetuned
    if cfg.compare.baseline:
        original = load()
        results["bf16"] = evaluate(original)
        results["ptq"] = evaluate(quantize_ptq_(original, q))
        del original
    report |= {"recovery": recovery(results), "wall_s": time.perf_counter() - start}
    write_report(report, out)
    print(format_table(results))
    print(headline(results).replace("**", ""))
    print(f"report: {out / 'report.md'}")
    # 5. The same int4 codes for the runtimes asked for, and the model as each installed runtime serves it.
    e, exported = cfg.export, {}
    for fmt in [f for f in dict.fromkeys(e.formats) if f != "hf"]:
        exported[fmt] = export_model(
            model.cpu(), tokenizer, fmt, out,
            embeddings=e.embeddings, max_seq_len=e.max_seq_len, vllm_scheme=e.vllm_scheme,
        )  # fmt: skip
        print(f"{fmt}: {exported[fmt]}")
    if cfg.eval.measure and (served := served_results(exported, tokenizer, eval_texts, cfg.eval)):
        results |= served
        write_report(report, out)
        print(format_table(results))
    return report
