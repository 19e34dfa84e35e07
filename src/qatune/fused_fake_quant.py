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
weight's version counter) so gradient-accumulation micro-batches skip that pass.

Forward and gradients are bit-identical to torchao's (tests/test_fused_fake_quant.py). The modules stay torchao's
`FakeQuantizedLinear` (a subclass only overrides `forward`) with their fake quantizer configs, so
`enable_fake_quant`, state dicts and QATConfig's convert work unchanged. Fake quantizers this does not cover
(range learning, static qparams, float8, asymmetric weights, ...) keep torchao's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.granularity import PerAxis, PerGroup, PerToken
from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer
from torchao.quantization.qat.linear import Int8DynActInt4WeightQATLinear
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
    if isinstance(c.granularity, PerGroup):
        return FakeQuantSpec(qmin, qmax, True, c.granularity.group_size, c.eps, c.scale_precision, c.zero_point_precision)
    if isinstance(c.granularity, PerAxis) and c.granularity.axis == 0:
        return FakeQuantSpec(qmin, qmax, True, None, c.eps, c.scale_precision, c.zero_point_precision)
    raise ValueError(f"weight fake quant granularity {c.granularity} is not per-group or per-channel")


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic, on a 2-D view (rows = tokens or weight groups, columns = the values sharing one scale)


@torch.no_grad()
def choose_qparams(x2: torch.Tensor, spec: FakeQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero_point), shape (rows, 1): torchao's choose_qparams_affine op for op, one aminmax pass."""
    min_val, max_val = torch.aminmax(x2, dim=-1, keepdim=True)
    min_val_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_val_pos = torch.max(max_val, torch.zeros_like(max_val))
    eps = spec.eps if spec.eps is not None else torch.finfo(x2.dtype).smallest_normal
    if spec.symmetric:
        max_val_pos = torch.max(-min_val_neg, max_val_pos)
        scale = max_val_pos / (float(spec.qmax - spec.qmin) / 2)
        zero_point = torch.full_like(scale, int((spec.qmax + spec.qmin + 1) / 2))
        scale = torch.clamp(scale, min=eps)
        return scale.to(spec.scale_dtype or x2.dtype), zero_point.to(spec.zero_point_dtype)
    scale = (max_val_pos - min_val_neg) / float(spec.qmax - spec.qmin)
    scale = torch.clamp(scale, min=eps)
    zero_point = spec.qmin - torch.round(min_val_neg / scale)
    zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax)
    return scale.to(spec.scale_dtype or x2.dtype), zero_point.to(spec.zero_point_dtype)


def _native_kernel_applies(x2: torch.Tensor, scale: torch.Tensor) -> bool:
    # ATen's kernel computes x * (1/scale) in fp32 and (q - zp) * scale exactly before one rounding: the same values
    # as torchao's op chain when both the input and the scale are fp32 (bf16 scales round every step in bf16).
    return x2.dtype == torch.float32 and scale.dtype == torch.float32


