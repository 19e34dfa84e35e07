"""GPTQ on torchao's grid: RTN exactly when no error can spread, a lower layer output error than RTN, a brute-force
optimum on a layer small enough to search, torchao tensors holding its codes."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

from qatune.errors import ConfigError
from qatune.gptq import GPTQConfig, gptq_, gptq_quantize_, gptq_weight, group_scale, round_to_grid
from qatune.quantization import quantize_ptq_, resolve_quantizer


def rtn(w: torch.Tensor, group: int, qmin: int = -8, qmax: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    groups = w.reshape(w.shape[0], -1, group)
    scales = torch.stack([group_scale(groups[:, j], qmin, qmax, w.dtype) for j in range(groups.shape[1])], 1)
    codes = round_to_grid(groups, scales[..., None], qmin, qmax)
    return codes.reshape(w.shape).to(torch.int8), scales


def test_with_an_identity_hessian_gptq_is_torchaos_round_to_nearest():
    torch.manual_seed(0)
    linear = nn.Linear(128, 16, bias=False)
    q = resolve_quantizer({"scheme": "4w", "group_size": 32})
    codes, scales = gptq_weight(linear.weight, torch.eye(128), q, GPTQConfig(block_size=64))
    quantize_ptq_(linear, q)  # torchao's own RTN
    assert torch.equal(codes, linear.weight.qdata)
    assert torch.equal(scales, linear.weight.scale.reshape(scales.shape))


@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_lowers_the_layer_output_error_against_rtn(static_groups):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(2048, 128) @ torch.randn(128, 128) * 0.3  # correlated inputs: where GPTQ can help
    H = 2 * x.T @ x / x.shape[0]
    q = resolve_quantizer({"scheme": "4w", "group_size": 32})
    codes, scales = gptq_weight(w, H, q, GPTQConfig(static_groups=static_groups))
    if static_groups:  # the scales are RTN's: set by the original weights
        assert torch.equal(scales, rtn(w, 32)[1])
    dequant = codes.float() * scales.repeat_interleave(32, 1)
    rtn_codes, rtn_scales = rtn(w, 32)
    rtn_dequant = rtn_codes.float() * rtn_scales.repeat_interleave(32, 1)
    gptq_err = ((x @ (dequant - w).T) ** 2).mean()
    rtn_err = ((x @ (rtn_dequant - w).T) ** 2).mean()
    assert gptq_err < 0.6 * rtn_err, (gptq_err, rtn_err)
    assert codes.min() >= -8 and codes.max() <= 7


def output_error(codes: torch.Tensor, s: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    d = codes * s - w  # (w_q - w) H (w_q - w)^T: the layer's squared output error over the calibration inputs
    return ((d @ H) * d).sum(-1)


def test_gptq_on_a_tiny_layer_against_the_brute_force_optimum():
    """One group of 4 inputs (one scale, set by the group's amax before any update: RTN's): all 16^4 int4 code
    vectors searched for the least output error (w - w_q) H (w - w_q)^T. GPTQ is greedy, so it need not reach the
    optimum, but over random layers it must close most of RTN's gap to it."""
    torch.manual_seed(0)
    q = SimpleNamespace(scheme="4w", group_size=4)
    grid = torch.tensor(list(itertools.product(range(-8, 8), repeat=4)), dtype=torch.float32)
    gap_gptq = gap_rtn = 0.0
    for _ in range(20):
        w = torch.randn(1, 4)
        x = torch.randn(256, 4) @ torch.randn(4, 4)
        H = 2 * x.T @ x / x.shape[0]
        codes, scales = gptq_weight(w, H, q, GPTQConfig(block_size=4, dampening=1e-6))
        s = scales[0, 0]
        rtn_codes = round_to_grid(w[0], s, -8, 7)

        best = output_error(grid, s, w, H).min()
        gptq_err, rtn_err = output_error(codes.float(), s, w, H), output_error(rtn_codes[None], s, w, H)
        assert best <= gptq_err + 1e-6 and best <= rtn_err + 1e-6
        gap_gptq += (gptq_err - best).item()
        gap_rtn += (rtn_err - best).item()
    assert gap_gptq < 0.5 * gap_rtn, (gap_gptq, gap_rtn)


@pytest.mark.parametrize("scheme", ["8da4w", "4w"])
def test_gptq_quantize_gives_torchao_tensors_with_gptqs_codes_and_lowers_the_loss(scheme):
    model = make_tiny_llama(layers=2).eval()
    q = resolve_quantizer({"scheme": scheme, "group_size": 32, "skip": ["lm_head"], "gptq": {"samples": 8}})
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (16, 64))
    float_model = make_tiny_llama(layers=2).eval()
    rtn_model = quantize_ptq_(make_tiny_llama(layers=2).eval(), q)
    found = gptq_(make_tiny_llama(layers=2).eval(), q, ids)
    model = gptq_quantize_(model, q, ids)
    for name, (codes, scales) in found.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight.qdata, codes.view_as(weight.qdata))
        assert torch.equal(weight.scale, scales.view_as(weight.scale))
    assert len(found) == 2 * 7
    # The codes differ from RTN's and the model's output is closer to the float model's.
    name = next(iter(found))
    assert not torch.equal(rtn_model.get_submodule(name).weight.qdata, model.get_submodule(name).weight.qdata)
    with torch.no_grad():
        ref = float_model(ids).logits
        gptq_err = (model(ids).logits - ref).pow(2).mean()
        rtn_err = (rtn_model(ids).logits - ref).pow(2).mean()
    assert gptq_err < rtn_err, (gptq_err, rtn_err)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"samples": 0}, "quantizer.gptq.samples=0"),
        ({"dampening": 2}, "quantizer.gptq.dampening=2"),
        ({"sample": 3}, "unknown quantizer.gptq key(s) ['sample']"),
    ],
)
def test_bad_gptq_sections_give_one_line_errors(section, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_quantizer({"scheme": "4w", "gptq": section})
