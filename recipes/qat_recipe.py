"""Quantization-aware fine-tuning to int4, compared side by side with the float model, RTN and GPTQ.

    tune run qat_recipe --config smollm2_135m                 # any CPU, offline, minutes
    tune run --nproc_per_node 8 qat_recipe --config llama3_8b   # GPUs (one GPU: --config llama3_8b_lora)

Flow (main, at the bottom): setup -> [float fine-tune: the fair baseline, and QAT's start with qat.start=finetuned,
saved as output_dir/bf16_finetuned/model] -> QAT: fake quantization inserted, fine-tuned by every process (from
qat.start, optionally GPTQ-initialised, optionally distilled from a frozen float teacher) -> convert to real int4
-> save output_dir/int4 (Hugging Face + torchao) -> evaluate it beside the float models and their PTQ (RTN, and
GPTQ with compare.gptq) -> the report (report.json/.md/.png) -> optionally export the same int4 codes for llama.cpp
(GGUF), ExecuTorch and vLLM (`export.formats`). With several processes, training ends with the gather of the
weights on the main process; the others exit then and the main process evaluates alone on its device.
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
from qatune.distillation import (
    DistillationConfig,
    distillation_config,
    freeze_teacher,
    self_distillation_loss,
    teacher_distillation_loss,
)
from qatune.errors import ConfigError, check_at_least
from qatune.evaluation import check_eval_args, perplexity, text_windows
from qatune.export import check_export_formats, export_model
from qatune.files import atomic_dir, check_output_dir, check_previous_run, remove_previous_run
from qatune.fsdp import load_sharded
from qatune.gptq import calibration_ids, gptq_
from qatune.lora import LoraConfig, add_lora_, check_lora_config, merge_lora_, save_adapter
from qatune.measure import check_measure_args, measure_model, model_size, speed_prompt
from qatune.models import (
    ModelConfig,
    check_model_config,
    check_model_path,
    load_model,
    load_tokenizer,
    model_dtype,
    resolve_dtype,
    to_dtype_,
)
from qatune.planner import check_plan_fits
from qatune.quantization import (
    QuantScheme,
    check_quantizer_fits,
    convert_to_int4,
    enable_fake_quant,
    fake_quantize_,
    ptq_,
    resolve_quantizer,
    save_quantized,
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
    gptq: bool = False  # GPTQ rows beside the RTN ones (gptq, gptq_finetuned), calibrated as quantizer.gptq says


@dataclass
class QATPhase:
    """Where QAT starts and how long it runs. Null values take the float run's (max_steps, optimizer.lr, warm-up)."""

    start: str = "original"  # original (model.path) | finetuned (the float fine-tune, then QAT) | <checkpoint path>
    init: str = "rtn"  # rtn: fake quant of the float weights as they are | gptq: GPTQ-rounded first (quantizer.gptq)
    max_steps: int | None = None  # QAT's optimizer steps
    lr: float | None = None  # QAT's peak learning rate (a restart: the schedule runs again from its warm-up)
    warmup_steps: int | None = None  # lr_scheduler.num_warmup_steps of QAT's schedule


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
    distillation: DistillationConfig = field(default_factory=DistillationConfig)  # weight 0: off
    qat: QATPhase = field(default_factory=QATPhase)
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
    check_qat_phase(cfg)


def check_qat_phase(cfg: DictConfig) -> None:
    """qat: and distillation: (no weights needed)."""
    p = cfg.qat
    if p.start not in ("original", "finetuned"):
        check_model_path(p.start, "qat.start")
    if p.init not in ("rtn", "gptq"):
        raise ConfigError(f"qat.init={p.init!r}: choose rtn (the float weights as they are) or gptq")
    for key, least in (("max_steps", 1), ("warmup_steps", 0)):
        if p[key] is not None:
            check_at_least(f"qat.{key}", p[key], least)
    if p.lr is not None and not p.lr > 0:
        raise ConfigError(f"qat.lr={p.lr!r}: choose a learning rate > 0 (null: optimizer.lr)")
    if (d := distillation_config(cfg.distillation)) is None:
        return
    if cfg.self_distillation:
        raise ConfigError("distillation and self_distillation both set: choose one teacher (self_distillation=0)")
    if d.teacher not in ("original", "finetuned"):
        check_model_path(d.teacher, "distillation.teacher")


