"""The fused fake quant (issue 7) gives torchao's fake-quant values bit for bit: forward, input and weight gradients,
on random shapes, group sizes 32-256, fp32 (compiled kernels) and bf16 (eager, torchao's per-op bf16 rounding), both
config forms; enable/disable and convert keep working; and a short training run follows the same loss curve."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear, Float8FakeQuantizeConfig, IntxFakeQuantizeConfig

from qatune.fused_fake_quant import _Kernels, fuse_fake_quant_, is_fused, unfuse_fake_quant_
from qatune.quantization import QuantScheme, convert_to_int4, enable_fake_quant, fake_quantize_, resolve_quantizer

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def eager_kernels(monkeypatch):
    """Whole-model tests run the same arithmetic uncompiled (seconds, not minutes of compiling on a busy CPU); the
    per-layer tests below check the compiled fp32 kernels against torchao."""
    monkeypatch.setattr(_Kernels, "compile", False)


def linear_pair(in_features, out_features, bias, act_config, weight_config, dtype, seed):
    torch.manual_seed(seed)
    reference = FakeQuantizedLinear(in_features, out_features, bias, act_config, weight_config, dtype=dtype)
    with torch.no_grad():
        reference.weight.normal_(0, 0.05)
    fused = copy.deepcopy(reference)
    assert fuse_fake_quant_(nn.Sequential(fused)) == {} and is_fused(fused)
    return reference, fused


def forward_backward(layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return [y.detach(), *grads]


CASES = [  # (dtype, group_size, in_features, out_features, leading shape, bias, scale precision of QATConfig)
    (torch.float32, 32, 96, 40, (3, 7), False, None),
    (torch.float32, 64, 128, 24, (11,), True, None),
    (torch.float32, 128, 384, 8, (2, 5), False, torch.float32),
    (torch.float32, 256, 512, 16, (1, 9), True, None),
    (torch.bfloat16, 32, 64, 24, (2, 6), False, None),
    (torch.bfloat16, 128, 256, 12, (5,), True, None),
    (torch.bfloat16, 256, 256, 20, (3, 3), False, torch.float32),  # bf16 data, fp32 scales (the legacy form)
]


@pytest.mark.parametrize("dtype,group_size,k,n,lead,bias,scale_precision", CASES)
def test_forward_and_gradients_bit_identical_to_torchao(dtype, group_size, k, n, lead, bias, scale_precision):
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=group_size, is_symmetric=True)
    act.scale_precision = weight.scale_precision = scale_precision  # None: QATConfig's choice (the input dtype)
    reference, fused = linear_pair(k, n, bias, act, weight, dtype, seed=group_size + k)
    x = (torch.randn(*lead, k) * 3).to(dtype)
    x[0, ..., :5] = 0.0  # exact zeros and a row of one sign exercise the zero-point clamps
    x[-1] = x[-1].abs()
    grad_out = torch.randn(*lead, n).to(dtype)
    expected, got = forward_backward(reference, x, grad_out), forward_backward(fused, x, grad_out)
    assert len(expected) == len(got) == 3 + bias
    for name, e, g in zip(["output", "grad x", "grad weight", "grad bias"], expected, got, strict=False):
        assert g.dtype == e.dtype and torch.equal(g, e), f"{name} differs: max |diff| {(g - e).abs().max()}"
    assert not torch.equal(expected[0], nn.functional.linear(x, fused.weight, fused.bias))  # fake quant acts


@pytest.mark.usefixtures("eager_kernels")
def test_8da8w_per_channel_and_4w_weight_only_bit_identical():
    for base in (QuantScheme(scheme="8da8w"), QuantScheme(scheme="4w", group_size=64)):
        reference, fused = make_tiny_llama(), make_tiny_llama()
        fake_quantize_(reference, QuantScheme(scheme=base.scheme, group_size=base.group_size, fused=False))
        fake_quantize_(fused, base)
        assert all(is_fused(m) for m in fused.modules() if isinstance(m, FakeQuantizedLinear))
        for model in (reference, fused):
            model(IDS, labels=IDS).loss.backward()
        assert torch.equal(reference(IDS).logits, fused(IDS).logits)
        for (name, p), q in zip(reference.named_parameters(), fused.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.usefixtures("eager_kernels")
def test_legacy_quantizer_is_fused_and_identical():
    q = resolve_quantizer({"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 32})
    q_plain = resolve_quantizer(
        {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 32, "fused": False}
    )
    fused, reference = fake_quantize_(make_tiny_llama(), q), fake_quantize_(make_tiny_llama(), q_plain)
    assert type(fused.lm_head).__name__ == "Int8DynActInt4WeightQATLinear" and is_fused(fused.lm_head)
    assert not is_fused(reference.lm_head)
    for model in (reference, fused):
        model(IDS, labels=IDS).loss.backward()
    assert torch.equal(reference(IDS).logits, fused(IDS).logits)
    assert torch.equal(
        reference.model.layers[0].self_attn.q_proj.weight.grad, fused.model.layers[0].self_attn.q_proj.weight.grad
    )


@pytest.mark.usefixtures("eager_kernels")
def test_enable_disable_and_convert_keep_working(tiny_llama):
    q = QuantScheme()
    float_logits = tiny_llama(IDS).logits.detach()
    fake_quantize_(tiny_llama, q)
    fake_logits = tiny_llama(IDS).logits.detach()
    assert not torch.equal(fake_logits, float_logits)
    assert torch.equal(enable_fake_quant(tiny_llama, False)(IDS).logits, float_logits)  # off is exactly float
    enable_fake_quant(tiny_llama, True)
    convert_to_int4(tiny_llama, q)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in tiny_llama.modules())
    assert torch.equal(tiny_llama(IDS).logits, fake_logits)  # convert gives the trained (fused) numerics exactly


def test_uncovered_quantizers_fall_back_and_say_why(caplog):
    model = nn.Sequential(
        FakeQuantizedLinear(64, 32, False, None, IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False)),
        FakeQuantizedLinear(64, 32, False, None, Float8FakeQuantizeConfig()),
        FakeQuantizedLinear(64, 32, False, None, IntxFakeQuantizeConfig(torch.int4, group_size=32)),
    )
    not_covered = fuse_fake_quant_(model)
    assert set(not_covered) == {"0", "1"}
    assert "not symmetric" in not_covered["0"] and "not an IntxFakeQuantizer" in not_covered["1"]
    assert [is_fused(m) for m in model] == [False, False, True]
    unfuse_fake_quant_(model)
    assert not any(is_fused(m) for m in model)


def test_fused_key_is_validated():
    assert resolve_quantizer({"scheme": "8da4w", "fused": False}).fused is False
    assert QuantScheme().fused is True
    with pytest.raises(ValueError, match="fused must be true or false"):
        resolve_quantizer({"fused": "yes"})


@pytest.mark.usefixtures("eager_kernels")
def test_weight_qparams_cached_until_the_optimizer_step():
    reference, fused = make_tiny_llama(), make_tiny_llama()
    fake_quantize_(reference, QuantScheme(fused=False))
    fake_quantize_(fused, QuantScheme())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (reference, fused)]
    for _ in range(2):  # two optimizer steps of two micro-batches each
        for micro in (IDS[:1], IDS[1:]):
            for model in (reference, fused):
                (model(micro, labels=micro).loss / 2).backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for p, q in zip(reference.parameters(), fused.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.usefixtures("eager_kernels")
def test_training_loss_curve_matches_torchao():
    """20 AdamW steps on a tiny Llama: the fused and torchao fake quant give the same losses (bit for bit here)."""
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = fake_quantize_(make_tiny_llama(), QuantScheme(fused=fused))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        data = torch.randint(0, 512, (20, 2, 32), generator=torch.Generator().manual_seed(1))
        curve = []
        for batch in data:
            loss = model(batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        losses[fused] = curve
    assert losses[True][-1] < losses[True][0]  # it trains
    assert losses[True] == losses[False]


def test_fused_forward_under_inference_mode_equals_no_grad():
    # Evaluation runs under torch.inference_mode, whose tensors carry no version counter for the activation cache.
    model = fake_quantize_(make_tiny_llama(), resolve_quantizer({"scheme": "8da4w"}))
    assert any(is_fused(m) for m in model.modules())
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, expected)


@pytest.mark.parametrize("scheme", ["8da4w", "4w"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_with_fp32_or_bf16_weights_is_torchaos_path(scheme, weight_dtype):
    # fp32 master weights under bf16 autocast (the mixed-precision GPU set-up) once failed in the fused backward
    # ("expected m1 and m2 to have the same dtype"); bf16 autocast runs on CPU too. Loss and every gradient must be
    # those of torchao's own forward under the same autocast, bit for bit.
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    fused = fake_quantize_(make_tiny_llama().to(weight_dtype), resolve_quantizer({"scheme": scheme, "group_size": 32}))
    plain = unfuse_fake_quant_(copy.deepcopy(fused))
    results = []
    for model in (plain, fused):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for torchao_grad, fused_grad, p in zip(results[0][1], results[1][1], fused.parameters(), strict=True):
        assert fused_grad.dtype == p.dtype == weight_dtype  # gradients in the weights' dtype: fp32 master weights stay
        assert torch.equal(torchao_grad, fused_grad)


def test_the_compiled_kernels_divide_by_no_constant_and_round_division_as_eager():
    """On GPUs inductor turns x / constant into x * (1 / constant) and lowers fp32 division to Triton's approximate
    one: the fused kernels would then miss torchao's scales by an ulp and flip codes at ties. So every division in
    them has a tensor divisor, and they compile with inductor's eager division rounding (gpu_check checks the bits
    on a GPU)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from qatune.fused_fake_quant import (
        FakeQuantSpec,
        _divisor,
        _fake_quantize,
        _qparams,
        _qparams_fake_quantize,
        _straight_through,
        division_rounding_option,
    )

    assert division_rounding_option() == {"eager_numerics.division_rounding": True}
    x = torch.randn(8, 32)
    for symmetric in (True, False):
        spec = FakeQuantSpec(-8, 7, symmetric, 32, None, None, torch.int32)
        scale, zero_point = _qparams(x, _divisor(spec, x.device), spec)

        def traced(fn, *args, spec=spec):
            return make_fx(lambda *a: fn(*a, spec))(*args).graph

        graphs = [
            traced(_qparams_fake_quantize, x, _divisor(spec, x.device)),
            traced(_fake_quantize, x, scale, zero_point),
            traced(_straight_through, x, scale, zero_point, x),
        ]
        divisions = [n for g in graphs for n in g.nodes if "div" in str(n.target)]
        assert divisions  # the check sees them
        assert all(isinstance(n.args[1], torch.fx.Node) for n in divisions), [(n.target, n.args) for n in divisions]
