"""Fused fake quantization for QAT: torchao's numerics at a fraction of its cost (issue 7).

torchao's `FakeQuantizedLinear` fake-quantizes with ~10 separate tensor ops per operand (min, max, x * 1/scale,
round, + zero point, clamp, copy, - zero point, * scale), and autograd keeps a full-size float copy of every
clamp input for the backward pass. Here one autograd Function does the whole fake-quantized linear:

  forward   qparams from one aminmax pass, then one fused fake-quant kernel per operand (for fp32 ATen's
            `fake_quantize_per_channel_affine`, the same arithmetic as torchao's op chain), then F.linear.
  backward  recomputes the fake-quantized operands from the saved float ones (saved anyway by a plain linear, so
            no extra memory), the two matmuls, and the straight-through gradient exactly as torchao's autograd
            computes it: where(in range, grad * scale, 0) * (1 / scale), rounded the way torchao's dtypes round.

Two more savings that keep the numerics: a linear reading the same input tensor as the previous one (q/k/v,
gate/up) reuses its fake-quantized activation, and the weight qparams are cached per optimizer step (keyed by the
optimizer step count and the weight's version counter) so gradient-accumulation micro-batches skip that pass.

Forward and gradients are bit-identical to torchao's (tests/test_fused_fake_quant.py). The modules stay torchao's
`FakeQuantizedLinear` (a subclass only overrides `forward`) with their fake quantizer configs, so
`enable_fake_quant`, state dicts and QATConfig's convert work unchanged. Fake quantizers this does not cover
(range learning, static qparams, float8, asymmetric weights, ...) keep torchao's own forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType, ZeroPointDomain


@dataclass(frozen=True)
class FakeQuantSpec:
    """What one torchao IntxFakeQuantizer computes, read off its config."""

    qmin: int
    qmax: int
    symmetric: bool  # symmetric: zero point 0, scale = max|x| / ((qmax - qmin) / 2); else asymmetric min/max
    group_size: int | None  # None: one group per row (per token / per output channel)
    eps: float | None  # None: smallest normal of the input dtype (torchao's default)
    scale_dtype: torch.dtype | None  # None: the input dtype
    zero_point_dtype: torch.dtype  # int32 (QATConfig) or float32 (the legacy quantizer): it decides promotions


def fake_quant_spec(quantizer: nn.Module | None, role: str) -> FakeQuantSpec | None:
    """The spec of a weight or activation fake quantizer; ValueError saying why if the fused path does not cover it."""
    if quantizer is None:
        return None
    if type(quantizer).__name__ not in ("IntxFakeQuantizer", "FakeQuantizer") or not isinstance(
        quantizer, IntxFakeQuantizer
    ):
        raise ValueError(f"{role} fake quantizer {type(quantizer).__name__} is not an IntxFakeQuantizer")
    c: IntxFakeQuantizeConfig = quantizer.config
    if not c.is_dynamic or c.range_learning:
        raise ValueError(f"{role} fake quantizer has static or learned qparams")
    if c.zero_point_domain != ZeroPointDomain.INT:
        raise ValueError(f"{role} zero_point_domain {c.zero_point_domain} is not INT")
    if c.dtype not in _DTYPE_TO_QVALUE_BOUNDS:
        raise ValueError(f"{role} dtype {c.dtype} is not an integer dtype")
    qmin, qmax = _DTYPE_TO_QVALUE_BOUNDS[c.dtype]
    if role == "activation":
        if not isinstance(c.granularity, PerToken) or c.mapping_type != MappingType.ASYMMETRIC:
            raise ValueError(f"activation fake quant {c.granularity} {c.mapping_type} is not asymmetric per-token")
        return FakeQuantSpec(qmin, qmax, False, None, c.eps, c.scale_precision, c.zero_point_precision)
    if c.mapping_type != MappingType.SYMMETRIC:
        raise ValueError(f"weight fake quant mapping {c.mapping_type} is not symmetric")
    if isinstance(c.granularity, PerGroup | PerAxis) and getattr(c.granularity, "axis", 0) == 0:
        group_size = getattr(c.granularity, "group_size", None)  # None: per output channel
        return FakeQuantSpec(qmin, qmax, True, group_size, c.eps, c.scale_precision, c.zero_point_precision)
    raise ValueError(f"weight fake quant granularity {c.granularity} is not per-group or per-channel")


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic, on a 2-D view (rows = tokens or weight groups, columns = the values sharing one scale). Each function
# is torchao's op chain, op for op, so that eager it gives torchao's values in any dtype; for fp32 inputs with fp32
# scales torch.compile fuses each into one or two vectorized loops (still bit-identical: tests check it).


def _divisor(spec: FakeQuantSpec, device: torch.device) -> torch.Tensor:
    """(qmax - qmin) / 2 (symmetric) or qmax - qmin, as a tensor argument of the compiled kernels: inductor replaces
    division by a constant with multiplication by its reciprocal on GPUs, which is not torchao's rounding. Exact in
    any float dtype (7.5, 15, 127.5, 255), so dividing by it equals torchao's division by the Python float."""
    key = (spec.qmin, spec.qmax, spec.symmetric, device)
    if key not in _DIVISORS:
        value = float(spec.qmax - spec.qmin) / (2 if spec.symmetric else 1)
        _DIVISORS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return _DIVISORS[key]