# What defines a training run: resume=true refuses a checkpoint saved with other values of these
# (resume_allow_changes names the ones to change on purpose). max_steps, logging, eval and export may change.
RUN_IDENTITY_KEYS = ("model.path", "model.revision", "quantizer", "lora", "self_distillation", "distillation", "qat",
                     "batch_size",
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
        "distillation": OmegaConf.to_container(cfg.distillation) if run == "qat" else None,
        "qat": OmegaConf.to_container(cfg.qat) if run == "qat" else None,
        "world_size": world_size,
    }
    for key in RUN_IDENTITY_KEYS:
        if key not in values:
            value = OmegaConf.select(cfg, key)
            values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return values


@dataclass
class Run:
    """What every step of the recipe reads: the config, where it runs, the data."""

    cfg: DictConfig
    q: QuantScheme
    device: torch.device
    eval_dtype: torch.dtype  # what every row of the report is evaluated in
    accelerator: Any
    out: Path
    sharded: bool  # FSDP2 on several processes
    tokenizer: Any = None
    train_data: Any = None
    eval_texts: list[str] = field(default_factory=list)
    val_data: Any = None  # validation loss during training (eval_every_n_steps)
    calibration: torch.Tensor | None = None  # GPTQ's calibration ids, built on first use

    @property
    def main_process(self) -> bool:  # evaluates, saves and prints; every process trains
        return self.accelerator.is_main_process


def setup(cfg: DictConfig) -> Run:
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(
        device, cfg.gradient_accumulation_steps, str(out), list(cfg.trackers), strategy=cfg.distributed.strategy,
        mixed_precision=cfg.mixed_precision, timeout_minutes=cfg.distributed.timeout_minutes,
    )  # fmt: skip
    if device.type == "cuda":  # a plan past the GPU's memory is refused before anything loads (tune estimate)
        check_plan_fits(cfg, accelerator.num_processes, torch.cuda.get_device_properties(device).total_memory)
    run = Run(cfg, resolve_quantizer(cfg.quantizer), device, resolve_dtype(cfg.model.dtype, device), accelerator, out,
              uses_fsdp2(cfg.distributed.strategy, accelerator.num_processes))  # fmt: skip
    if cfg.overwrite and run.main_process:
        remove_previous_run(out, RUN_FILES)
    accelerator.wait_for_everyone()
    for name in training_runs(cfg) if cfg.resume else []:  # before anything loads: refuse another run's checkpoint
        if (ckpt := latest_checkpoint(out / name)) is not None:
            check_resume(ckpt, run_identity(cfg, accelerator.num_processes, name), cfg.resume_allow_changes)

    def load_data() -> tuple:
        tokenizer = load_tokenizer(cfg.model.path, revision=cfg.model.revision)
        val = build_dataset(cfg.eval_dataset, tokenizer, cfg.seq_len) if cfg.eval_every_n_steps else None
        return tokenizer, build_dataset(cfg.dataset, tokenizer, cfg.seq_len), load_texts(cfg.eval_dataset), val

    run.tokenizer, run.train_data, run.eval_texts, run.val_data = main_process_first(accelerator, load_data)
    return run


def training_runs(cfg: DictConfig) -> list[str]:
    """bf16_finetuned (the float fine-tune) when the report, QAT's start or the teacher needs it; then qat."""
    d = distillation_config(cfg.distillation)
    teacher = d.teacher if d is not None else None
    float_run = cfg.compare.finetune_baseline or cfg.qat.start == "finetuned" or teacher == "finetuned"
    return ["bf16_finetuned", "qat"] if float_run else ["qat"]


