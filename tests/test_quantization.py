"""Quantization schemes on a tiny random Llama: fake quant == convert == PTQ, both config forms, skip, tied
embeddings, enable/disable, and checkpoints that plain transformers + torchao load back bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import adamw_steps, make_tiny_llama
from omegaconf import OmegaConf
from torch import nn
from torchao.quantization.qat import FakeQuantizedLinear, Int8DynActInt4WeightQATQuantizer
from torchao.utils import TorchAOBaseTensor

from qatune.quantization import (
    QuantScheme,
    convert_to_int4,
    enable_fake_quant,
    fake_quantize_,
    float_linear_names,
    quantize_ptq_,
    quantized_linear_names,
    resolve_quantizer,
    save_quantized,
)

N_LINEARS = 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
SCHEME_CASES = [("8da4w", g) for g in (32, 64, 128, 256)] + [("4w", g) for g in (32, 64, 128, 256)] + [("8da8w", 32)]


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("scheme,group_size", SCHEME_CASES)
def test_fake_quantized_forward_equals_converted_forward(tiny_llama, scheme, group_size):
    q = QuantScheme(scheme=scheme, group_size=group_size)
    float_logits = logits(tiny_llama)
    fake_quantize_(tiny_llama, q)
    assert len(quantized_linear_names(tiny_llama)) == N_LINEARS  # lm_head included
    fake_logits = logits(tiny_llama)
    assert not torch.equal(fake_logits, float_logits)  # the fake quant really acts
    convert_to_int4(tiny_llama, q)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in tiny_llama.modules())
    assert isinstance(tiny_llama.model.layers[1].mlp.down_proj.weight, TorchAOBaseTensor)
    assert torch.equal(logits(tiny_llama), fake_logits)  # exact: convert keeps the trained numerics


def test_fake_quant_error_is_the_size_one_expects(tiny_llama):
    # Sanity check that the schemes are what their names say: int4 moves logits far more than int8 (measured on this
    # model: 8da8w 2.1%, 8da4w g32 22.5%, g256 27.5% relative L2), and bigger groups lose more.
    float_logits = logits(tiny_llama)
    errors = {}
    for scheme, group_size in [("8da8w", 32), ("8da4w", 32), ("8da4w", 256)]:
        model = make_tiny_llama()
        fake_quantize_(model, QuantScheme(scheme=scheme, group_size=group_size))
        errors[scheme, group_size] = ((logits(model) - float_logits).norm() / float_logits.norm()).item()
    assert 5 * errors["8da8w", 32] < errors["8da4w", 32] < errors["8da4w", 256] < 0.5


@pytest.mark.parametrize("group_size", [32, 256])
def test_legacy_quantizer_gives_identical_logits(group_size):
    qatconfig_model, legacy_model = make_tiny_llama(), make_tiny_llama()
    fake_quantize_(qatconfig_model, QuantScheme(group_size=group_size))
    q_legacy = resolve_quantizer(
        {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": group_size}
    )
    assert isinstance(q_legacy.legacy, Int8DynActInt4WeightQATQuantizer)
    fake_quantize_(legacy_model, q_legacy)
    assert type(legacy_model.lm_head).__name__ == "Int8DynActInt4WeightQATLinear"
    fake_logits = logits(legacy_model)
    assert torch.equal(fake_logits, logits(qatconfig_model))
    convert_to_int4(legacy_model, q_legacy)
    assert torch.equal(logits(legacy_model), fake_logits)


@pytest.mark.parametrize("legacy", [False, True])
def test_skip_keeps_modules_plain_float(tiny_llama, legacy):
    skip = ["lm_head", "model.layers.0.mlp.*"]
    kept = ["lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    before = {name: tiny_llama.get_submodule(name).weight.detach().clone() for name in kept}
    section = {"_component_": "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer", "groupsize": 32}
    q = resolve_quantizer({**section, "skip": skip} if legacy else {"skip": skip})
    for step in (fake_quantize_, convert_to_int4):
        step(tiny_llama, q)
        assert sorted(float_linear_names(tiny_llama)) == sorted(kept)
        assert len(quantized_linear_names(tiny_llama)) == N_LINEARS - len(kept)
        for name in kept:
            module = tiny_llama.get_submodule(name)
            assert type(module) is nn.Linear and type(module.weight) is nn.Parameter
            assert torch.equal(module.weight, before[name])


def test_ptq_honours_skip_and_records_it_for_transformers(tiny_llama):
    quantize_ptq_(tiny_llama, QuantScheme(scheme="4w", skip=["*.v_proj"]))
    assert float_linear_names(tiny_llama) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert tiny_llama.config.quantization_config.modules_to_not_convert == float_linear_names(tiny_llama)


@pytest.mark.parametrize("scheme,group_size", [("8da4w", 32), ("4w", 128), ("8da8w", 32)])
def test_ptq_equals_convert_of_untrained_fake_quant(scheme, group_size):
    q = QuantScheme(scheme=scheme, group_size=group_size)
    ptq = quantize_ptq_(make_tiny_llama(), q)
    qat = convert_to_int4(fake_quantize_(make_tiny_llama(), q), q)
    assert torch.equal(logits(ptq), logits(qat))


@pytest.mark.parametrize("scheme,group_size", [("8da4w", 32), ("4w", 64)])
def test_range_learning_trains_the_scales_and_convert_uses_them(scheme, group_size):
    q = QuantScheme(scheme=scheme, group_size=group_size, range_learning=True)
    model = fake_quantize_(make_tiny_llama(), q)
    wq = model.model.layers[1].mlp.down_proj.weight_fake_quantizer
    assert isinstance(wq.scale, nn.Parameter) and wq.scale.shape == (256, 512 // group_size)
    # Scales start where PTQ puts them, so the untrained model is PTQ exactly.
    ptq = quantize_ptq_(make_tiny_llama(), QuantScheme(scheme=scheme, group_size=group_size))
    assert torch.equal(logits(model), logits(ptq))
    start = wq.scale.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(wq.scale.detach(), start)
    fake_logits = logits(model)
    learned = wq.scale.detach().clone()
    convert_to_int4(model, q)
    w = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w.scale.reshape(learned.shape), learned)  # the int4 checkpoint holds the learned scales
    assert torch.equal(logits(model), fake_logits)
    with pytest.raises(ValueError, match="range_learning needs the qatune form"):
        resolve_quantizer({"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer",
                           "range_learning": True})  # fmt: skip


def test_tied_embeddings_float_embedding_int4_lm_head(tiny_llama_tied):
    model = tiny_llama_tied
    embedding = model.get_input_embeddings().weight.detach().clone()
    embedded_before = model.get_input_embeddings()(IDS)
    q = QuantScheme()
    fake_quantize_(model, q)
    # Prepare keeps the tie (one trainable Parameter) and the embedding lookup stays float.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.get_input_embeddings()(IDS), embedded_before)
    fake_logits = logits(model)
    convert_to_int4(model, q)
    assert model.config.tie_word_embeddings is False
    assert isinstance(model.lm_head.weight, TorchAOBaseTensor)
    assert type(model.model.embed_tokens.weight) is nn.Parameter
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert torch.equal(logits(model), fake_logits)


def test_tied_embeddings_skipping_lm_head_keeps_the_tie(tiny_llama_tied):
    q = QuantScheme(skip=["lm_head"])
    convert_to_int4(fake_quantize_(tiny_llama_tied, q), q)
    assert tiny_llama_tied.config.tie_word_embeddings is True
    assert tiny_llama_tied.lm_head.weight is tiny_llama_tied.model.embed_tokens.weight


@pytest.mark.parametrize("legacy", [False, True])
def test_enable_fake_quant_switches_numerics(tiny_llama, legacy):
    float_logits = logits(tiny_llama)
    section = {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 64}
    fake_quantize_(tiny_llama, resolve_quantizer(section if legacy else {"group_size": 64}))
    fake_logits = logits(tiny_llama)
    assert not torch.equal(fake_logits, float_logits)
    enable_fake_quant(tiny_llama, False)
    assert torch.equal(logits(tiny_llama), float_logits)  # off is exactly the float model
    enable_fake_quant(tiny_llama, True)
    assert torch.equal(logits(tiny_llama), fake_logits)


def test_delayed_fake_quant_starts_float_and_convert_requires_it_on(tiny_llama):
    float_logits = logits(tiny_llama)
    q = resolve_quantizer({"fake_quant_after_n_steps": 10})
    fake_quantize_(tiny_llama, q)
    assert torch.equal(logits(tiny_llama), float_logits)
    with pytest.raises(ValueError, match="switched off"):
        convert_to_int4(tiny_llama, q)
    enable_fake_quant(tiny_llama, True)
    fake_logits = logits(tiny_llama)
    assert torch.equal(logits(convert_to_int4(tiny_llama, q)), fake_logits)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.odd = nn.Linear(96, 64)  # 96 is divisible by 32 but not by 64
        self.even = nn.Linear(64, 8)

    def forward(self, x):
        return self.even(self.odd(x))


@pytest.mark.parametrize("legacy", [False, True])
def test_group_size_not_dividing_in_features_warns_and_stays_float(legacy):
    model = TwoLinears()
    section = {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 64}
    q = resolve_quantizer(section if legacy else {"group_size": 64})
    with pytest.warns(UserWarning, match=r"group_size 64 does not divide in_features of 1 of 2 .*odd: in_features=96"):
        fake_quantize_(model, q)
    assert quantized_linear_names(model) == ["even"] and type(model.odd) is nn.Linear
    fake_out = model(torch.randn(3, 96, generator=torch.Generator().manual_seed(0)))
    convert_to_int4(model, q)  # a plain nn.Module (no HF config) converts too
    assert torch.equal(model(torch.randn(3, 96, generator=torch.Generator().manual_seed(0))), fake_out)


def test_8da8w_is_per_channel_and_ignores_group_size():
    model = TwoLinears()
    fake_quantize_(model, QuantScheme(scheme="8da8w", group_size=256))  # 256 divides neither: no matter
    assert quantized_linear_names(model) == ["odd", "even"]


def test_misuse_gives_clear_errors(tiny_llama):
    with pytest.raises(ValueError, match="no fake-quantized layers"):
        enable_fake_quant(tiny_llama, True)
    with pytest.raises(ValueError, match="no fake-quantized layers to convert"):
        convert_to_int4(tiny_llama, QuantScheme())
    with pytest.raises(ValueError, match="skip pattern 'lmhead' matches no linear layer"):
        fake_quantize_(tiny_llama, QuantScheme(skip=["lmhead"]))
    fake_quantize_(tiny_llama, QuantScheme())
    with pytest.raises(ValueError, match="already fake-quantized"):
        fake_quantize_(tiny_llama, QuantScheme())
    with pytest.raises(ValueError, match="still fake-quantized"):
        save_quantized(tiny_llama, None, "/nonexistent/never-written")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(make_tiny_llama(), None, "/nonexistent/never-written")


def test_resolve_quantizer_forms():
    assert resolve_quantizer(None) == QuantScheme()
    q = resolve_quantizer(OmegaConf.create({"scheme": "4w", "group_size": 128, "skip": ["lm_head"]}))
    assert (q.scheme, q.group_size, q.skip, q.legacy) == ("4w", 128, ["lm_head"], None)
    legacy = resolve_quantizer(
        OmegaConf.create({"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 256})
    )
    assert (legacy.scheme, legacy.group_size, legacy.legacy.groupsize) == ("8da4w", 256, 256)
    default_legacy = resolve_quantizer(
        {"_component_": "torchao.quantization.qat.linear.Int8DynActInt4WeightQATQuantizer"}
    )
    assert default_legacy.group_size == 256  # torchao's default groupsize


@pytest.mark.parametrize(
    "section,message",
    [
        ({"scheme": "int4"}, r"scheme 'int4' is not supported; use one of 8da4w, 4w, 8da8w"),
        ({"group_size": 48}, r"group_size 48 is not supported; use one of \(32, 64, 128, 256\)"),
        ({"group_size": "32"}, r"group_size '32' is not supported"),
        ({"groupsize": 32}, r"unknown quantizer key\(s\) \['groupsize'\]; accepted: scheme, group_size"),
        ({"skip": "lm_head"}, r"skip must be a list of module-name patterns"),
        ({"fake_quant_after_n_steps": -1}, r"fake_quant_after_n_steps must be an integer >= 0, not -1"),
        ({"_component_": "torch.optim.AdamW"}, r"'torch.optim.AdamW' is not a supported torchao QAT quantizer"),
        (
            {"_component_": "torchao.quantization.qat.Int4WeightOnlyQATQuantizer"},
            r"'torchao.quantization.qat.Int4WeightOnlyQATQuantizer' is not a supported",
        ),
        ({"_component_": "torchao.nope.Quantizer"}, r"'torchao.nope.Quantizer' is not a supported"),
        (
            {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "group_size": 32},
            r"bad arguments \['group_size'\] for quantizer",
        ),
        (
            {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 100},
            r"group_size 100 is not supported",
        ),
        (
            {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "scales_precision": "bf16"},
            r"scales_precision='bf16' is not supported; leave it at torch.float32",
        ),
        ("8da4w", r"quantizer must be a mapping"),
    ],
)
def test_bad_quantizer_sections_give_one_line_errors(section, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_quantizer(section)
    assert "\n" not in str(error.value)


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    assert "qatune" not in sys.modules
    with torch.no_grad():
        logits = model(torch.load(sys.argv[2])).logits
    quantized = sorted(n for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ == "IntxUnpackedToInt8Tensor")
    torch.save({"logits": logits, "quantized": quantized, "vocab": len(tokenizer),
                "tied": model.lm_head.weight is model.model.embed_tokens.weight}, sys.argv[3])
    """
)


