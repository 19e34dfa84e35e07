"""FSDP2 with torch's own `fully_shard`: the same code on CPU (gloo) and on CUDA GPUs (NCCL).

accelerate applies FSDP only on GPUs (on CPU it quietly falls back to DDP), so qatune shards the model itself, the
way torchtitan does: rank 0 reads the checkpoint into CPU memory, every rank builds the same model on the meta device
(no memory), shards each decoder layer and then the rest (embeddings, final norm, lm_head: one unit, so tied
embeddings stay tied), allocates only its own shards on its device and receives their values from rank 0. No rank
holds a full copy on its device; rank 0 holds one in CPU memory while it broadcasts.

The parameters stay fp32 (master weights) and are all-gathered in fp32: the fake quantizers then compute the int4
codes from the same fp32 weights that the conversion to int4 reads, so the checkpoint keeps the trained grid. bf16
compute comes from autocast (`mixed_precision`), as on one GPU or under DDP.

accelerate still drives the rest: data sharding, RNG, the schedule, trackers. Checkpoints of the sharded weights and
optimizer states are torch.distributed.checkpoint (DCP) directories, one file per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from qatune.errors import on_rank0


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, one FSDP2 unit each (Hugging Face names their class in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules")
    return layers


def shard_(model: nn.Module) -> nn.Module:
    """fully_shard each decoder layer, then the root (what is left), in place. Each layer's weights are gathered
    for its forward and freed after it (and gathered again for its backward)."""
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def load_sharded(
    load_whole: Callable[[], nn.Module], build: Callable[[object], nn.Module], device: torch.device
) -> nn.Module:
    """The model sharded over all ranks, its values from `load_whole()` (called on rank 0 only, on CPU).

    `build(config)` makes the same architecture (fake quantizers included) from the loaded model's config; every
    rank calls it under the meta device. The error of a failed load on rank 0 is raised there; the other ranks stop
    with one line instead of waiting at a collective.
    """
    whole = on_rank0(load_whole)
    sent = [whole.config if whole is not None else None]
    dist.broadcast_object_list(sent, src=0)
    config = sent[0]
    with torch.device("meta"):
        model = build(config)
    shard_(model)
    model.to_empty(device=device)
    state = whole.state_dict() if whole is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are in no state dict
        if name not in persistent:
            if whole is not None:
                buffer.copy_(whole.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del whole, state
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model)."""
    params = list(model.parameters())
    return sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part; rank 0 receives the whole state dict in CPU memory, the others an empty dict."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Weights and optimizer states, each rank writing its own shards (DCP), into `directory`."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
