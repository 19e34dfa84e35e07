"""Fine-tuning through accelerate: the same loop for one process or many (DDP or FSDP2), CPU or GPU.

`train()` runs optimizer steps over a packed dataset with gradient accumulation, clipping, a warm-up schedule,
delayed fake quantization, periodic validation loss, atomic checkpoints and exact resume. Everything it needs comes
in as arguments; the recipe decides what to train.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, DataLoaderConfiguration, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qatune import fsdp
from qatune.config import instantiate
from qatune.data import IGNORE_INDEX
from qatune.device import mmap_large_cpu_tensors
from qatune.errors import ConfigError, TrainingError, check_at_least, is_positive_number, on_rank0
from qatune.files import atomic_write_json, atomic_write_text
from qatune.measure import peak_memory_since_reset, reset_peak_memory


@dataclass
class TrainConfig:
    """Schema of the recipe keys that drive the loop (every knob is in the YAML)."""

    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # optimizer steps; None = `epochs` full passes
    epochs: int = 1
    clip_grad_norm: float | None = 1.0
    activation_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, none on CPU) | bf16 | no; weights stay fp32 (master)
    log_every_n_steps: int = 1
    eval_every_n_steps: int = 0  # 0 = never (validation loss)
    eval_batches: int = 4
    save_every_n_steps: int = 0  # 0 = never (checkpoints for resume)
    keep_last_n_checkpoints: int = 1
    resume: bool = False
    resume_allow_changes: list[str] = field(default_factory=list)  # run-defining keys resume may change
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, ...


# (key, smallest accepted value); None values mean "off" where the schema allows None.
_AT_LEAST = (
    ("batch_size", 1), ("gradient_accumulation_steps", 1), ("max_steps", 1), ("epochs", 1),
    ("log_every_n_steps", 1), ("eval_every_n_steps", 0), ("eval_batches", 1), ("save_every_n_steps", 0),
    ("keep_last_n_checkpoints", 1),
)  # fmt: skip


def check_train_config(cfg: Mapping[str, Any], optimizer_cfg: Mapping[str, Any] | None = None) -> None:
    """The training loop's rules, checked before anything loads (`tune validate` and `tune run` alike)."""
    for key, least in _AT_LEAST:
        value = cfg.get(key)
        if value is None and key == "max_steps":
            continue
        check_at_least(key, value, least, " (or null: `epochs` full passes)" if key == "max_steps" else "")
    if cfg.get("mixed_precision", "auto") not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision {cfg.get('mixed_precision')!r} is not one of {', '.join(MIXED_PRECISION)}")
    clip = cfg.get("clip_grad_norm")
    if clip is not None and not is_positive_number(clip):
        raise ConfigError(f"clip_grad_norm={clip!r}: give a positive number, or null for no clipping")
    lr = (optimizer_cfg or {}).get("lr")
    if lr is not None and not is_positive_number(lr):
        raise ConfigError(f"optimizer.lr={lr!r}: give a positive finite learning rate, e.g. 2e-5")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    peak_memory_bytes: int
    final_loss: float
    losses: list[float]
    trainable_params: int = 0  # parameters the optimizer updates (LoRA: the adapters only)


STRATEGIES = ("ddp", "fsdp2")
MIXED_PRECISION = ("auto", "bf16", "no")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # ddp (a full copy per process) | fsdp2 (sharded weights, gradients, optimizer states)
    # How long a rank waits in a collective (NCCL's own default is 10 min, gloo's 30): the others wait while rank 0
    # downloads, tokenizes and reads the checkpoint into CPU memory (an 8B model: 16 GB on one thread).
    timeout_minutes: float = 60.0


def check_distributed_config(cfg: Mapping[str, Any]) -> None:
    check_strategy(cfg.get("strategy"))
    minutes = cfg.get("timeout_minutes")
    if not is_positive_number(minutes):
        raise ConfigError(f"distributed.timeout_minutes={minutes!r}: give a positive number of minutes, e.g. 60")