def load_in_fresh_process(out, ids: torch.Tensor, tmp_path) -> dict:
    """Load `out` with plain transformers + torchao in a process that never imports qatune; its outputs on `ids`."""
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "loaded.pt")],
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "loaded.pt")


@pytest.mark.parametrize(
    "tied,scheme,skip", [(False, "8da4w", []), (True, "8da4w", []), (False, "4w", ["lm_head", "*.0.*.o_proj"])]
)
def test_saved_checkpoint_loads_in_plain_transformers(tmp_path, tiny_tokenizer, tied, scheme, skip):
    model = make_tiny_llama(tie_word_embeddings=tied)
    q = QuantScheme(scheme=scheme, skip=skip)
    convert_to_int4(fake_quantize_(model, q), q)
    expected = logits(model)
    out = save_quantized(model, tiny_tokenizer, tmp_path / "int4")
    assert sorted(os.listdir(tmp_path)) == ["int4"]  # atomic: no temp dir left beside it
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    loaded = load_in_fresh_process(out, IDS, tmp_path)
    assert torch.equal(loaded["logits"], expected)
    assert loaded["quantized"] == sorted(quantized_linear_names(model))
    assert loaded["vocab"] == len(tiny_tokenizer) and loaded["tied"] is False


def test_bf16_fake_quant_equals_convert_and_ptq():
    q = QuantScheme(group_size=64)
    model = fake_quantize_(make_tiny_llama().to(torch.bfloat16), q)
    fake_logits = logits(model)
    assert fake_logits.dtype == torch.bfloat16
    assert torch.equal(logits(convert_to_int4(model, q)), fake_logits)
    assert torch.equal(logits(quantize_ptq_(make_tiny_llama().to(torch.bfloat16), q)), fake_logits)