def finetuned_path(run: Run) -> Path:
    return run.out / "bf16_finetuned" / "model"  # the float fine-tune, a Hugging Face checkpoint (fp32)


def model_path(run: Run, which: str) -> str:
    """original | finetuned | a checkpoint path -> the path to load."""
    return {"original": run.cfg.model.path, "finetuned": str(finetuned_path(run))}.get(which, which)


def gptq_calibration(run: Run) -> torch.Tensor:
    """The first quantizer.gptq.samples sequences of the training data, quantizer.gptq.seq_len tokens each."""
    if run.calibration is None:
        data = build_dataset(run.cfg.dataset, run.tokenizer, run.q.gptq.seq_len)
        run.calibration = calibration_ids(data, run.q.gptq.samples)
    return run.calibration


def load_for_training(run: Run, name: str) -> nn.Module:
    """fp32 master weights (LoRA: the frozen base in model.dtype); QAT: from qat.start, fake-quantized."""
    cfg = run.cfg
    where = "cpu" if run.sharded else run.device  # FSDP2: rank 0 reads it into CPU memory and sends the shards
    path = model_path(run, cfg.qat.start if name == "qat" else "original")
    model = load_model(path, dtype=cfg.model.dtype if cfg.lora else "float32", device=where,
                       revision=cfg.model.revision if path == cfg.model.path else None)  # fmt: skip
    if name == "qat":
        if cfg.qat.init == "gptq":  # start QAT from the best PTQ: the weights GPTQ rounded, still float
            gptq_(model, run.q, gptq_calibration(run).to(where))
        fake_quantize_(model, run.q)
    torch.manual_seed(cfg.seed)  # the adapters' initial A: a function of `seed`, not of what ran before
    return add_lora_(model, cfg.lora) if cfg.lora else model  # after fake quant: it quantizes W + s B A


