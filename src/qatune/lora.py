"""LoRA adapters inside the fake-quantized weight: QAT + LoRA whose int4 export is exactly what was trained.

torchtune's and Unsloth's QAT + LoRA fake-quantize the frozen base weight and add the float adapter's output beside
it; merging afterwards and quantizing again deploys an int4 grid nobody trained against. Here the adapter lives
inside the weight: each adapted linear's weight is the parametrization W + (alpha / rank) · B A (torch's
`parametrize`), so the fake quantizer — the fused one or torchao's — quantizes the weight that will be deployed, and
`merge_lora_` writes exactly that weight back: converting it gives the int4 codes the forward saw, bit for bit.

The base W keeps the model's dtype (bf16 on GPUs), frozen: no gradient, no optimizer state. A and B are fp32 and
the only trainable parameters. peft's LoRA layer computes base(x) + B(A(dropout(x))) beside the base layer, with no
place for a quantizer of the merged weight, so its layers are not used; its names (`r`, `lora_alpha`,
`target_modules`) map onto `lora.rank`, `lora.alpha`, `lora.target_modules`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from qatune.errors import ConfigError, check_at_least, is_positive_number

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0  # the update is (alpha / rank) · B A
    dropout: float = 0.0  # only 0: the adapter is inside the weight, there is no separate adapter input to drop
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))  # module names or name suffixes


def check_lora_config(lora: Mapping[str, Any] | None, model_path: str | None = None) -> None:
    """lora's rules, before anything loads; with a local model directory the targets are matched against its
    modules too (built on the meta device from config.json: no weights read)."""
    if lora is None:
        return
    check_at_least("lora.rank", lora.get("rank"), 1)
    alpha = lora.get("alpha")
    if not is_positive_number(alpha):
        raise ConfigError(f"lora.alpha={alpha!r}: give a positive number (the update is alpha / rank · B A)")
    if lora.get("dropout", 0.0) != 0:
        raise ConfigError(
            f"lora.dropout={lora.get('dropout')!r}: only 0; the adapter is merged inside the fake-quantized weight, "
            "so there is no separate adapter input to drop (use weight_decay to regularise)"
        )
    targets = list(lora.get("target_modules") or [])
    if not targets:
        raise ConfigError(f"lora.target_modules is empty: name linear modules, e.g. [{', '.join(LLAMA_LINEARS)}]")
    from qatune.models import local_meta_model

    if (model := local_meta_model(model_path, "lora.target_modules against the model's linears")) is not None:
        lora_targets(model, targets)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for target_modules names


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers the targets name; a target naming none is refused in one line."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(_matches(name, target) for name in linears):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ConfigError(f"lora.target_modules: {target!r} matches no linear layer; the model has {leaves}")
    chosen = [name for name in linears if any(_matches(name, t) for t in targets)]
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in chosen:
        raise ConfigError("lora.target_modules: lm_head is tied to the embeddings here; an adapter would change both")
    return chosen


class LoraDelta(nn.Module):
    """weight -> weight + (alpha / rank) · B A, in the weight's dtype. B starts at zero (the model starts as it was),
    A as peft initialises it (Kaiming-uniform)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # The delta in fp32 even under bf16 autocast (else training would see a bf16 B A and the merge, which runs
        # outside autocast, an fp32 one); W + delta rounded once to W's dtype: peft's merge computes the same bits.
        with torch.autocast(weight.device.type, enabled=False):
            delta = (self.lora_B @ self.lora_A) * self.scaling
        return (weight + delta).to(weight.dtype)


def add_lora_(model: nn.Module, lora: Mapping[str, Any]) -> nn.Module:
    """Freeze every parameter and put an adapter inside the weight of each targeted linear, in place. Call after
    fake_quantize_ (the fake quantizer then reads the adapted weight)."""
    chosen = lora_targets(model, list(lora["target_modules"]))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        m = model.get_submodule(name)
        delta = LoraDelta(m.out_features, m.in_features, int(lora["rank"]), float(lora["alpha"]), m.weight.device)
        parametrize.register_parametrization(m, "weight", delta)
    return model


def save_adapter(model: nn.Module, directory: str | Path, lora: Mapping[str, Any], base_model: str) -> Path:
    """The trained adapters alone, as peft saves them (adapter_config.json + adapter_model.safetensors), before
    merge_lora_: `PeftModel.from_pretrained(base, directory)` loads them, and peft's merge_and_unload gives the
    merged weights bit for bit, so quantizing those with the same scheme gives the int4 codes of `int4/`."""
    import peft
    from safetensors.torch import save_file

    from qatune.files import atomic_dir

    state = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            delta = m.parametrizations.weight[0]
            for part in ("lora_A", "lora_B"):
                state[f"base_model.model.{name}.{part}.weight"] = getattr(delta, part).detach().cpu().contiguous()
    config = peft.LoraConfig(
        r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0, bias="none",
        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM", base_model_name_or_path=base_model,
    )  # fmt: skip
    with atomic_dir(directory) as tmp:
        config.save_pretrained(tmp)
        save_file(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(directory)


def merge_lora_(model: nn.Module) -> nn.Module:
    """Write W + (alpha / rank) · B A into each adapted weight, in place: the same computation the forward did, so
    the same bits (and after convert_to_int4 the same int4 codes the fake quantizer saw)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            m.weight.requires_grad_(False)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())