@pytest.mark.slow
def test_smollm2_both_forms_convert_exactly_and_round_trip(tmp_path, smollm2_dir):
    """The real tied-embedding SmolLM2-135M: legacy == QATConfig after prepare, convert exact, reload exact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    q = QuantScheme(group_size=32)
    legacy = resolve_quantizer(
        {"_component_": "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer", "groupsize": 32}
    )
    model = fake_quantize_(AutoModelForCausalLM.from_pretrained(smollm2_dir), q)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fake_logits = logits(model, ids)
    assert torch.equal(
        logits(fake_quantize_(AutoModelForCausalLM.from_pretrained(smollm2_dir), legacy), ids), fake_logits
    )
    convert_to_int4(model, q)
    assert torch.equal(logits(model, ids), fake_logits)
    out = save_quantized(model, AutoTokenizer.from_pretrained(smollm2_dir), tmp_path / "int4")
    assert torch.equal(load_in_fresh_process(out, ids, tmp_path)["logits"], fake_logits)


# ------------------------------------------------------------------------------------------ quantized embeddings

EMBEDDING_CASES = [(s, e) for s in ("8da4w", "4w", "8da8w") for e in ("int4", "int8")]


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("scheme", "embedding"), EMBEDDING_CASES)
def test_quantized_embedding_trains_and_converts_to_the_same_codes(scheme, embedding, tied, tmp_path):
    """prepare -> train -> convert with a fake-quantized embedding: converted == fake-quantized bit for bit, equal
    to PTQ of the trained float weights, and the HF checkpoint reloads to the same logits."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.qat import FakeQuantizedEmbedding

    q = resolve_quantizer({"scheme": scheme, "group_size": 32, "embedding": embedding})
    model = fake_quantize_(make_tiny_llama(tie_word_embeddings=tied), q)
    assert isinstance(model.model.embed_tokens, FakeQuantizedEmbedding)
    before = model.model.embed_tokens.weight.detach().clone()
    adamw_steps(model, IDS, steps=2)
    assert not torch.equal(model.model.embed_tokens.weight, before)  # the straight-through gradient reaches it
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # prepare keeps the tie
    trained = logits(model)
    float_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # the lookup reads the fake-quantized table: float embedding + the same fake-quantized linears differ
    float_embedding = fake_quantize_(make_tiny_llama(tie_word_embeddings=tied), QuantScheme(scheme=scheme))
    float_embedding.load_state_dict(float_weights)
    assert not torch.equal(logits(float_embedding), trained)

    convert_to_int4(model, q)
    weight = model.model.embed_tokens.weight
    assert isinstance(weight, IntxUnpackedToInt8Tensor) and str(weight.target_dtype) == f"torch.{embedding}"
    assert tuple(weight.block_size) == (1, 32) and not torch.any(weight.zero_point)  # symmetric, groups of 32
    assert torch.equal(logits(model), trained)
    ptq = make_tiny_llama(tie_word_embeddings=tied)
    ptq.load_state_dict(float_weights)
    assert torch.equal(logits(quantize_ptq_(ptq, q)), trained)
    save_quantized(model, None, tmp_path / "int4")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int4")
    assert isinstance(loaded.model.embed_tokens.weight, IntxUnpackedToInt8Tensor)
    assert torch.equal(logits(loaded), trained)


