"""The memory planner: transformers' own parameter counts, sharding, checkpointing, fit/advice, and the activation
formulas checked against the tensors autograd really saves (tiny Llama, real CPU forward)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from qatune.errors import ConfigError
from qatune.measure import current_memory, peak_memory
from qatune.planner import GB, KNOWN_ARCHITECTURES, estimate_from_config, format_plan, model_stats, plan_memory

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"


@pytest.mark.parametrize("hub_id", sorted(KNOWN_ARCHITECTURES))
def test_param_count_is_transformers_meta_count(hub_id):
    from transformers import AutoModelForCausalLM

    from qatune.planner import load_architecture

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_architecture(hub_id))
    expected = sum(p.numel() for p in model.parameters())
    before = current_memory()
    plan, peak = peak_memory(lambda: plan_memory(hub_id, num_gpus=8, batch_size=2))
    assert peak - before < 2**30  # planned on meta: real weights from 1B up would not fit
    assert plan["params"] == expected
    assert plan["fake_quant"] == "torchao QATConfig prepare on meta"


@pytest.mark.parametrize(
    "hub_id, published",
    [
        (LLAMA3_8B, 8_030_261_248),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008),
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("meta-llama/Llama-3.2-1B-Instruct", 1_235_814_400),
        ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ],
)
def test_param_count_matches_published(hub_id, published):
    assert plan_memory(hub_id)["params"] == published


def test_every_shipped_config_plans():
    from qatune import registry
    from qatune.config import load_yaml

    for name in registry.list_recipes()["qat_recipe"]:
        cfg = load_yaml(registry.find_config(name))
        plan = estimate_from_config(cfg, num_gpus=8)
        assert plan["strategy"] == cfg.distributed.strategy and plan["params"] > 100e6, name
        assert estimate_from_config(cfg, num_gpus=1)["strategy"] == "single"


def test_fsdp2_shards_and_ddp_does_not():
    one = plan_memory(LLAMA3_8B, num_gpus=1, strategy="single")["bytes"]
    fsdp = plan_memory(LLAMA3_8B, num_gpus=8, strategy="fsdp2")["bytes"]
    ddp = plan_memory(LLAMA3_8B, num_gpus=8, strategy="ddp")["bytes"]
    params = plan_memory(LLAMA3_8B)["params"]
    assert fsdp["optimizer"] == pytest.approx(one["optimizer"] / 8) == pytest.approx(8 * params / 8)
    assert ddp["optimizer"] == one["optimizer"] == 8 * params  # AdamW: two fp32 states
    assert ddp["weights"] == one["weights"] and ddp["grads"] == 2 * one["grads"]  # + DDP's buckets
    assert fsdp["total"] < ddp["total"] / 3
    sixteen = plan_memory(LLAMA3_8B, num_gpus=16, strategy="fsdp2")["bytes"]
    assert sixteen["optimizer"] == pytest.approx(fsdp["optimizer"] / 2)
    assert sixteen["activations"] == fsdp["activations"]  # data parallel: activations are per GPU


def test_activation_checkpointing_lowers_activations():
    on = plan_memory(LLAMA3_8B, num_gpus=8, batch_size=2, activation_checkpointing=True)
    off = plan_memory(LLAMA3_8B, num_gpus=8, batch_size=2, activation_checkpointing=False)
    assert on["bytes"]["activations"] < off["bytes"]["activations"] / 5
    assert on["bytes"]["activations_without_ac"] == off["bytes"]["activations"]
    assert on["bytes"]["weights"] == off["bytes"]["weights"]
    # Fake quant keeps unsharded weight copies per layer: without checkpointing that is most of QAT's extra memory.
    plain = plan_memory(LLAMA3_8B, num_gpus=8, batch_size=2, activation_checkpointing=False, qat=False)
    assert off["bytes"]["activations"] - plain["bytes"]["activations"] > 30 * GB
    assert plain["bytes"]["fake_quant"] == 0


def test_does_not_fit_gives_advice():
    plan = plan_memory(LLAMA3_8B, num_gpus=1, batch_size=8, activation_checkpointing=False)
    assert not plan["fits"]
    assert plan["total_gb"] > 80
    [gpus] = [int(a.split(" on ")[1].split()[0]) for a in plan["advice"] if a.startswith("use FSDP2 on")]
    # Following the advice fits; half as many GPUs would not (the advice is the smallest power of two).
    assert plan_memory(LLAMA3_8B, num_gpus=gpus, batch_size=8, activation_checkpointing=True)["fits"]
    assert not plan_memory(LLAMA3_8B, num_gpus=gpus // 2, batch_size=8, activation_checkpointing=True)["fits"]

    no_ac = plan_memory(LLAMA3_8B, num_gpus=8, batch_size=6, activation_checkpointing=False)
    assert not no_ac["fits"] and len(no_ac["advice"]) == 1  # checkpointing alone is enough
    assert no_ac["advice"][0].startswith("enable activation checkpointing")
    assert plan_memory(LLAMA3_8B, num_gpus=8, batch_size=6, activation_checkpointing=True)["fits"]

    big_batch = plan_memory(LLAMA3_8B, num_gpus=8, batch_size=16, seq_len=4096, activation_checkpointing=False)
    assert not big_batch["fits"]
    advice = " | ".join(big_batch["advice"])
    assert "reduce batch_size to" in advice and "with activation checkpointing" in advice, advice
    [smaller] = [int(a.split()[3]) for a in big_batch["advice"] if a.startswith("reduce batch_size")]
    fits = lambda b: plan_memory(LLAMA3_8B, num_gpus=8, batch_size=b, seq_len=4096)["fits"]  # noqa: E731
    assert fits(smaller) and not fits(smaller + 1)
    assert "seq_len" not in advice  # batch_size=1 at this seq_len fits: no need to cut sequences
    text = format_plan(big_batch)
    assert "NO" in text and "reduce batch_size" in text and "8,030,261,248" in text


def test_fitting_plan_suggests_dropping_checkpointing_when_it_also_fits():
    plan = plan_memory("HuggingFaceTB/SmolLM2-135M-Instruct", batch_size=4, seq_len=256)
    assert plan["fits"]
    assert plan["advice"] == ["activation_checkpointing=false also fits (faster: no recompute)"]


def test_local_config_json_and_bad_input(tmp_path, tiny_llama):
    tiny_llama.config.save_pretrained(tmp_path)
    plan = plan_memory(tmp_path)
    assert plan["params"] == sum(p.numel() for p in tiny_llama.parameters())
    with pytest.raises(ValueError, match="unknown model 'no/such-model'"):
        plan_memory("no/such-model")
    with pytest.raises(ConfigError, match="config.json"):
        plan_memory(tmp_path / "..")
    with pytest.raises(ValueError, match="unknown strategy 'zero3'"):
        plan_memory(tmp_path, strategy="zero3")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        plan_memory(tmp_path, batch_size=0)


def test_estimate_from_config_reads_recipe_keys():
    cfg = OmegaConf.create(
        {
            "model": {"path": LLAMA3_8B, "dtype": "auto"},
            "batch_size": 3,
            "seq_len": 1024,
            "activation_checkpointing": False,
            "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
            "quantizer": {"scheme": "4w", "group_size": 64},
            "distributed": {"strategy": "ddp"},
        }
    )
    plan = estimate_from_config(cfg, num_gpus=2)
    assert (plan["strategy"], plan["batch_size"], plan["seq_len"]) == ("ddp", 3, 1024)
    assert (plan["optimizer"], plan["qat"], plan["group_size"]) == ("sgd_momentum", "4w", 64)
    assert not plan["activation_checkpointing"]


def _saved_bytes(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one forward (unique storages)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("qat", [False, True])
def test_layer_formula_matches_saved_tensors(qat):
    """One decoder layer's activations (and fake-quant extras) as planned == what autograd saves on a real bf16
    forward (CPU SDPA flash kernel, like CUDA's: no s^2 attention matrix)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(layers: int) -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        if qat:
            base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_(model, QATConfig(base, step="prepare"))
        return model

    batch, seq = 2, 64
    measured = _saved_bytes(build(2), batch, seq) - _saved_bytes(build(1), batch, seq)
    arch = build(1).config.to_dict()
    plan_kw = dict(num_gpus=8, strategy="fsdp2", batch_size=batch, seq_len=seq, activation_checkpointing=False)
    two = plan_memory({**arch, "num_hidden_layers": 2}, qat=qat, **plan_kw)["bytes"]["activations"]
    one = plan_memory({**arch, "num_hidden_layers": 1}, qat=qat, **plan_kw)["bytes"]["activations"]
    assert two - one == measured
    assert model_stats(arch, "8da4w" if qat else None).params == sum(p.numel() for p in build(1).parameters())


@pytest.mark.parametrize("embedding_group_size", [32, 64])
def test_embedding_fake_quant_term_matches_saved_tensors(embedding_group_size):
    """quantizer.embedding: what torchao's FakeQuantizedEmbedding saves for backward on fp32 weights (the recipe's
    master weights) == the plan's extra activation bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qatune.quantization import QuantScheme, fake_quantize_

    config = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip

    def saved(embedding: str) -> int:
        torch.manual_seed(0)
        q = QuantScheme(scheme="4w", embedding=embedding, embedding_group_size=embedding_group_size, fused=False)
        return _saved_bytes(fake_quantize_(LlamaForCausalLM(config).train(), q), 2, 16)

    measured = saved("int4") - saved("none")
    kw = dict(dtype="fp32", batch_size=2, seq_len=16, qat_scheme="4w", activation_checkpointing=False)
    with_embedding = plan_memory(config.to_dict(), embedding_group_size=embedding_group_size, **kw)["bytes"]
    without = plan_memory(config.to_dict(), **kw)["bytes"]
    assert (
        with_embedding["activations"] - without["activations"]
        == measured
        == (4 + 8 / embedding_group_size) * 2048 * 256
    )


def test_a_gpu_run_whose_plan_exceeds_the_gpu_is_refused_naming_what_fits():
    """recipes/qat_recipe.py calls check_plan_fits on CUDA before anything loads: full QAT of 8B on one 80 GB GPU
    (141 GB planned) stops with one line naming tune estimate and the launches that fit."""
    from qatune.cli import load_recipe_config
    from qatune.planner import check_plan_fits

    _, cfg = load_recipe_config("qat_recipe", "llama3_8b", [])
    with pytest.raises(ConfigError, match=r"141\.4 GB per GPU on 1 GPU.*80\.0 GB.*--nproc_per_node 4.*tune estimate"):
        check_plan_fits(cfg, 1, 80 * 10**9)
    check_plan_fits(cfg, 8, 80 * 10**9)  # the same config on one node of 8: fits
    _, lora = load_recipe_config("qat_recipe", "llama3_8b_lora", [])
    check_plan_fits(lora, 1, 80 * 10**9)
    with pytest.raises(ConfigError, match="more than this GPU's 24.0 GB"):
        check_plan_fits(lora, 1, 24 * 10**9)


def _documented_gpu_commands() -> list[tuple[str, str]]:
    """Every `tune run ... qat_recipe --config <GPU config>` line of README.md and the config headers."""
    import re
    from pathlib import Path

    from qatune import registry

    root = Path(__file__).parents[1]
    sources = [root / "README.md", *sorted((registry.configs_dir() / "qat_recipe").glob("*.yaml"))]
    found = []
    for path in sources:
        for line in path.read_text().splitlines():
            line = line.lstrip("#").strip()
            m = re.match(r"tune run (.*?)qat_recipe --config (\S+)(.*)", line.split("  #")[0])
            if m and not m.group(2).startswith(("smollm2_135m", "./", "<")):
                found.append((path.name, line.split("  #")[0].strip()))
    return found


@pytest.mark.parametrize(("where", "command"), _documented_gpu_commands())
def test_every_documented_gpu_command_fits_80_gb_gpus(where, command):
    import shlex

    from qatune.cli import build_parser, load_recipe_config
    from qatune.planner import check_plan_fits

    args, extra = build_parser().parse_known_args(shlex.split(command)[1:])
    overrides = [o for o in [*args.overrides, *extra] if not o.startswith("model.path=")]  # no weights here
    _, cfg = load_recipe_config("qat_recipe", args.config, overrides)
    check_plan_fits(cfg, args.nproc_per_node * args.nnodes, 80 * 10**9)


def test_the_distillation_teacher_is_counted():
    """A frozen bf16 teacher: its weights once per GPU (1/N of them under FSDP2, plus the gathered root and one
    layer) and one chunk of logits; nothing without distillation."""
    cfg = OmegaConf.load(Path(__file__).parent.parent / "configs" / "qat_recipe" / "llama3_8b.yaml")
    p = model_stats(cfg.model.path).params
    without = estimate_from_config(cfg, num_gpus=8)["bytes"]
    assert without["teacher"] == 0
    cfg.distillation.weight, cfg.distillation.chunk_size = 1.0, 256
    with_teacher = estimate_from_config(cfg, num_gpus=8)["bytes"]
    assert with_teacher["teacher"] > 2 * p / 8 and with_teacher["total"] - without["total"] == with_teacher["teacher"]
    single = estimate_from_config(cfg, num_gpus=1)["bytes"]["teacher"]
    assert single == pytest.approx(2 * p + cfg.batch_size * 256 * 128256 * 22)  # bf16 weights + a chunk of logits
