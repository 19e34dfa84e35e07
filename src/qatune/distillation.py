"""Distillation losses for QAT: the fake-quantized student matches a float teacher's next-token distribution.

    loss = weight * T^2 * KL(teacher || student) + (1 - weight) * CE(labels, student)

KL at temperature T over every position with a label (-100: prompts, padding are left out), averaged over them, as
the CE is. The teacher's distribution carries far more signal per token than the one-hot label (NVIDIA ModelOpt's
QAD, the vendors' QAT recipes).

`teacher_distillation_loss`: a separate, frozen float model (`distillation.teacher`: the original checkpoint, the
fair baseline's fine-tuned model, or a path), run without grad in model.dtype. Its logits never exist whole: its
final hidden states are taken once and its lm_head runs chunk by chunk beside the student's logits, each chunk's KL
and CE under activation checkpointing, so a 128k vocabulary adds one chunk of logits, not another [batch, seq, vocab]
tensor (and the student's float32 log-softmax is recomputed in backward, not stored).

`self_distillation_loss`: the teacher is the student itself with fake quantization off (the same weights' float
function): it pulls the quantized function towards the current float one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qatune.data import IGNORE_INDEX
from qatune.errors import ConfigError

TEACHERS = ("original", "finetuned")  # or a path to a float checkpoint


@dataclass
class DistillationConfig:
    weight: float = 0.0  # of the KL term, 0 = off; the label loss gets 1 - weight
    teacher: str = "finetuned"  # original | finetuned (the float fine-tune) | <checkpoint path>
    temperature: float = 1.0
    chunk_size: int = 256  # positions per chunk of logits (memory: chunk_size x vocab floats, not seq x vocab)

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ConfigError(f"distillation.teacher={self.teacher!r}: choose {' | '.join(TEACHERS)} or a path")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1:
            raise ConfigError(f"distillation.weight={w!r}: choose a weight in [0, 1] (0 = off, 1 = KL only)")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or t <= 0:
            raise ConfigError(f"distillation.temperature={t!r}: choose a number > 0")
        c = self.chunk_size
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"distillation.chunk_size={c!r}: choose an integer >= 1")


def distillation_config(section: Mapping | None) -> DistillationConfig | None:
    """The `distillation:` section -> a validated DistillationConfig, None when off (weight 0 or no section)."""
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise ConfigError(
            f"distillation must be a mapping like {{teacher: finetuned, weight: 1.0}} or null, not {section!r}"
        )
    fields = DistillationConfig.__dataclass_fields__
    if unknown := sorted(set(section) - set(fields)):
        raise ConfigError(f"unknown distillation key(s) {unknown}; accepted: {', '.join(fields)}")
    d = DistillationConfig(**dict(section))
    return d if d.weight > 0 else None


def _chunk_losses(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[KL sum, CE sum] over one chunk's positions with a label; student/teacher [n, vocab] logits, labels [n].

    Masked by multiplication, not by boolean indexing: indexing copies [n, vocab] twice more and its backward (a
    scatter), recomputed under checkpointing, made the whole distillation step ~4x a plain one on CPU. At T = 1
    the KL reuses the CE's log-softmax."""
    s, t = student.float(), teacher.float()
    log_p = torch.log_softmax(s, -1)
    log_p_s = log_p if temperature == 1 else torch.log_softmax(s / temperature, -1)
    log_p_t = torch.log_softmax(t if temperature == 1 else t / temperature, -1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(-1)
    kl = (kl * (labels != IGNORE_INDEX)).sum()
    ce = F.nll_loss(log_p, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([kl, ce])


def chunked_kl_ce(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: nn.Module,
    labels: torch.Tensor,
    temperature: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean KL(teacher || student) at `temperature`, mean CE) over the positions with a label. Logit t predicts
    token t + 1. The teacher's logits come from its lm_head one chunk of positions at a time (no grad)."""
    student_logits, teacher_hidden, labels = student_logits[:, :-1], teacher_hidden[:, :-1], labels[:, 1:]
    total = torch.zeros(2, device=student_logits.device)
    for start in range(0, labels.shape[1], chunk_size):
        chunk = slice(start, start + chunk_size)
        with torch.no_grad():
            teacher = teacher_head(teacher_hidden[:, chunk]).flatten(0, 1)
        student = student_logits[:, chunk].flatten(0, 1)
        total = total + checkpoint(
            _chunk_losses, student, teacher, labels[:, chunk].flatten(), temperature, use_reentrant=False
        )
    n = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total[0] / n, total[1] / n


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The teacher's final (normed) hidden states [batch, seq, hidden]; its logits are left to the chunks."""
    out = teacher(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def teacher_distillation_loss(
    model: nn.Module, teacher: nn.Module, batch: Mapping[str, torch.Tensor], cfg: DistillationConfig
) -> torch.Tensor:
    """weight * T^2 * KL(teacher || student) + (1 - weight) * CE, means over the target tokens."""
    logits = model(input_ids=batch["input_ids"]).logits  # no labels: transformers' own loss would upcast it all
    hidden = teacher_hidden_states(teacher, batch["input_ids"])
    sharded = hasattr(teacher, "unshard")  # FSDP2: lm_head is the root unit's, gathered for the chunks, then freed
    if sharded:
        teacher.unshard()
    try:
        kl, ce = chunked_kl_ce(logits, hidden, teacher.get_output_embeddings(), batch["labels"], cfg.temperature,
                               cfg.chunk_size)  # fmt: skip
    finally:
        if sharded:
            teacher.reshard()
    return cfg.weight * kl * cfg.temperature**2 + (1 - cfg.weight) * ce


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """No grad, eval mode (no dropout): the teacher is a fixed function."""
    teacher.requires_grad_(False)
    return teacher.eval()


def self_distillation_loss(
    model: nn.Module, batch: Mapping[str, torch.Tensor], weight: float, temperature: float = 1.0
) -> torch.Tensor:
    """(1 - weight) * next-token loss + weight * KL(float || fake-quantized) of the same weights' predictions.

    The teacher is the model itself with fake quantization off (one extra forward, no graph): the term pulls the
    quantized function towards the float function of the current weights, which is the error int4 adds, while the
    next-token loss keeps learning the data. While fake quant is still off (fake_quant_after_n_steps) it is the plain
    loss. Positions with label -100 (prompts, padding) are left out of both terms.
    """
    from accelerate.utils import extract_model_from_parallel
    from torchao.quantization.qat import FakeQuantizedLinear

    from qatune.quantization import enable_fake_quant

    inner = extract_model_from_parallel(model)
    layers = [m for m in inner.modules() if isinstance(m, FakeQuantizedLinear)]
    on = any(m.weight_fake_quantizer is not None and m.weight_fake_quantizer.enabled for m in layers)
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    if not on or weight == 0:
        return out.loss
    with torch.no_grad():
        enable_fake_quant(inner, False)
        try:
            teacher = inner(input_ids=batch["input_ids"]).logits
        finally:
            enable_fake_quant(inner, True)
    # Logit t predicts token t + 1, as in the model's own loss.
    keep = batch["labels"][:, 1:] != -100
    student = out.logits[:, :-1][keep].float() / temperature
    teacher = teacher[:, :-1][keep].float() / temperature
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True, reduction="batchmean"
    )
    return (1 - weight) * out.loss + weight * kl * temperature**2