_DIVISORS: dict = {}


def _qparams(x2: torch.Tensor, divisor: torch.Tensor, spec: FakeQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero_point), shape (rows, 1): torchao's choose_qparams_affine (min and max in one pass)."""
    min_val, max_val = torch.aminmax(x2, dim=-1, keepdim=True)
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    eps = spec.eps if spec.eps is not None else torch.finfo(x2.dtype).smallest_normal
    if spec.symmetric:
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = max_val_pos / divisor
        zero_point = torch.full_like(scale, int((spec.qmax + spec.qmin + 1) / 2))
        scale = torch.clamp(scale, min=eps)
    else:
        scale = (max_val_pos - min_val_neg) / divisor
        scale = torch.clamp(scale, min=eps)
        zero_point = spec.qmin - torch.round(min_val_neg / scale)
        zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax)
    return scale.to(spec.scale_dtype or x2.dtype), zero_point.to(spec.zero_point_dtype)


def _quantize(x2: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """round(x / scale) + zero_point, before clamping (torchao: x * (1.0 / scale), rounded, in the promoted dtype)."""
    return torch.round(x2 * (1.0 / scale)) + zero_point


def _fake_quantize(x2: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: FakeQuantSpec):
    q = torch.clamp(_quantize(x2, scale, zero_point), spec.qmin, spec.qmax)
    return ((q.to(x2.dtype) - zero_point.to(x2.dtype)) * scale).to(x2.dtype)


def _qparams_fake_quantize(
    x2: torch.Tensor, divisor: torch.Tensor, spec: FakeQuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale, zero_point = _qparams(x2, divisor, spec)
    return _fake_quantize(x2, scale, zero_point, spec), scale, zero_point


def _straight_through(
    x2: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, grad: torch.Tensor, spec: FakeQuantSpec
) -> torch.Tensor:
    """The gradient torchao's autograd passes through its fake quant: rounding is the identity, clamping zeroes what
    fell outside [qmin, qmax], and the chain multiplies by scale then by 1/scale (not quite the identity in floating
    point), the first product rounded to the input dtype as torchao's dequantized tensor is."""
    q = _quantize(x2, scale, zero_point)
    inside = (q >= spec.qmin) & (q <= spec.qmax)
    grad = torch.where(inside, (grad * scale).to(x2.dtype), 0)
    return (grad * (1.0 / scale)).to(x2.dtype)


@functools.cache
def division_rounding_option() -> dict | None:
    """Inductor's setting for IEEE fp32 division (Triton's div_rn, as eager CUDA divides; no effect on CPU) under the
    name this torch knows, or None where it has none (then GPUs run the kernels eager: torchao's numerics)."""
    from torch._inductor import config

    known = set(config.get_config_copy())
    for key in ("eager_numerics.division_rounding", "emulate_divison_rounding", "emulate_division_rounding"):
        if key in known:
            return {key: True}
    return None


class _Kernels:
    """The arithmetic eager, or compiled where that keeps torchao's values (fp32 data with fp32 scales: compiled
    code does bf16 ops in fp32 without rounding each step). Compiled once for all shapes (dynamic=True), with eager
    division rounding: on GPUs inductor otherwise lowers fp32 division (1 / scale) to Triton's approximate one."""

    compile = True  # qatune.fused_fake_quant._Kernels.compile = False: eager everywhere (e.g. no C++ compiler)
    _compiled: dict = {}

    @classmethod
    def get(cls, fn, x2: torch.Tensor, spec: FakeQuantSpec):
        fp32 = x2.dtype == torch.float32 and spec.scale_dtype in (None, torch.float32)
        exact_division = x2.device.type == "cpu" or division_rounding_option() is not None
        if not (cls.compile and fp32 and exact_division):
            return fn
        if fn not in cls._compiled:
            cls._compiled[fn] = torch.compile(fn, dynamic=True, options=division_rounding_option() or {})
        return cls._compiled[fn]

    @classmethod
    def run(cls, fn, x2: torch.Tensor, spec: FakeQuantSpec, *args):
        with torch.no_grad():
            return cls.get(fn, x2, spec)(x2, *args, spec)


# ---------------------------------------------------------------------------------------------------------------
# The fake-quantized linear


class _SharedActivation:
    """The last fake-quantized activation, reused by the next linear that reads the same tensor (q/k/v, gate/up),
    in the forward and again in the backward pass (their backward passes run one after another too).

    Holds a reference to the input, so its memory cannot be reused while it is the key.
    """

    key: tuple | None = None
    value: tuple | None = None

    @classmethod
    def get(cls, x: torch.Tensor, spec: FakeQuantSpec, qparams: tuple | None = None) -> tuple:
        """(x_fq 2-D, scale, zero_point); `qparams` skips computing them again (backward)."""
        if x.is_inference():  # inference tensors keep no version counter: nothing proves x unchanged, so no reuse
            return cls._compute(x, spec, qparams)
        key = (x.data_ptr(), x.shape, x.stride(), x._version, x.dtype, spec)
        if cls.key is None or cls.key[0] is not x or cls.key[1:] != key:
            cls.key, cls.value = (x, *key), cls._compute(x, spec, qparams)
        return cls.value

    @staticmethod
    def _compute(x: torch.Tensor, spec: FakeQuantSpec, qparams: tuple | None) -> tuple:
        x2 = x.reshape(-1, x.shape[-1])
        if qparams is None:
            return _Kernels.run(_qparams_fake_quantize, x2, spec, _divisor(spec, x2.device))
        return (_Kernels.run(_fake_quantize, x2, spec, *qparams), *qparams)

    @classmethod
    def clear(cls) -> None:
        cls.key = cls.value = None


def _weight_groups(w: torch.Tensor, spec: FakeQuantSpec) -> torch.Tensor:
    group_size = min(spec.group_size or w.shape[-1], w.shape[-1])  # torchao clips the group size to in_features
    return w.reshape(-1, group_size)


class _OptimizerSteps:
    """How many optimizer steps any torch optimizer has taken in this process. The weight-qparams cache is valid
    for one step only: the version counter alone does not prove a weight unchanged, since FSDP2 all-gathers each
    step's new values into the same unsharded tensor and keeps its version counter (measured: a stale cache
    changed the loss from the third step on)."""

    count = 0

    @classmethod
    def bump(cls, *_) -> None:
        cls.count += 1


register_optimizer_step_post_hook(_OptimizerSteps.bump)


def _weight_qparams(module: nn.Module, w: torch.Tensor, spec: FakeQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (scale, zero_point), cached until the optimizer changes the weight (micro-batches share them)."""
    key = (_OptimizerSteps.count, w.data_ptr(), w._version, w.dtype, spec)
    cached = module.__dict__.get("_fused_weight_qparams")
    if cached is None or cached[0] != key:
        cached = (key, _Kernels.run(_qparams, _weight_groups(w.detach(), spec), spec, _divisor(spec, w.device)))
        module.__dict__["_fused_weight_qparams"] = cached
    return cached[1]


class _FakeQuantizedLinearFunction(torch.autograd.Function):
    """F.linear(fake_quant(x), fake_quant(w), b); saves only x and w (a plain linear saves them too)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act_spec, weight_spec, w_scale, w_zero_point):
        x_fq = x
        if act_spec is not None:
            x_fq2, x_scale, x_zero_point = _SharedActivation.get(x, act_spec)
            x_fq = x_fq2.view(x.shape)
            ctx.x_qparams = (x_scale, x_zero_point)
        w_fq = weight
        if weight_spec is not None:
            w_fq = _Kernels.run(_fake_quantize, _weight_groups(weight, weight_spec), weight_spec, w_scale, w_zero_point)
            w_fq = w_fq.view(weight.shape)
        ctx.specs = (act_spec, weight_spec)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, w_scale, w_zero_point)
        # Under autocast F.linear runs in its dtype (bf16) whatever x's and the weight's dtype (fp32 master weights):
        # the backward products must too, as torch.amp.custom_bwd does (it needs the device type fixed up front).
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return F.linear(x_fq, w_fq, bias)

    @staticmethod
    def backward(ctx, grad_out):
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _FakeQuantizedLinearFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, weight, w_scale, w_zero_point = ctx.saved_tensors
        act_spec, weight_spec = ctx.specs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = x.reshape(-1, x.shape[-1])
        grad2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        w_fq = weight
        if weight_spec is not None:
            w2 = _weight_groups(weight, weight_spec)
            w_fq = _Kernels.run(_fake_quantize, w2, weight_spec, w_scale, w_zero_point).view(weight.shape)
        x_fq2 = x2
        if act_spec is not None:
            x_fq2 = _SharedActivation.get(x, act_spec, ctx.x_qparams)[0]

        # The products autograd takes for F.linear (mm's backward), so the sums run in the same order.
        # Each gradient in its input's dtype before the straight-through mask, as autocast's cast back would give.
        if need_x:
            grad_x = grad2.mm(w_fq).to(x.dtype)
            if act_spec is not None:
                grad_x = _Kernels.run(_straight_through, x2, act_spec, *ctx.x_qparams, grad_x)
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = grad2.t().mm(x_fq2).to(weight.dtype)
            if weight_spec is not None:
                grad_w = _weight_groups(grad_w, weight_spec)
                grad_w = _Kernels.run(_straight_through, w2, weight_spec, w_scale, w_zero_point, grad_w)
                grad_w = grad_w.view(weight.shape)
        if need_b and ctx.has_bias:
            grad_b = grad2.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def fused_linear_forward(module: FakeQuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """FakeQuantizedLinear.forward with the fused arithmetic (honours each quantizer's `enabled` flag)."""
    act_spec, weight_spec = module._fused_specs
    act, wq = module.activation_fake_quantizer, module.weight_fake_quantizer
    act_spec = act_spec if act is not None and act.enabled else None
    weight_spec = weight_spec if wq is not None and wq.enabled else None
    weight = module.weight  # read once: with a LoRA parametrization (qatune.lora) each read computes W + s B A
    if act_spec is None and weight_spec is None:
        return F.linear(x, weight, module.bias)
    w_qparams = _weight_qparams(module, weight, weight_spec) if weight_spec is not None else (None, None)
    return _FakeQuantizedLinearFunction.apply(x, weight, module.bias, act_spec, weight_spec, *w_qparams)


def is_fused(module: nn.Module) -> bool:
    return "_fused_specs" in module.__dict__


def fuse_fake_quant_(model: nn.Module) -> dict[str, str]:
    """Give every covered FakeQuantizedLinear the fused forward, in place (types, quantizers and state dict stay).

    Returns {module name: why not} for the fake-quantized linears left on torchao's own forward.
    """
    not_covered = {}
    for name, m in model.named_modules():
        if not isinstance(m, FakeQuantizedLinear) or is_fused(m):
            continue
        if type(m).forward is not FakeQuantizedLinear.forward:
            not_covered[name] = f"{type(m).__name__} has its own forward"
            continue
        try:
            specs = (
                fake_quant_spec(m.activation_fake_quantizer, "activation"),
                fake_quant_spec(m.weight_fake_quantizer, "weight"),
            )
        except ValueError as e:
            not_covered[name] = str(e)
            continue
        m._fused_specs = specs
        m.forward = partial(fused_linear_forward, m)  # an instance attribute: deepcopy and pickle keep it
    return not_covered


def unfuse_fake_quant_(model: nn.Module) -> nn.Module:
    """Back to torchao's own forward, in place."""
    for m in model.modules():
        if is_fused(m):
            for attr in ("_fused_specs", "_fused_weight_qparams", "forward"):
                m.__dict__.pop(attr, None)
    _SharedActivation.clear()
    return model