@pytest.mark.parametrize("embedding", ["int4", "int8"])
def test_a_quantized_tied_embedding_with_a_float_lm_head_saves_a_checkpoint_transformers_loads(
    embedding, tmp_path, tiny_tokenizer
):
    """Tied model, int embedding, lm_head kept float (the configs' default skip): the saved config must not say
    tie_word_embeddings, else transformers' tie_weights fails (aten.equal on torchao's int tensor)."""
    q = resolve_quantizer({"scheme": "8da4w", "group_size": 32, "embedding": embedding, "skip": ["lm_head"]})
    model = fake_quantize_(make_tiny_llama(tie_word_embeddings=True), q)
    adamw_steps(model, IDS, steps=2)
    trained = logits(model)
    convert_to_int4(model, q)
    assert model.config.tie_word_embeddings is False and not _is_quantized(model.lm_head)
    out = save_quantized(model, tiny_tokenizer, tmp_path / "int4")
    loaded = load_in_fresh_process(out, IDS, tmp_path)
    assert torch.equal(loaded["logits"], trained) and loaded["tied"] is False


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module.weight, TorchAOBaseTensor)


def test_enable_fake_quant_switches_the_embedding_too():
    q = QuantScheme(embedding="int4", fake_quant_after_n_steps=5)
    model = fake_quantize_(make_tiny_llama(), q)
    table = model.model.embed_tokens.weight
    off = model.model.embed_tokens(IDS)
    assert torch.equal(off, table[IDS])  # delayed fake quant: the plain lookup
    enable_fake_quant(model, True)
    on = model.model.embed_tokens(IDS)
    scale = table.detach().reshape(512, -1, 32).abs().amax(-1) / 7.5  # int4 symmetric: amax / ((7 - -8) / 2)
    codes = on.reshape(*IDS.shape, -1, 32) / scale[IDS].unsqueeze(-1)
    assert not torch.equal(on, off) and torch.allclose(codes, codes.round(), atol=1e-4)  # values on the int4 grid


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"embedding": "int2"}, "quantizer embedding 'int2' is not one of none, int8, int4"),
        ({"embedding": "int4", "embedding_group_size": 48}, "quantizer embedding_group_size 48 is not supported"),
    ],
)
def test_bad_embedding_settings_give_one_line_errors(section, message):
    with pytest.raises(ValueError, match=message) as error:
        resolve_quantizer(section)
    assert "\n" not in str(error.value)


def test_an_embedding_group_size_not_dividing_hidden_size_is_refused_from_config_json(tmp_path):
    from qatune.errors import ConfigError
    from qatune.quantization import check_quantizer_fits

    make_tiny_llama().config.save_pretrained(tmp_path)  # hidden_size 256: no weights written
    check_quantizer_fits(QuantScheme(embedding="int8", embedding_group_size=256), str(tmp_path))
    config = make_tiny_llama().config
    config.hidden_size = 96
    config.save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"embedding_group_size 64 does not divide model.embed_tokens's embedding_dim 96; use one of \[32\]",
    ):
        check_quantizer_fits(QuantScheme(embedding="int8", embedding_group_size=64), str(tmp_path))
