"""QAT + LoRA (qatune.lora): the adapter inside the fake-quantized weight; the int4 export is exactly what trained."""

import copy

import pytest
import torch
from conftest import adamw_steps, make_tiny_llama
from test_training import Blocks, Killed, kill_at

from qatune.errors import ConfigError
from qatune.lora import add_lora_, check_lora_config, has_lora, lora_targets, merge_lora_
from qatune.quantization import convert_to_int4, enable_fake_quant, fake_quantize_, quantize_ptq_, resolve_quantizer
from qatune.training import TrainConfig, _checkpoints, make_accelerator, train

LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
IDS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_model(scheme="8da4w", fused=True, seed=1):
    q = resolve_quantizer({"scheme": scheme, "group_size": 32, "fused": fused})
    return add_lora_(fake_quantize_(make_tiny_llama(seed=seed), q), LORA), q


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scheme", ["8da4w", "4w", "8da8w"])
def test_merged_then_converted_equals_the_trained_fake_quantized_model(scheme, fused):
    model, q = lora_model(scheme, fused)
    adamw_steps(model, IDS, steps=3)
    trained = logits(model)
    ptq = logits(quantize_ptq_(make_tiny_llama(seed=1).eval(), q))
    assert not torch.equal(trained, ptq)  # the adapters changed the model
    merge_lora_(model)
    assert not has_lora(model)
    assert torch.equal(logits(model), trained)  # merging writes back the weight the forward computed
    convert_to_int4(model, q)
    assert torch.equal(logits(model), trained)  # and its int4 codes are the ones the fake quantizer saw


def test_the_fake_quantizer_sees_the_adapted_weight():
    """The forward quantizes W + s B A, not W: with B != 0 the logits differ from the base model's fake quant."""
    model, q = lora_model()
    base = fake_quantize_(make_tiny_llama(seed=1), q).eval()
    assert torch.equal(logits(model.eval()), logits(base))  # B = 0 at the start: the model starts as it was
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    assert not torch.equal(logits(model), logits(base))


def test_only_adapters_train_and_the_base_is_unchanged(tmp_path):
    model, _ = lora_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B"))}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(adapters) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    acc = make_accelerator(torch.device("cpu"), 1, str(tmp_path))
    cfg = TrainConfig(batch_size=4, max_steps=3, save_every_n_steps=3)
    trained, result = train(
        model, Blocks(), cfg=cfg, optimizer_cfg={"_component_": "torch.optim.AdamW", "lr": 1e-2}, scheduler_cfg=None,
        accelerator=acc, output_dir=tmp_path / "lora", seed=0,
    )  # fmt: skip
    assert result.trainable_params == sum(t.numel() for t in adapters.values())
    params = dict(trained.named_parameters())
    for name, before in base.items():
        assert torch.equal(params[name], before) and params[name].grad is None, name
    assert all(not torch.equal(params[n], before) for n, before in adapters.items() if n.endswith("lora_B"))
    optimizer = torch.load(_checkpoints(tmp_path / "lora")[-1] / "optimizer.bin", weights_only=False)
    in_optimizer = [i for g in optimizer["param_groups"] for i in g["params"]]
    assert len(in_optimizer) == len(adapters)  # no state for the frozen base


def test_resume_of_a_lora_run_equals_an_uninterrupted_one(tmp_path):
    def run(name, on_step=None, resume=False):
        model, _ = lora_model()
        acc = make_accelerator(torch.device("cpu"), 1, str(tmp_path))
        cfg = TrainConfig(batch_size=4, max_steps=4, save_every_n_steps=2, resume=resume)
        return train(
            model, Blocks(), cfg=cfg, optimizer_cfg={"_component_": "torch.optim.AdamW", "lr": 1e-2},
            scheduler_cfg=None, accelerator=acc, output_dir=tmp_path / name, seed=0, on_step=on_step,
        )  # fmt: skip

    full_model, full = run("full")
    with pytest.raises(Killed):
        run("cut", on_step=kill_at(2))
    resumed_model, resumed = run("cut", resume=True)
    assert resumed.losses == full.losses
    merge_lora_(full_model)
    merge_lora_(resumed_model)
    assert torch.equal(logits(resumed_model), logits(full_model))