def uses_fsdp2(strategy: str, num_processes: int) -> bool:
    return strategy == "fsdp2" and num_processes > 1  # one process: nothing to shard


def make_accelerator(
    device: torch.device,
    gradient_accumulation_steps: int,
    output_dir: str,
    trackers: list[str] | None = None,
    strategy: str = "ddp",
    mixed_precision: str = "auto",
    timeout_minutes: float = DistributedConfig.timeout_minutes,
) -> Accelerator:
    """The accelerator of a run: one process or many (torchrun/accelerate launch set the environment).

    Weights, gradients and optimizer states are fp32 (master weights); with mixed_precision bf16 (auto: on CUDA,
    where bf16 is fast; on CPU it is slower than fp32) the forward and backward run under bf16 autocast. Several
    processes: DDP (gloo on CPU, NCCL on GPU), or with strategy fsdp2 the model arrives sharded by qatune.fsdp and
    accelerate shards only the data. `timeout_minutes` is the process group's collective timeout (NCCL and gloo).
    """
    check_strategy(strategy)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if device.type == "cuda" else "no"
    # FSDP2 frees each layer's gathered weights after use; autocast's cache would keep a bf16 copy of every one of
    # them until the forward ends (a whole bf16 model per rank). The fake-quantized linears never hit the cache.
    autocast = AutocastKwargs(cache_enabled=not uses_fsdp2(strategy, int(os.environ.get("WORLD_SIZE", "1"))))
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        # A seedable sampler makes every epoch's shuffle a function of (seed, epoch): resume can replay it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The loop steps the schedule once per optimizer step, whatever the number of processes.
        step_scheduler_with_optimizer=False,
        log_with=trackers or None,
        project_dir=output_dir,
        kwargs_handlers=[autocast, InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))],
    )