@torch.no_grad()
def fake_quantize(
    x2: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: FakeQuantSpec, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dequantize(quantize(x2)) and, if asked, the mask of values inside [qmin, qmax] before clamping."""
    if _native_kernel_applies(x2, scale):
        out, mask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(
            x2, scale.view(-1), zero_point.view(-1).to(torch.int32), 0, spec.qmin, spec.qmax
        )
        return out, mask if with_mask else None
    # torchao's _fake_quantize_affine, op for op (same dtypes, so the same roundings), without the autograd graph
    q = x2 * (1.0 / scale)
    q = torch.round(q) + zero_point
    mask = (q >= spec.qmin) & (q <= spec.qmax) if with_mask else None
    q = torch.clamp(q, spec.qmin, spec.qmax)
    out = q.to(x2.dtype, copy=True)
    out = out - zero_point.to(x2.dtype)
    return (out * scale).to(x2.dtype), mask


@torch.no_grad()
def straight_through_(grad: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: the gradient torchao's autograd gives through its fake quant (rounding is identity, clamping zeroes
    what fell outside the range). It multiplies by scale, then by 1/scale: not quite the identity in floating point,
    so do the same. The first product is rounded to the gradient's dtype, like torchao's dequantized tensor."""
    grad.mul_(scale)
    if not bool(mask.all()):  # asymmetric per-token activations almost never clamp: skip the pass
        grad.masked_fill_(~mask, 0)
    return grad.mul_(1.0 / scale)


# ---------------------------------------------------------------------------------------------------------------
# The fake-quantized linear


class _SharedActivation:
    """The last fake-quantized activation, reused by the next linear that reads the same tensor (q/k/v, gate/up).

    Holds a reference to the input so its memory cannot be reused while it is the key.
    """

    key: tuple | None = None
    value: tuple | None = None

    @classmethod
    def get(cls, x: torch.Tensor, spec: FakeQuantSpec, with_mask: bool) -> tuple:
        key = (x, x.data_ptr(), x.shape, x.stride(), x._version, spec, with_mask)
        if cls.key is None or not _same_key(cls.key, key):
            x2 = x.reshape(-1, x.shape[-1])
            scale, zero_point = choose_qparams(x2, spec)
            cls.key, cls.value = key, (scale, zero_point, *fake_quantize(x2, scale, zero_point, spec, with_mask))
        return cls.value

    @classmethod
    def clear(cls) -> None:
        cls.key = cls.value = None


def _same_key(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1:] == b[1:]


def _weight_qparams(module: nn.Module, spec: FakeQuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (scale, zero_point), cached until the optimizer changes the weight (micro-batches share them)."""
    w = module.weight
    key = (w.data_ptr(), w._version, w.dtype, spec)
    cached = module.__dict__.get("_fused_weight_qparams")
    if cached is None or cached[0] != key:
        cached = (key, choose_qparams(_weight_groups(w, spec), spec))
        module.__dict__["_fused_weight_qparams"] = cached
    return cached[1]


def _weight_groups(w: torch.Tensor, spec: FakeQuantSpec) -> torch.Tensor:
    group_size = min(spec.group_size or w.shape[-1], w.shape[-1])  # torchao clips the group size to in_features
    return w.reshape(-1, group_size)


class _FakeQuantizedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, act_spec, weight_spec, w_scale, w_zero_point):
        x_fq = x
        if act_spec is not None:
            x_fq = _SharedActivation.get(x, act_spec, with_mask=False)[2].view(x.shape)
        w_fq = weight
        if weight_spec is not None:
            w_fq = fake_quantize(_weight_groups(weight, weight_spec), w_scale, w_zero_point, weight_spec, False)[0]
            w_fq = w_fq.view(weight.shape)
        ctx.specs = (act_spec, weight_spec)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, w_scale, w_zero_point)
        return F.linear(x_fq, w_fq, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, w_scale, w_zero_point = ctx.saved_tensors
        act_spec, weight_spec = ctx.specs
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = x.reshape(-1, x.shape[-1])
        grad2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None

        w_fq, w_mask = weight, None
        if weight_spec is not None:
            w_fq, w_mask = fake_quantize(_weight_groups(weight, weight_spec), w_scale, w_zero_point, weight_spec, need_w)
            w_fq = w_fq.view(weight.shape)
        x_fq2, x_mask = x2, None
        if act_spec is not None:  # q/k/v (gate/up) share this too: their backward passes run one after another
            x_scale, _, x_fq2, x_mask = _SharedActivation.get(x, act_spec, with_mask=need_x)

        # The same products autograd takes for F.linear (mm backward), so the sums run in the same order.
        if need_x:
            grad_x = grad2.mm(w_fq)
            if act_spec is not None:
                straight_through_(grad_x, x_mask, x_scale)
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = grad2.t().mm(x_fq2)
            if weight_spec is not None:
                groups = _weight_groups(grad_w, weight_spec)
                straight_through_(groups, w_mask, w_scale)
        if need_b and ctx.has_bias:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def fused_linear_forward(module: FakeQuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """FakeQuantizedLinear.forward with the fused arithmetic (honours each quantizer's `enabled` flag)."""
    act, wq = module.activation_fake_quantizer, module.weight_fake_quantizer
    act_spec = module._fused_specs[0] if act is not None and act.enabled else None
    weight_spec = module._fused_specs[1] if wq is not None and wq.enabled else None
    if act_spec is None and weight_spec is None:
        return F.linear(x, module.weight, module.bias)
    w_scale = w_zero_point = None
    if weight_spec is not None:
        w_scale, w_zero_point = _weight_qparams(module, weight_spec)
    return _FakeQuantizedLinearFunction.apply(
        x, module.weight, module.bias, act_spec, weight_spec, w_scale, w_zero_point
    )


class FusedFakeQuantizedLinear(FakeQuantizedLinear):
    """torchao's FakeQuantizedLinear (same quantizers, same state dict, same convert) with the fused forward."""

    forward = fused_linear_forward


class FusedInt8DynActInt4WeightQATLinear(Int8DynActInt4WeightQATLinear):
    """The legacy (torchtune-form) QAT linear with the fused forward."""

    forward = fused_linear_forward


FUSED_CLASSES = {
    FakeQuantizedLinear: FusedFakeQuantizedLinear,
    Int8DynActInt4WeightQATLinear: FusedInt8DynActInt4WeightQATLinear,
}
UNFUSED_CLASSES = {fused: plain for plain, fused in FUSED_CLASSES.items()}


def fuse_fake_quant_(model: nn.Module) -> dict[str, str]:
    """Give every covered fake-quantized linear the fused forward, in place.

    Returns {module name: why not} for the fake-quantized linears left on torchao's own forward.
    """
    not_covered = {}
    for name, m in model.named_modules():
        if not isinstance(m, FakeQuantizedLinear) or type(m) in UNFUSED_CLASSES:
            continue
        if type(m) not in FUSED_CLASSES:
            not_covered[name] = f"{type(m).__name__} is not a FakeQuantizedLinear the fused path knows"
            continue
        try:
            specs = (
                fake_quant_spec(m.activation_fake_quantizer, "activation"),
                fake_quant_spec(m.weight_fake_quantizer, "weight"),
            )
        except ValueError as e:
            not_covered[name] = str(e)
            continue
        m.__class__ = FUSED_CLASSES[type(m)]
        m._fused_specs = specs
    return not_covered


def unfuse_fake_quant_(model: nn.Module) -> nn.Module:
    """Back to torchao's own forward, in place (the same modules and quantizers)."""
    for m in model.modules():
        if type(m) in UNFUSED_CLASSES:
            m.__class__ = UNFUSED_CLASSES[type(m)]
            m.__dict__.pop("_fused_specs", None)
            m.__dict__.pop("_fused_weight_qparams", None)
    _SharedActivation.clear()
    return model