def skeleton(run: Run, config, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same architecture without trained weights (FSDP2 builds it on the meta device)."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if name == "qat":
        fake_quantize_(model, run.q)
    model.tie_weights()  # torchao's swap of a meta-device lm_head unties it from the embeddings
    return model


def load_teacher(run: Run) -> nn.Module | None:
    """The frozen float teacher of `distillation:` in model.dtype on this process's device, or None."""
    if (d := distillation_config(run.cfg.distillation)) is None:
        return None
    path, dtype = model_path(run, d.teacher), run.cfg.model.dtype  # auto: fp32 on CPU, bf16 on CUDA
    if run.sharded:  # FSDP2: sharded like the student, each rank holds its shards only
        build = lambda config: skeleton(run, config, "teacher", run.eval_dtype)  # noqa: E731
        teacher = load_sharded(lambda: load_model(path, dtype=dtype, device="cpu"), build, run.accelerator.device)
        return freeze_teacher(teacher)
    return freeze_teacher(load_model(path, dtype=dtype, device=run.accelerator.device))


def qat_loss(run: Run, teacher: nn.Module | None):
    """The QAT run's loss: KL to the teacher (+ CE), self-distillation, or None for the plain next-token loss."""
    if teacher is not None:
        d = distillation_config(run.cfg.distillation)
        return lambda model, batch: teacher_distillation_loss(model, teacher, batch, d)
    if run.cfg.self_distillation:
        return lambda model, batch: self_distillation_loss(model, batch, run.cfg.self_distillation)
    return None


def schedule(run: Run, name: str) -> tuple[TrainConfig, dict, dict | None]:
    """TrainConfig, optimizer and lr_scheduler sections of a run: QAT's with qat.max_steps, lr and warm-up."""
    cfg = run.cfg
    train_cfg = TrainConfig(**{k: cfg[k] for k in TrainConfig.__dataclass_fields__})
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    scheduler = OmegaConf.to_container(cfg.lr_scheduler, resolve=True) if cfg.lr_scheduler else None
    if name == "qat":
        p = cfg.qat
        train_cfg.max_steps = p.max_steps if p.max_steps is not None else train_cfg.max_steps
        optimizer["lr"] = p.lr if p.lr is not None else optimizer["lr"]
        if scheduler is not None and p.warmup_steps is not None:
            scheduler["num_warmup_steps"] = p.warmup_steps
    return train_cfg, optimizer, scheduler


def fine_tune(run: Run, name: str, on_step=None, loss_fn=None) -> tuple[nn.Module | None, dict]:
    """Train run `name` (bf16_finetuned: float; qat: fake-quantized) on every process; LoRA is merged after."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.sharded:
        model = load_sharded(lambda: load_for_training(run, name), lambda c: skeleton(run, c, name), accelerator.device)
    else:
        model = main_process_first(accelerator, lambda: load_for_training(run, name))  # a download happens once
    config = model.config

    def rebuild(state: dict) -> nn.Module:  # FSDP2 only: the whole model on rank 0 from gathered weights
        fresh = skeleton(run, config, name)
        fresh.load_state_dict(state)
        return fresh.to(run.device)

    train_cfg, optimizer, scheduler = schedule(run, name)
    model, result = train(
        model, run.train_data, cfg=train_cfg, optimizer_cfg=optimizer, scheduler_cfg=scheduler,
        accelerator=accelerator, output_dir=run.out / name, seed=cfg.seed, on_step=on_step, run_name=name,
        rebuild=rebuild, eval_dataset=run.val_data, loss_fn=loss_fn,
        run_identity=run_identity(cfg, accelerator.num_processes, name),
    )  # fmt: skip
    if cfg.lora and model is not None:
        if name == "qat" and run.main_process:  # the float adapters alone, for peft users (one writer under DDP)
            print(f"adapter (peft format): {save_adapter(model, run.out / 'adapter', cfg.lora, cfg.model.path)}")
        merge_lora_(model)  # the weight the fake quantizer saw, written back: convert gives its int4 codes
    return model, {k: v for k, v in vars(result).items() if k != "losses"}


def fine_tune_float(run: Run) -> dict:
    """The float fine-tune (the fair baseline), saved for the rows, QAT's start and the teacher; then freed."""
    model, training = fine_tune(run, "bf16_finetuned")
    if run.main_process:
        with atomic_dir(finetuned_path(run)) as tmp:
            model.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
    del model
    run.accelerator.wait_for_everyone()  # every process may read it next (qat.start, the teacher)
    return training


def fine_tune_qat(run: Run) -> tuple[nn.Module | None, dict]:
    """QAT: fake quantization in every linear not in quantizer.skip, from qat.start, with the configured loss."""
    q = run.q

    def delayed_fake_quant(model: nn.Module, step: int) -> None:
        # Float fine-tuning for the first N steps, fake quant from then on (also right after a resume).
        enable_fake_quant(model, step >= q.fake_quant_after_n_steps)

    teacher = load_teacher(run)
    model, training = fine_tune(run, "qat", delayed_fake_quant if q.fake_quant_after_n_steps else None,
                                qat_loss(run, teacher))  # fmt: skip
    del teacher
    return model, training


def evaluate(run: Run, model: nn.Module) -> dict:
    """Perplexity (and with eval.measure size, memory, speed) of one row, in eval_dtype, on the device."""
    e = run.cfg.eval
    to_dtype_(model, run.eval_dtype).to(run.device)
    result = {"dtype": model_dtype(model)}
    result |= perplexity(
        model, run.tokenizer, run.eval_texts, seq_len=e.seq_len, protocol=e.protocol, batch_size=e.batch_size
    )
    if e.measure:
        speed = dict(prompt_len=e.prompt_len, decode_tokens=e.decode_tokens, runs=e.runs)
        result |= measure_model(model, run.tokenizer, **speed)
    return result


def convert_and_save(run: Run, model: nn.Module) -> nn.Module:
    """Real int4 from the fp32 master weights (the trained codes), in eval_dtype like every other row (scales and
    float parts; bf16 on CUDA), saved as output_dir/int4 before any long evaluation."""
    to_dtype_(convert_to_int4(enable_fake_quant(model, True), run.q), run.eval_dtype)
    save_quantized(model, run.tokenizer, run.out / "int4")
    print(f"int4 checkpoint: {run.out / 'int4'}")
    return model


def baselines(run: Run, finetuned: bool) -> dict:
    """The float models and their PTQ: bf16_finetuned, ptq_finetuned (RTN), gptq_finetuned; bf16, ptq, gptq. Each
    loaded in model.dtype, evaluated, freed: a row's peak memory is its own model's."""
    cfg, results = run.cfg, {}
    methods = ["rtn", "gptq"] if cfg.compare.gptq else ["rtn"]
    names = {"rtn": "ptq", "gptq": "gptq"}
    models = ([("finetuned", "_finetuned")] if finetuned else []) + ([("original", "")] if cfg.compare.baseline else [])
    for which, suffix in models:
        path = model_path(run, which)
        results[f"bf16{suffix}"] = evaluate(run, load_model(path, dtype=cfg.model.dtype, device=run.device))
        for method in methods:
            calibration = gptq_calibration(run) if method == "gptq" else None
            model = load_model(path, dtype=cfg.model.dtype, device=run.device)
            results[f"{names[method]}{suffix}"] = evaluate(run, ptq_(model, run.q, method, calibration))
    return results


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


def export_and_serve(run: Run, model: nn.Module, report: dict) -> None:
    """The same int4 codes for the runtimes asked for (export.formats), and the model as each installed runtime
    serves it (extra rows in the report)."""
    e, exported = run.cfg.export, {}
    for fmt in [f for f in dict.fromkeys(e.formats) if f != "hf"]:
        exported[fmt] = export_model(
            model.cpu(), run.tokenizer, fmt, run.out,
            embeddings=e.embeddings, max_seq_len=e.max_seq_len, vllm_scheme=e.vllm_scheme,
        )  # fmt: skip
        print(f"{fmt}: {exported[fmt]}")
    if run.cfg.eval.measure and (served := served_results(exported, run.tokenizer, run.eval_texts, run.cfg.eval)):
        report["results"] |= served
        write_report(report, run.out)
        print(format_table(report["results"]))


def main(cfg: DictConfig) -> dict:
    start = time.perf_counter()
    run = setup(cfg)
    training = {}
    if "bf16_finetuned" in training_runs(cfg):
        training["bf16_finetuned"] = fine_tune_float(run)
    model, training["qat"] = fine_tune_qat(run)
    report = {
        "model": {"path": cfg.model.path},
        "eval_dtype": str(run.eval_dtype).removeprefix("torch."),  # every row's, QAT's included (`dtype` per row)
        "config": OmegaConf.to_container(cfg, resolve=True),
        "results": {},
        "training": training["qat"],
        "training_runs": training,
    }
    if not run.main_process:
        return report  # this rank's work ended with the gather of the trained weights
    results = report["results"]
    results["qat"] = evaluate(run, convert_and_save(run, model))
    model.cpu()  # waits in CPU memory for the exports
    results |= baselines(run, finetuned="bf16_finetuned" in training and cfg.compare.finetune_baseline)
    report |= {"recovery": recovery(results), "recovery_vs_gptq": recovery(results, "gptq_finetuned"),
               "wall_s": time.perf_counter() - start}  # fmt: skip
    write_report(report, run.out)
    print(format_table(results))
    print(headline(results).replace("**", ""))
    print(f"report: {run.out / 'report.md'}")
    export_and_serve(run, model, report)
    return report