def collective_timeout(device: torch.device) -> timedelta | None:
    """The timeout the default process group's backend for `device` really has (None when not distributed)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.group.WORLD._get_backend(device).options._timeout


def main_process_first(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """fn() on the main process, then on the others: downloads and caches are filled once. If it fails on the main
    process the error is raised there and the other ranks stop with one line (`on_rank0`)."""
    result = on_rank0(fn)
    return result if accelerator.is_main_process else fn()


def build_dataloader(dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)


def _checkpoints(output_dir: Path) -> list[Path]:
    ckpts = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(ckpts, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = _checkpoints(Path(output_dir))
    return ckpts[-1] if ckpts else None


def normalize_gradients(model: torch.nn.Module, accelerator: Accelerator, targets: torch.Tensor) -> torch.Tensor:
    """Turn the accumulated gradient of summed losses into the gradient of the mean over every target token of the
    optimizer step, on every rank; returns that token count. accelerate divided each micro-batch's loss by
    gradient_accumulation_steps and DDP/FSDP average over ranks, so the factor is accumulation x world / tokens."""
    total = accelerator.reduce(targets.to(accelerator.device).float(), reduction="sum")
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(total.item(), 1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)  # a Python float: plain and DTensor (FSDP2) gradients alike
    return total


def check_shared_output_dir(accelerator: Accelerator, output_dir: Path) -> None:
    """Rank 0 writes the checkpoints and every rank reads them on resume: with several processes every rank must
    see rank 0's `output_dir` (on several nodes, a filesystem they all mount). Checked with a token rank 0 writes,
    so that a run refuses at start instead of the other nodes restarting at step 0 on resume."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    token = output_dir / ".qatune_shared_check"
    expected = [f"{os.getpid()}-{time.time_ns()}" if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        atomic_write_text(token, expected[0])
    broadcast_object_list(expected)  # also the barrier: rank 0 has written the token
    seen = token.read_text() if token.is_file() else None
    flags = accelerator.gather(torch.tensor([int(seen == expected[0])], device=accelerator.device)).cpu().tolist()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        token.unlink(missing_ok=True)
    if not all(flags):
        blind = [rank for rank, ok in enumerate(flags) if not ok]
        raise ConfigError(
            f"output_dir {str(output_dir)!r}: rank(s) {blind} do not see the files rank 0 writes there; checkpoints "
            "of a multi-node run need output_dir on a filesystem every node mounts, or save_every_n_steps=0 and "
            "resume=false"
        )


def check_resume(checkpoint: Path, run: Mapping[str, Any], allow: list[str] | tuple[str, ...] = ()) -> None:
    """A checkpoint continues only the run that saved it: each key of `run` (what defines the run: model, scheme,
    batch, accumulation, world size, seq_len, data, optimizer, ...) must equal what the checkpoint stored, unless
    named in `allow` (resume_allow_changes). Checkpoints that stored no run (older ones) are not compared."""
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("run")
    if saved is None:
        return
    for key, value in run.items():
        value = json.loads(json.dumps(value, default=str))  # as stored: tuples are lists, paths strings
        if key not in allow and saved.get(key) != value:
            raise ConfigError(
                f"resume=true: {checkpoint} was saved with {key}={saved.get(key)!r}, this run has {key}={value!r}; "
                f"resume with the same value, add {key} to resume_allow_changes to change it on purpose, or start "
                "over with overwrite=true"
            )


def save_checkpoint(
    accelerator: Accelerator, output_dir: Path, state: Mapping[str, Any], keep: int, p: Prepared | None = None
) -> Path:
    """Weights, optimizer, scheduler, RNG and data position, written to a temp dir then renamed (all ranks call).
    Under FSDP2 (`p.sharded`) each rank writes its shards of the weights and optimizer states to `sharded/`."""
    final = output_dir / "checkpoints" / f"step_{state['step']}"
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if p is not None and p.sharded:
        fsdp.save_sharded(p.model, p.optimizer, tmp / "sharded")
    accelerator.wait_for_everyone()  # every rank's files are in tmp before it is renamed
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", dict(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class RunState:
    """Where a run is, as its checkpoints store it (trainer_state.json, beside accelerate's weights, optimizer,
    scheduler and RNG state): the step, the data position and the losses so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)

    def save(self, accelerator: Accelerator, output_dir: Path, p: Prepared, keep: int,
             run: Mapping[str, Any] | None) -> Path:  # fmt: skip
        state = asdict(self) | {"run": dict(run or {})}
        return save_checkpoint(accelerator, output_dir, state, keep, p)

    @classmethod
    def resume(
        cls, accelerator: Accelerator, output_dir: Path, p: Prepared, cfg: TrainConfig, run: Mapping[str, Any] | None
    ) -> RunState:
        """With cfg.resume, the last checkpoint loaded into the prepared objects and its state; else step 0."""
        if cfg.save_every_n_steps or cfg.resume:
            check_shared_output_dir(accelerator, output_dir)
        ckpt = latest_checkpoint(output_dir)
        if not cfg.resume:
            return cls()
        if ckpt is None:
            accelerator.print(f"resume=true but no checkpoint in {output_dir / 'checkpoints'}: starting from step 0")
            return cls()
        if run is not None:
            check_resume(ckpt, run, cfg.resume_allow_changes)
        try:
            accelerator.load_state(str(ckpt))
            if p.sharded:
                fsdp.load_sharded_checkpoint(p.model, p.optimizer, ckpt / "sharded")
        except RuntimeError as e:  # load_state_dict: "size mismatch for ...", "Missing key(s) ..." (many lines)
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))[:300]
            raise ConfigError(
                f"resume=true: checkpoint {ckpt} does not fit this model ({detail.rstrip('.')}); resume with "
                "the model and quantizer it was saved with, or start over with overwrite=true"
            ) from None
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        accelerator.print(f"resumed from {ckpt} (step {saved['step']})")
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__})


@dataclass
class Prepared:
    """A run's objects after accelerator.prepare, and its number of optimizer steps."""

    model: torch.nn.Module
    optimizer: Any
    dataloader: Any
    scheduler: Any
    eval_loader: Any
    total_steps: int
    sharded: bool  # FSDP2: the model came sharded (qatune.fsdp); accelerate prepared only the data and schedule


def prepare(
    model: torch.nn.Module, dataset: Dataset, cfg: TrainConfig, optimizer_cfg: Mapping[str, Any],
    scheduler_cfg: Mapping[str, Any] | None, accelerator: Accelerator, seed: int, eval_dataset: Dataset | None,
) -> Prepared:  # fmt: skip
    """Set-up: optimizer over the trainable parameters, seedable data order, schedule, accelerate's wrapping."""
    if accelerator.device.type == "cpu":
        mmap_large_cpu_tensors()  # activations freed each step go back to the OS, not into a fragmented heap
    sharded = fsdp.is_sharded(model)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = instantiate(optimizer_cfg, [p for p in model.parameters() if p.requires_grad])
    dataloader = build_dataloader(dataset, cfg.batch_size, seed)
    steps_per_epoch = len(dataloader) // (cfg.gradient_accumulation_steps * accelerator.num_processes)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"dataset has {len(dataset)} blocks: too few for one step of batch_size {cfg.batch_size} x "
            f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} x {accelerator.num_processes} processes"
        )
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    scheduler = instantiate(scheduler_cfg, optimizer, num_training_steps=total_steps) if scheduler_cfg else None
    if scheduler is None:  # constant lr: one code path
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if sharded:  # accelerate would wrap the model in DDP and save the optimizer's shards from rank 0 alone
        dataloader, scheduler = accelerator.prepare(dataloader, scheduler)
    else:
        model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    eval_loader = None
    if eval_dataset is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=cfg.batch_size))
    return Prepared(model, optimizer, dataloader, scheduler, eval_loader, total_steps, sharded)


