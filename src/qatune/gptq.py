"""GPTQ: post-training quantization that rounds one weight column at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse Hessian of the layer's squared output error
(H = 2 X^T X over the calibration inputs X), so the layer's output moves less than with round-to-nearest (RTN).
Frantar et al. 2022, in the lazy-batch, Cholesky form of its reference code.

It writes torchao's own grid: the model comes out of `gptq_quantize_` with the same IntxUnpackedToInt8Tensor weights
`quantize_ptq_` gives (RTN), holding GPTQ's codes and scales instead, so a GPTQ model is evaluated, saved and
exported to vLLM, GGUF and .pte exactly like a QAT one. Each group's scale is torchao's rule (symmetric:
amax / ((qmax - qmin) / 2), amax / 7.5 for int4) on the group's weights as GPTQ has updated them when it reaches the
group's first column (`static_groups: false`, the default), or on the original weights before any update
(`static_groups: true`: llm-compressor 0.14's way, whose result it matches within 1%, benchmarks/gptq_crosscheck.py);
codes are round(w * (1 / scale)) clamped to [qmin, qmax], as torchao's quantize_affine. Updated scales won here: on
SmolLM2-135M 4w g32, perplexity 30.34 vs 34.29 static (RTN 36.03).
With an identity Hessian no error spreads and GPTQ is RTN code for code (tests/test_gptq.py).

Sequential over the decoder layers, like llm-compressor: layer i's Hessians come from the outputs of layers < i,
already quantized. 8da4w and 4w share the int4 per-group weight grid (8da4w's activations stay dynamic, calibration
runs them float); 8da8w is per-channel int8. Linears outside the decoder layers (lm_head when not skipped) and the
token embedding are rounded to nearest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

from qatune.errors import ConfigError
from qatune.fsdp import decoder_layers

logger = logging.getLogger(__name__)

# Sequences per calibration forward. It changes only float summation order, but GPTQ amplifies that layer by layer
# (batch 1 vs 8: 13% of codes differ, perplexity +0.5% in-domain on SmolLM2-135M), so it is fixed, not a knob.
CALIBRATION_BATCH = 8


@dataclass
class GPTQConfig:
    samples: int = 128  # calibration sequences, the first windows of the training data
    seq_len: int = 512  # tokens per calibration sequence
    dampening: float = 0.01  # added to H's diagonal, as a fraction of its mean (llm-compressor's dampening_frac)
    block_size: int = 128  # columns per lazy batch update (a multiple or divisor of group_size)
    static_groups: bool = False  # every group's scale from the original weights before any update (llm-compressor's
    # and AutoGPTQ's static_groups=True); false: from the weights as updated when GPTQ reaches the group

    def __post_init__(self) -> None:
        for key in ("samples", "seq_len", "block_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"quantizer.gptq.{key}={value!r}: choose an integer >= 1")
        if not isinstance(self.static_groups, bool):
            raise ConfigError(f"quantizer.gptq.static_groups={self.static_groups!r}: choose true or false")
        d = self.dampening
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < 1:
            raise ConfigError(f"quantizer.gptq.dampening={d!r}: choose a fraction in (0, 1), e.g. 0.01")


def gptq_config(section: Mapping | GPTQConfig | None) -> GPTQConfig:
    """The `quantizer.gptq:` section -> a validated GPTQConfig (one line naming an unknown key)."""
    if isinstance(section, GPTQConfig):
        return section
    section = dict(section or {})
    if unknown := sorted(set(section) - set(GPTQConfig.__dataclass_fields__)):
        raise ConfigError(
            f"unknown quantizer.gptq key(s) {unknown}; accepted: {', '.join(GPTQConfig.__dataclass_fields__)}"
        )
    return GPTQConfig(**section)


def weight_grid(q) -> tuple[int, int, int | None]:
    """(qmin, qmax, group size; None = per output channel) of the scheme's linear weights."""
    if q.scheme == "8da8w":
        return -128, 127, None
    return -8, 7, q.group_size