def test_targets_naming_no_linear_are_refused_in_one_line():
    model = make_tiny_llama()
    assert lora_targets(model, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'qproj' matches no linear layer; the model has \["):
        lora_targets(model, ["qproj"])
    with pytest.raises(ConfigError, match="lm_head is tied to the embeddings here"):
        lora_targets(make_tiny_llama(tie_word_embeddings=True), ["lm_head"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 0}, "lora.rank=0: give an integer >= 1"),
        ({"alpha": -1.0}, "lora.alpha=-1.0: give a positive number"),
        ({"dropout": 0.1}, "lora.dropout=0.1: only 0"),
        ({"target_modules": []}, "lora.target_modules is empty"),
    ],
)
def test_bad_lora_values_are_refused(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_lora_config({**LORA, **change})


def test_deepcopy_keeps_the_adapters():
    model, _ = lora_model()
    twin = copy.deepcopy(model)
    assert has_lora(twin) and torch.equal(logits(twin.eval()), logits(model.eval()))


def test_the_planner_fits_llama3_8b_lora_on_one_gpu_and_counts_the_adapters():
    from qatune.planner import lora_stats, plan_memory

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    common = dict(num_gpus=1, batch_size=2, seq_len=2048, activation_checkpointing=True, group_size=128)
    lora = plan_memory("meta-llama/Meta-Llama-3-8B-Instruct", lora_rank=16, lora_targets=targets, **common)
    full = plan_memory("meta-llama/Meta-Llama-3-8B-Instruct", **common)
    assert lora["fits"] and not full["fits"]
    # By hand: 32 layers x 16 x (q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate/up 4096+14336 twice,
    # down 14336+4096) = 41,943,040 adapter parameters; fp32 weights + grads + 2 AdamW states = 16 bytes each.
    assert lora["trainable_params"] == 32 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432) == 41_943_040
    b = lora["bytes"]
    assert b["grads"] == 4 * 41_943_040 and b["optimizer"] == 8 * 41_943_040
    assert b["weights"] == 2 * 8_030_261_248 + 4 * 41_943_040  # the frozen base in bf16, the adapters in fp32
    tiny = lora_stats(make_tiny_llama().config.to_dict(), 4, ("q_proj",))
    assert tiny.adapter_params == 2 * 4 * (256 + 256) and tiny.layer_weight_params == 256 * 256


def random_adapters_(model, seed=5):
    """B != 0 (a trained adapter), without the cost of training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def adapted_weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in lora_targets(model, LORA["target_modules"])}


def test_under_bf16_autocast_the_forward_sees_the_weight_the_merge_writes():
    """GPU set-up on CPU: frozen bf16 base, bf16 autocast. B A is computed in fp32 inside the forward too, so the
    weight the fake quantizer saw is the merged one bit for bit (a bf16 B A would round differently)."""
    q = resolve_quantizer({"scheme": "8da4w", "group_size": 32})
    model = random_adapters_(add_lora_(fake_quantize_(make_tiny_llama(seed=1).to(torch.bfloat16), q), LORA)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen, trained = adapted_weights(model), logits(model)
    base = {n: model.get_submodule(n).parametrizations.weight.original for n in seen}
    assert all(w.dtype == torch.bfloat16 and not torch.equal(w, base[n]) for n, w in seen.items())
    merge_lora_(model)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in seen.items())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(logits(model), trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_saved_adapter_loads_in_peft_and_merges_to_the_same_weights_and_int4_codes(tmp_path, dtype):
    """The adapter alone, in peft's format: peft loads it onto the base, its forward matches ours (float), and its
    merge_and_unload gives our merged weights bit for bit, so the same scheme's PTQ of them gives our int4 model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qatune.lora import save_adapter

    make_tiny_llama(seed=1).save_pretrained(tmp_path / "base")
    q = resolve_quantizer({"scheme": "8da4w", "group_size": 32})
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    ours = random_adapters_(add_lora_(fake_quantize_(ours, q), LORA)).eval()
    save_adapter(ours, tmp_path / "adapter", LORA, str(tmp_path / "base"))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    float_ours = enable_fake_quant(copy.deepcopy(ours), False)

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert peft_model.peft_config["default"].r == LORA["rank"]
    atol = 0.05 if dtype == torch.bfloat16 else 1e-4  # peft adds B(A x) beside W x; ours computes (W + s B A) x
    torch.testing.assert_close(logits(peft_model).float(), logits(float_ours).float(), rtol=0, atol=atol)

    merged = peft_model.merge_and_unload()
    merge_lora_(ours)
    for name in lora_targets(ours, LORA["target_modules"]):
        assert torch.equal(merged.get_submodule(name).weight, ours.get_submodule(name).weight), name
    convert_to_int4(ours, q)
    assert torch.equal(logits(quantize_ptq_(merged, q)), logits(ours))