def forward_backward(
    p: Prepared, batch: dict, accelerator: Accelerator, cfg: TrainConfig, loss_fn: Callable | None,
    step_targets: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One micro-batch: forward, backward of its loss summed over target tokens, and on the optimizer step's last
    micro-batch the token normalisation, clipping and step. Returns (its summed loss, the step's target tokens over
    all micro-batches and ranks, or None before the last micro-batch); `step_targets` collects the counts."""
    with accelerator.accumulate(p.model):
        targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # logit t predicts token t + 1
        with accelerator.autocast():  # mixed_precision; accelerate's DDP wrapper applies it too (FSDP2: only this)
            if loss_fn is None:
                loss = p.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            else:
                loss = loss_fn(p.model, batch)
        loss_sum = loss * targets  # both return the mean over this micro-batch's target tokens
        accelerator.backward(loss_sum)
        step_targets.append(targets)
        total = None
        if accelerator.sync_gradients:
            total = normalize_gradients(p.model, accelerator, torch.stack(step_targets).sum())
            if cfg.clip_grad_norm:  # the norm over all ranks' shards under FSDP2 (DTensor gradients)
                accelerator.clip_grad_norm_(p.model.parameters(), cfg.clip_grad_norm)
            p.optimizer.step()
            p.optimizer.zero_grad(set_to_none=True)
    return loss_sum.detach(), total


class StepLog:
    """Per-step records: metrics.jsonl (main process), the progress bar, accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, cfg: TrainConfig, run_name: str, state: RunState,
                 total_steps: int) -> None:  # fmt: skip
        self.accelerator, self.cfg, self.run_name = accelerator, cfg, run_name
        self.path = output_dir / "metrics.jsonl"
        if accelerator.is_main_process:
            # A fresh run starts a fresh log; a resumed one drops what was logged after its checkpoint.
            old = self.path.read_text().splitlines() if state.step and self.path.exists() else []
            kept = [r for r in old if json.loads(r)["step"] <= state.step]
            atomic_write_text(self.path, "".join(f"{r}\n" for r in kept))
        if cfg.trackers:
            accelerator.init_trackers(run_name)
        self.bar = tqdm(total=total_steps, initial=state.step, desc=run_name, disable=not accelerator.is_main_process)
        self.start, self.start_tokens = time.perf_counter(), state.tokens

    def write(self, state: RunState, lr: float, val_loss: float | None) -> None:
        record = {
            "run": self.run_name, "step": state.step, "loss": state.losses[-1], "lr": lr, "tokens": state.tokens,
            "tokens_per_s": (state.tokens - self.start_tokens) / max(time.perf_counter() - self.start, 1e-9),
            "peak_memory_bytes": peak_memory_since_reset(self.accelerator.device),
        }  # fmt: skip
        if val_loss is not None:
            record["val_loss"] = val_loss
        if state.step % max(self.cfg.log_every_n_steps, 1) == 0 or val_loss is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                 mem=f"{record['peak_memory_bytes'] / 2**30:.1f}G")  # fmt: skip
            if self.accelerator.is_main_process:
                with self.path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.cfg.trackers:
                self.accelerator.log({k: v for k, v in record.items() if k != "run"}, step=state.step)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.cfg.trackers:
            # Not accelerator.end_training(): it also destroys the process group on every rank, which the gather of
            # the trained weights and a second fine-tune in the same process still need.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []  # the next run's init_trackers starts its own