def group_scale(w: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """torchao's symmetric scale of each row of `w` ([out, group] -> [out]), rounded to the scale's dtype."""
    scale, _ = choose_qparams_affine(
        w, MappingType.SYMMETRIC, (1, w.shape[1]), torch.int8, qmin, qmax, zero_point_dtype=torch.int8
    )
    return scale.reshape(-1).to(dtype).float()


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w * (1.0 / scale)), qmin, qmax)  # torchao's quantize_affine


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, q, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one [out, in] weight against its inputs' Hessian [in, in] -> (int8 codes [out, in], scales
    [out, in / group]), on torchao's grid for scheme `q`. fp32 arithmetic whatever the weight's dtype."""
    qmin, qmax, group = weight_grid(q)
    W, H = weight.detach().float().clone(), hessian.float().clone()
    rows, cols = W.shape
    group = group or cols
    block = cfg.block_size
    if block % group and group % block:
        raise ConfigError(f"quantizer.gptq.block_size {block} and group_size {group}: one must divide the other")
    dead = H.diagonal() == 0  # inputs that were always zero: the weight's column does not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(cfg.dampening * H.diagonal().mean())
    # The upper Cholesky factor of H^-1: row i holds what rounding column i costs the columns after it.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // group)
    if cfg.static_groups:  # from the weights as they come in (dead columns included, as llm-compressor observes)
        original = weight.detach().float()
        for j in range(cols // group):
            scales[:, j] = group_scale(original[:, j * group : (j + 1) * group], qmin, qmax, weight.dtype)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if (
                c % group == 0 and not cfg.static_groups
            ):  # the group as updated so far (block and group nest, so this is all of it)
                updated = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                scales[:, c // group] = group_scale(updated, qmin, qmax, weight.dtype)
            s = scales[:, c // group]
            codes[:, c] = round_to_grid(W1[:, i], s, qmin, qmax)
            err = (W1[:, i] - codes[:, c] * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # the block's errors, spread over the columns after it at once
    return codes.to(torch.int8), scales


class _Captured(Exception):
    pass


def _first_layer_inputs(model: nn.Module, ids: torch.Tensor, layers: list[nn.Module]) -> list[tuple]:
    """(hidden states, keyword arguments) the first decoder layer receives, per calibration batch."""
    captured = []

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise _Captured

    device = next(model.parameters()).device
    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in ids.split(CALIBRATION_BATCH):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, batches: list[tuple]) -> list[tuple]:
    out = []
    for hidden, kwargs in batches:
        result = layer(hidden, **kwargs)
        out.append((result[0] if isinstance(result, tuple) else result, kwargs))
    return out


def _layer_hessians(layer: nn.Module, linears: dict[str, nn.Linear], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / tokens of each linear's inputs X over the calibration batches."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for name, m in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def hook(name: str):
        def accumulate(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x, alpha=2.0)
            tokens[name] += x.shape[0]

        return accumulate

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        _run_layer(layer, batches)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / max(tokens[name], 1) for name in linears}


@torch.no_grad()
def gptq_(model: nn.Module, q, ids: torch.Tensor, cfg: GPTQConfig | None = None) -> dict[str, tuple]:
    """GPTQ of every decoder-layer linear that scheme `q` quantizes, in place: each weight becomes its GPTQ-rounded
    value (codes x scales, still float). Returns {linear name: (codes, scales)}. `ids`: [samples, seq_len] tokens."""
    from qatune.quantization import linears_to_quantize

    cfg = cfg or q.gptq
    chosen, layers = linears_to_quantize(model, q), decoder_layers(model)
    names = {m: name for name, m in model.named_modules()}
    start, found = time.perf_counter(), {}
    batches = _first_layer_inputs(model, ids, layers)
    for layer in layers:
        linears = {f"{names[layer]}.{n}": m for n, m in layer.named_modules() if f"{names[layer]}.{n}" in chosen}
        hessians = _layer_hessians(layer, linears, batches)  # this layer's float weights, quantized inputs
        for name, m in linears.items():
            codes, scales = gptq_weight(m.weight, hessians[name].cpu(), q, cfg)
            group = m.in_features // scales.shape[1]
            m.weight.copy_((codes.float() * scales.repeat_interleave(group, dim=1)).to(m.weight))
            found[name] = (codes, scales)
        batches = _run_layer(layer, batches)  # the next layer sees this one quantized
    logger.info("GPTQ: %d linears in %d layers, %.1f s", len(found), len(layers), time.perf_counter() - start)
    return found


def gptq_quantize_(model: nn.Module, q, ids: torch.Tensor, cfg: GPTQConfig | None = None) -> nn.Module:
    """Post-training quantization by GPTQ, in place: torchao int weights (the same tensors as `quantize_ptq_`'s)
    holding GPTQ's codes and scales; linears outside the decoder layers and embeddings rounded to nearest."""
    from qatune.quantization import quantize_ptq_

    found = gptq_(model, q, ids, cfg)
    quantize_ptq_(model, q)  # torchao's tensors (RTN of the GPTQ-rounded weights), then GPTQ's exact codes in them
    for name, (codes, scales) in found.items():
        weight = model.get_submodule(name).weight
        weight.qdata.copy_(codes.view_as(weight.qdata))
        weight.scale.copy_(scales.view_as(weight.scale))
    return model


def calibration_from(dataset_cfg, tokenizer, cfg: GPTQConfig) -> torch.Tensor:
    """GPTQ's calibration ids from a dataset section: its first cfg.samples windows of cfg.seq_len tokens."""
    from qatune.data import build_dataset

    return calibration_ids(build_dataset(dataset_cfg, tokenizer, cfg.seq_len), cfg.samples)


def calibration_ids(dataset, samples: int) -> torch.Tensor:
    """The first `samples` sequences of a packed dataset (qatune.data.build_dataset) as [samples, seq_len] ids."""
    n = min(samples, len(dataset))
    if n < samples:
        logger.warning("GPTQ: the calibration data holds %d sequences, fewer than samples=%d; using %d", n, samples, n)
    return torch.stack([torch.as_tensor(dataset[i]["input_ids"]) for i in range(n)])
