"""Distillation losses against hand computations on a tiny model: the chunked teacher KL + CE and its gradients,
and self-distillation (the student's own float function as teacher)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from qatune.distillation import (
    DistillationConfig,
    distillation_config,
    freeze_teacher,
    self_distillation_loss,
    teacher_distillation_loss,
)
from qatune.errors import ConfigError
from qatune.quantization import QuantScheme, enable_fake_quant, fake_quantize_

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def hand_loss(student, teacher, ids, labels, weight, temperature):
    """weight T^2 KL(teacher || student) + (1 - weight) CE from the whole logits, the textbook way."""
    s = student(ids).logits[:, :-1]
    with torch.no_grad():
        t = teacher(ids).logits[:, :-1]
    keep = labels[:, 1:] != -100
    p_t = (t[keep] / temperature).softmax(-1)
    kl = (p_t * (p_t.log() - (s[keep] / temperature).log_softmax(-1))).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(s[keep], labels[:, 1:][keep])
    return weight * temperature**2 * kl + (1 - weight) * ce


@pytest.mark.parametrize("weight, temperature, chunk", [(1.0, 1.0, 256), (0.7, 2.0, 5)])
def test_teacher_distillation_loss_and_gradients_match_the_hand_computation(weight, temperature, chunk):
    student = fake_quantize_(make_tiny_llama(seed=0), QuantScheme(scheme="8da4w", skip=["lm_head"]))
    teacher = freeze_teacher(make_tiny_llama(seed=1))  # another float model: KL far from 0
    labels = IDS.clone()
    labels[0, :7] = -100  # a masked prompt
    cfg = DistillationConfig(weight=weight, temperature=temperature, chunk_size=chunk)
    loss = teacher_distillation_loss(student, teacher, {"input_ids": IDS, "labels": labels}, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    expected = hand_loss(student, teacher, IDS, labels, weight, temperature)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert loss > 0.1  # two different random models: the KL is far from zero
    for name, p in student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(p.grad is None for p in teacher.parameters())  # frozen: no gradient reaches it


def test_the_teacher_is_the_student_gives_zero_kl():
    model = make_tiny_llama(seed=0)
    batch = {"input_ids": IDS, "labels": IDS}
    teacher = freeze_teacher(make_tiny_llama(seed=0))
    loss = teacher_distillation_loss(model, teacher, batch, DistillationConfig(weight=1))
    assert abs(loss.item()) < 1e-5


def test_distillation_sections():
    assert distillation_config(None) is None and distillation_config({"weight": 0.0}) is None  # off
    assert distillation_config({"weight": 0.5, "teacher": "original"}).teacher == "original"
    for section, message in (
        ({"weight": 2}, "distillation.weight=2: choose a weight in [0, 1]"),
        ({"weight": 1, "temperature": 0}, "distillation.temperature=0"),
        ({"weight": 1, "teachr": "x"}, "unknown distillation key(s) ['teachr']"),
    ):
        with pytest.raises(ConfigError) as e:
            distillation_config(section)
        assert message in str(e.value)


def test_self_distillation_loss_is_ce_plus_kl_to_the_float_weights():
    model = fake_quantize_(make_tiny_llama(), QuantScheme())
    labels = IDS.clone()
    labels[0, :5] = -100  # a masked prompt
    batch = {"input_ids": IDS, "labels": labels}
    ce = model(input_ids=IDS, labels=labels).loss
    assert torch.equal(self_distillation_loss(model, batch, 0.0), ce)
    # By hand: KL(float || fake-quantized) over the predicted positions whose label is kept.
    with torch.no_grad():
        student = model(IDS).logits[:, :-1]
        teacher = enable_fake_quant(model, False)(IDS).logits[:, :-1]
        enable_fake_quant(model, True)
    keep = labels[:, 1:] != -100
    p_t = teacher[keep].softmax(-1)
    kl = (p_t * (p_t.log() - student[keep].log_softmax(-1))).sum(-1).mean()
    loss = self_distillation_loss(model, batch, 0.25)
    torch.testing.assert_close(loss, 0.75 * ce + 0.25 * kl, rtol=1e-5, atol=1e-6)
    assert kl > 1e-4  # int4 really moves the predictions
    loss.backward()  # the teacher pass leaves no graph; fake quant is on again afterwards
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert model.model.layers[0].mlp.up_proj.weight_fake_quantizer.enabled
    # While fake quant is off (fake_quant_after_n_steps), there is nothing to distil: the plain loss.
    enable_fake_quant(model, False)
    assert torch.equal(self_distillation_loss(model, batch, 0.5), model(input_ids=IDS, labels=labels).loss)