def train(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    cfg: TrainConfig,
    optimizer_cfg: Mapping[str, Any],
    scheduler_cfg: Mapping[str, Any] | None,
    accelerator: Accelerator,
    output_dir: str | Path,
    seed: int,
    eval_dataset: Dataset | None = None,
    on_step: Callable[[torch.nn.Module, int], None] | None = None,
    run_name: str = "train",
    rebuild: Callable[[dict], torch.nn.Module] | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    run_identity: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module | None, TrainResult]:
    """Train `model` in place.

    `on_step(model, step)` runs before each optimizer step's first micro-batch: the recipe uses it to switch fake
    quantization on after N steps, and on resume it is called again for the restored step. `loss_fn(model, batch)`
    replaces the plain next-token loss (the recipe's self-distillation). `run_identity` (what defines the run) is
    stored in every checkpoint, and resume refuses a checkpoint saved with other values (`check_resume`).

    Returns the trained, unwrapped model and the run's figures. Under FSDP2 (`model` sharded by qatune.fsdp) each
    rank holds only shards: the full weights are gathered and `rebuild(state_dict)` makes the whole model on rank 0
    (other ranks get None).
    """
    output_dir = Path(output_dir)
    set_seed(seed)
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    p = prepare(model, dataset, cfg, optimizer_cfg, scheduler_cfg, accelerator, seed, eval_dataset)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    state = RunState.resume(accelerator, output_dir, p, cfg, run_identity)
    if cfg.resume and state.step >= p.total_steps:
        where = "at" if state.step == p.total_steps else "past"
        accelerator.print(f"the checkpoint is {where} the run's last step ({p.total_steps}): no step left to train")
    world = accelerator.num_processes
    timeout = collective_timeout(accelerator.device)
    accelerator.print(
        f"[{run_name}] world size {world}, global batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} x {world}"
        f" = {cfg.batch_size * cfg.gradient_accumulation_steps * world} sequences, {p.total_steps} steps"
        + (f", collective timeout {timeout.total_seconds() / 60:g} min" if timeout is not None else "")
    )
    if p.sharded:
        local, total = fsdp.parameter_counts(p.model)
        accelerator.print(f"[{run_name}] fsdp2: this rank holds {local:,} of the {total:,} parameters (its shards)")
    # This run's own peak (its model, optimizer, activations), not the process's: the baselines and an earlier
    # fine-tune in the same process would otherwise count.
    reset_peak_memory(accelerator.device)
    log = StepLog(accelerator, output_dir, cfg, run_name, state, p.total_steps)
    # The optimizer step in progress: its micro-batches' summed losses and target-token counts.
    step_losses: list[torch.Tensor] = []
    step_targets: list[torch.Tensor] = []
    while state.step < p.total_steps:
        p.dataloader.set_epoch(state.epoch)
        skip = state.batch_in_epoch
        for batch in accelerator.skip_first_batches(p.dataloader, skip) if skip else p.dataloader:
            if on_step is not None and not step_losses:
                on_step(accelerator.unwrap_model(p.model), state.step)
            loss_sum, step_total = forward_backward(p, batch, accelerator, cfg, loss_fn, step_targets)
            step_losses.append(loss_sum)
            state.batch_in_epoch += 1
            state.tokens += batch["input_ids"].numel() * world
            if step_total is None:
                continue
            loss = (accelerator.reduce(torch.stack(step_losses).sum(), reduction="sum") / step_total).item()
            step_losses, step_targets = [], []
            if not math.isfinite(loss):
                log.bar.close()  # else the bar redraws itself after the error line
                good = latest_checkpoint(output_dir)
                where = f"last good checkpoint: {good}" if good else "no checkpoint was saved"
                raise TrainingError(
                    f"loss became {loss} at step {state.step + 1} ({where}); lower optimizer.lr or clip_grad_norm"
                )
            p.scheduler.step()
            state.step += 1
            state.losses.append(loss)
            val_loss = None
            if cfg.eval_every_n_steps and state.step % cfg.eval_every_n_steps == 0 and p.eval_loader is not None:
                val_loss = validation_loss(p.model, p.eval_loader, cfg.eval_batches, accelerator)
            log.write(state, p.optimizer.param_groups[0]["lr"], val_loss)
            if cfg.save_every_n_steps and state.step % cfg.save_every_n_steps == 0:
                state.save(accelerator, output_dir, p, cfg.keep_last_n_checkpoints, run_identity)
            if state.step >= p.total_steps:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    log.close()
    wall = time.perf_counter() - log.start
    model = finish(p, accelerator, cfg, rebuild)
    return model, TrainResult(
        steps=state.step,
        tokens=state.tokens,
        wall_s=wall,
        tokens_per_s=(state.tokens - log.start_tokens) / max(wall, 1e-9),
        peak_memory_bytes=peak_memory_since_reset(accelerator.device),
        final_loss=state.losses[-1] if state.losses else float("nan"),
        losses=state.losses,
        trainable_params=trainable,
    )


def finish(
    p: Prepared, accelerator: Accelerator, cfg: TrainConfig, rebuild: Callable[[dict], torch.nn.Module] | None
) -> torch.nn.Module | None:
    """The trained model, whole and unwrapped, in eval mode (None on FSDP2's other ranks)."""
    model = p.model
    if p.sharded:
        state = fsdp.full_state_dict(model)  # every rank takes part; rank 0 receives the full weights
        if rebuild is None:
            raise ValueError("training under FSDP2 needs `rebuild` to make the whole model from gathered weights")
        model = rebuild(state) if accelerator.is_main_process else None
    else:
        if accelerator.num_processes > 1:
            check_replicas_identical(model, accelerator)
        # Without accelerate's autocast wrapper on forward: after training the model runs as saved (mixed_precision
        # is a training setting; measured: the wrapper left the int4 model's logits 1.9% from its reloaded copy's).
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_disable()
    accelerator.free_memory()  # forget this run's objects: the next run's checkpoints hold only its own
    if model is not None:
        model.eval()
    return model


@torch.no_grad()
def check_replicas_identical(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """DDP keeps one copy of the weights per rank; they must agree bit for bit after training."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).cpu()
    if not torch.all(sums == sums[0]):
        raise TrainingError(f"parameters differ across ranks after training (checksums {sums.tolist()})")
    accelerator.print(f"parameters identical on all {len(sums)} ranks (checksum {sums[0].item():.6f})")


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loader: DataLoader, max_batches: int, accelerator: Accelerator) -> float:
    model.eval()
    total = []
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        with accelerator.autocast():
            total.append(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.float())
    model.train()
    return accelerator.reduce(torch.stack(total).mean(), reduction="mean").item()
