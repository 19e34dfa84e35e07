"""The QAT recipe end to end on a tiny random Llama (seconds), and on the real SmolLM2 (slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qatune.cli import load_recipe_config

# QAT from the original model with the plain loss, no fair baseline, RTN only: the path most tests check (the shipped
# default's float fine-tune -> distilled QAT phase -> GPTQ rows is tested on its own, and on the real model).
FROM_THE_ORIGINAL = ("qat.start=original", "qat.max_steps=null", "qat.lr=null", "qat.warmup_steps=null",
                     "distillation.weight=0.0", "compare.finetune_baseline=false", "compare.gptq=false")  # fmt: skip


def tiny_overrides(ckpt, out, *extra):
    return [
        f"model.path={ckpt}", f"output_dir={out}", "seq_len=64", "batch_size=2", "max_steps=4",
        "eval.seq_len=64", "eval.measure=false", "+eval_dataset.max_documents=4", "optimizer.lr=1e-3",
        "lr_scheduler.num_warmup_steps=1", *FROM_THE_ORIGINAL, *extra,
    ]  # fmt: skip


def run_recipe(overrides):
    module, cfg = load_recipe_config("qat_recipe", "smollm2_135m", overrides)
    return module.main(cfg)


def test_tiny_end_to_end_report_and_int4_checkpoint(tiny_checkpoint, tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    extra = ("compare.finetune_baseline=true", "export.formats=[hf,gguf]")
    report = run_recipe(tiny_overrides(tiny_checkpoint, out, *extra))
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["results"]) == {"bf16", "ptq", "qat", "bf16_finetuned", "ptq_finetuned"}
    for r in saved["results"].values():
        assert 1.0 < r["perplexity"] < 1e4
    assert saved["training"]["steps"] == 4 and saved["training"]["tokens"] == 4 * 2 * 64
    assert saved["config"]["model"]["path"] == str(tiny_checkpoint)
    r = saved["results"]
    expected = (r["ptq_finetuned"]["perplexity"] - r["qat"]["perplexity"]) / (
        r["ptq_finetuned"]["perplexity"] - r["bf16_finetuned"]["perplexity"]
    )
    assert saved["recovery"] == pytest.approx(expected)
    assert (out / "report.md").is_file() and report["results"]["qat"]["perplexity"] == r["qat"]["perplexity"]
    steps = [json.loads(x)["step"] for x in (out / "qat" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # The saved int4 dir, loaded by plain transformers + torchao in a fresh process, gives the report's perplexity.
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from qatune.evaluation import perplexity
from qatune.data import python_docs
d = {str(out / "int4")!r}
m = AutoModelForCausalLM.from_pretrained(d); t = AutoTokenizer.from_pretrained(d)
print(json.dumps(perplexity(m, t, python_docs("validation")[:4], seq_len=64, batch_size=4, progress=False)))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fresh["perplexity"] == pytest.approx(r["qat"]["perplexity"], rel=1e-4)

    # export.formats=[hf,gguf]: the GGUF beside it holds the saved int4 dir's codes and scales.
    from test_export import gguf_tensors, q4_0_codes_and_scales
    from transformers import AutoModelForCausalLM

    w = AutoModelForCausalLM.from_pretrained(out / "int4").get_parameter("model.layers.1.mlp.down_proj.weight")
    blocks = gguf_tensors(out / "model-q4_0.gguf")["blk.1.ffn_down.weight"].data
    codes, scales = q4_0_codes_and_scales(np.asarray(blocks))
    np.testing.assert_array_equal(codes, w.qdata.numpy())
    np.testing.assert_array_equal(scales, w.scale.to(torch.float16).numpy())  # group size 32: one Q4_0 block


def test_lora_end_to_end_its_int4_checkpoint_is_the_trained_model(tiny_checkpoint, tmp_path):
    """QAT + LoRA through the recipe: only the adapters train, the fair LoRA baseline runs, and the saved int4
    checkpoint reloads to the perplexity the report measured on the trained (merged, converted) model."""
    out = tmp_path / "lora"
    overrides = tiny_overrides(tiny_checkpoint, out, "compare.finetune_baseline=true", "compare.baseline=false")
    module, cfg = load_recipe_config("qat_recipe", "smollm2_135m_lora", overrides)
    report = module.main(cfg)
    runs = report["training_runs"]
    # rank 16 x (q 256+256, k 256+128, v 256+128, o 256+256, gate 256+512, up 256+512, down 512+256), 2 layers
    assert runs["qat"]["trainable_params"] == runs["bf16_finetuned"]["trainable_params"] == 2 * 16 * 4096
    assert set(report["results"]) == {"qat", "bf16_finetuned", "ptq_finetuned"} and report["recovery"] is not None
    assert "trainable params" in (out / "report.md").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune.data import python_docs
    from qatune.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(out / "int4")
    again = perplexity(model, AutoTokenizer.from_pretrained(out / "int4"), python_docs("validation")[:4], seq_len=64,
                       batch_size=4, progress=False)  # fmt: skip
    assert again["perplexity"] == pytest.approx(report["results"]["qat"]["perplexity"], rel=1e-6)
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: a plain int4 checkpoint
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")  # the adapters alone, as peft names them
    assert sum(t.numel() for t in adapter.values()) == runs["qat"]["trainable_params"]
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in adapter


def test_delayed_fake_quant_trains_float_first(tiny_checkpoint, tmp_path):
    # With fake quant delayed past the last step, QAT training is exactly float training: same loss curve.
    base = tiny_overrides(tiny_checkpoint, tmp_path / "a", "compare.baseline=false", "compare.finetune_baseline=true")
    delayed = run_recipe([*base, "quantizer.fake_quant_after_n_steps=100"])
    losses = {
        run: [json.loads(x)["loss"] for x in (tmp_path / "a" / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("qat", "bf16_finetuned")
    }
    assert losses["qat"] == pytest.approx(losses["bf16_finetuned"], rel=1e-6)
    # Switched on after 2 steps: steps 1-2 equal the float run, step 3 onward differ.
    run_recipe([*base[:1], f"output_dir={tmp_path / 'b'}", *base[2:], "quantizer.fake_quant_after_n_steps=2"])
    qat = [json.loads(x)["loss"] for x in (tmp_path / "b" / "qat" / "metrics.jsonl").read_text().splitlines()]
    assert qat[:2] == pytest.approx(losses["bf16_finetuned"][:2], rel=1e-6)
    assert qat[2] != pytest.approx(losses["bf16_finetuned"][2], rel=1e-6)
    assert delayed["results"]["qat"]["perplexity"] > 0


def test_two_processes_match_one_with_the_same_global_batch(tiny_checkpoint, tmp_path):
    """DDP over gloo on CPU: identical parameters on both ranks, and the 1-process loss curve."""
    common = tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false", "+quantizer.skip=[lm_head]")
    one = [*common, f"output_dir={tmp_path / 'one'}", "batch_size=4"]
    two = [*common, f"output_dir={tmp_path / 'two'}", "batch_size=2"]
    tune = [sys.executable, "-m", "qatune.cli", "run"]
    for launcher, overrides in (([], one), (["--nproc_per_node", "2"], two)):
        proc = subprocess.run(
            [*tune, *launcher, "qat_recipe", "--config", "smollm2_135m", *overrides],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and "parameters identical on all 2 ranks" in proc.stdout
    curves = [
        [json.loads(x)["loss"] for x in (tmp_path / name / "qat" / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    ]
    # Float sums reassociate across ranks; fake quant's rounding amplifies that a little over steps.
    assert curves[1] == pytest.approx(curves[0], rel=1e-3)
    reports = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two")]
    ppl = [r["results"]["qat"]["perplexity"] for r in reports]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-3)


TUNE = [sys.executable, "-m", "qatune.cli", "run"]


def run_two_processes(overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*TUNE, "--nproc_per_node", "2", "qat_recipe", "--config", "smollm2_135m", *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]  # torchrun exits 0 only if every rank did
    return proc


def losses_of(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "qat" / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_on_two_cpu_processes_matches_ddp_and_saves_int4_once(tiny_checkpoint, tmp_path):
    """torch's fully_shard over gloo: sharded fp32 weights, the DDP loss curve, one int4 checkpoint from rank 0."""
    common = tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false")
    runs = {s: run_two_processes([*common, f"output_dir={tmp_path / s}", f"distributed.strategy={s}"])
            for s in ("fsdp2", "ddp")}  # fmt: skip
    fsdp_out = runs["fsdp2"].stdout
    assert "fsdp2: this rank holds" in fsdp_out and fsdp_out.count("int4 checkpoint:") == 1
    local, total = (int(x.replace(",", "")) for x in fsdp_out.split("this rank holds ")[1].split(" parameters")[0]
                    .split(" of the "))  # fmt: skip
    assert local < 0.6 * total  # half of every parameter, rounded up per tensor
    # Reduce-scatter and all-reduce sum in different orders, fake quant's rounding amplifies it: measured 2.6e-4
    # relative at step 4 (the first two steps are equal to all digits).
    assert losses_of(tmp_path / "fsdp2") == pytest.approx(losses_of(tmp_path / "ddp"), rel=1e-3)
    reports = {s: json.loads((tmp_path / s / "report.json").read_text()) for s in runs}
    ppl = {s: r["results"]["qat"]["perplexity"] for s, r in reports.items()}
    assert ppl["fsdp2"] == pytest.approx(ppl["ddp"], rel=1e-3)
    # The int4 checkpoint written by the FSDP2 run reloads with plain transformers and gives the report's number.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune.data import python_docs
    from qatune.evaluation import perplexity

    d = tmp_path / "fsdp2" / "int4"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    again = perplexity(model, tokenizer, python_docs("validation")[:4], seq_len=64, batch_size=4, progress=False)
    assert again["perplexity"] == pytest.approx(ppl["fsdp2"], rel=1e-6)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_fsdp2_resume_from_sharded_checkpoint_is_exact(tiny_checkpoint, tmp_path):
    common = [*tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false", "distributed.strategy=fsdp2"),
              "lr_scheduler=null", "save_every_n_steps=2"]  # fmt: skip
    run_two_processes([*common, f"output_dir={tmp_path / 'straight'}"])
    run_two_processes([*common, f"output_dir={tmp_path / 'cut'}", "max_steps=2"])
    assert (tmp_path / "cut" / "qat" / "checkpoints" / "step_2" / "sharded" / ".metadata").is_file()
    resumed = run_two_processes([*common, f"output_dir={tmp_path / 'cut'}", "resume=true"])
    assert "resumed from" in resumed.stdout
    assert losses_of(tmp_path / "cut") == losses_of(tmp_path / "straight")  # bit for bit


def test_two_process_run_killed_midway_resumes_and_finishes(tiny_checkpoint, tmp_path):
    common = [
        *tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false"),
        "max_steps=12", "save_every_n_steps=2", "eval_every_n_steps=3", "batch_size=2",
    ]  # fmt: skip
    tune = [
        sys.executable,
        "-m",
        "qatune.cli",
        "run",
        "--nproc_per_node",
        "2",
        "qat_recipe",
        "--config",
        "smollm2_135m",
    ]
    full = subprocess.run([*tune, *common, f"output_dir={tmp_path / 'full'}"], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "cut"
    proc = subprocess.Popen(
        [*tune, *common, f"output_dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not list((out / "qat" / "checkpoints").glob("step_*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    proc.wait()
    assert not (out / "report.json").exists()

    resumed = subprocess.run([*tune, *common, f"output_dir={out}", "resume=true"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    curves = [
        [json.loads(x) for x in (d / "qat" / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "full", out)
    ]
    assert [r["step"] for r in curves[1]][-1] == 12
    by_step = [{r["step"]: r["loss"] for r in c} for c in curves]
    assert by_step[1] == pytest.approx(by_step[0], rel=1e-5)
    assert "val_loss" in curves[0][2]  # validation loss every 3 steps


@pytest.mark.slow
def test_smollm2_end_to_end_few_steps(smollm2_dir, tmp_path):
    """The shipped CPU config (float fine-tune, distilled QAT phase, RTN and GPTQ rows) on the real SmolLM2 with a
    handful of steps: QAT beats RTN of the same fine-tuned model, the saved int4 dir is written."""
    out = tmp_path / "smol"
    overrides = [
        f"model.path={smollm2_dir}", f"output_dir={out}", "max_steps=3", "qat.max_steps=3", "seq_len=64",
        "eval.seq_len=64", "eval.measure=false", "eval_dataset.max_documents=2", "quantizer.gptq.samples=4",
        "quantizer.gptq.seq_len=64",
    ]  # fmt: skip
    report = run_recipe(overrides)
    r = {name: row["perplexity"] for name, row in report["results"].items()}
    assert set(r) == {"bf16", "ptq", "gptq", "qat", "bf16_finetuned", "ptq_finetuned", "gptq_finetuned"}
    assert r["bf16_finetuned"] < r["qat"] < r["ptq_finetuned"] < 1000
    assert r["bf16"] < r["gptq"] < r["ptq"]  # GPTQ beats RTN on the original model too
    assert 0 < json.loads((out / "report.json").read_text())["recovery"] < 1
    assert (out / "int4" / "config.json").is_file()


def test_trackers_on_two_processes_keep_the_process_group_to_the_end(tiny_checkpoint, tmp_path):
    """accelerate's end_training() destroys the process group; the gather after training (and the second fine-tune
    of compare.finetune_baseline) needs it. Also: the collective timeout is the one configured, not NCCL's 10 min."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "tracked"
    proc = run_two_processes(
        tiny_overrides(tiny_checkpoint, out, "compare.baseline=false", "compare.finetune_baseline=true",
                       "trackers=[tensorboard]", "distributed.timeout_minutes=7")
    )  # fmt: skip
    assert (out / "int4" / "config.json").is_file() and proc.stdout.count("int4 checkpoint:") == 1
    for run in ("bf16_finetuned", "qat"):  # each fine-tune has its own tracker run with its 4 steps
        events = list((out / run).glob("events.out.tfevents.*"))
        assert len(events) == 1, sorted(p.relative_to(out) for p in out.rglob("*tfevents*"))
    assert proc.stdout.count("collective timeout 7 min") == 2  # the process group's own setting, each run


def test_ddp_lora_on_two_processes_writes_the_adapter_once(tiny_checkpoint, tmp_path):
    """Every DDP rank used to save output_dir/adapter: concurrent renames of one directory collide."""
    out = tmp_path / "lora"
    proc = subprocess.run(
        [*TUNE, "--nproc_per_node", "2", "qat_recipe", "--config", "smollm2_135m_lora",
         *tiny_overrides(tiny_checkpoint, out, "compare.baseline=false")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter (peft format):") == 1
    from safetensors.torch import load_file

    assert len(load_file(out / "adapter" / "adapter_model.safetensors")) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_fsdp2_with_activation_checkpointing_and_fake_quant_gives_the_same_losses(tiny_checkpoint, tmp_path):
    """The 8B configs' set-up (FSDP2 + activation checkpointing + fused fake quant) on 2 CPU processes: the
    recomputed forward is the same function, so the loss curve and the int4 model equal the run without it."""
    common = tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false", "distributed.strategy=fsdp2")
    for ac in ("true", "false"):
        run_two_processes([*common, f"output_dir={tmp_path / ac}", f"activation_checkpointing={ac}"])
    assert losses_of(tmp_path / "true") == losses_of(tmp_path / "false")
    reports = [json.loads((tmp_path / ac / "report.json").read_text()) for ac in ("true", "false")]
    assert reports[0]["results"]["qat"]["perplexity"] == reports[1]["results"]["qat"]["perplexity"]


def test_lora_with_activation_checkpointing_gives_the_same_losses(tiny_checkpoint, tmp_path):
    """QAT + LoRA (frozen base, adapters inside the fake-quantized weight) with activation checkpointing, as
    llama3_8b_lora ships: the adapters get gradients through the recomputed layers, losses as without it."""
    reports = {}
    for ac in ("true", "false"):
        overrides = tiny_overrides(tiny_checkpoint, tmp_path / ac, "compare.baseline=false",
                                   f"activation_checkpointing={ac}")  # fmt: skip
        module, cfg = load_recipe_config("qat_recipe", "smollm2_135m_lora", overrides)
        reports[ac] = module.main(cfg)
    assert losses_of(tmp_path / "true") == losses_of(tmp_path / "false")
    # the adapters train (B starts at zero, step 1's warm-up lr is 0); both runs in one process also show that the
    # adapters' initial A comes from `seed`, not from the RNG state the previous run left
    assert len(set(losses_of(tmp_path / "true"))) == 4
    assert reports["true"]["results"]["qat"]["perplexity"] == reports["false"]["results"]["qat"]["perplexity"]


def test_every_row_is_evaluated_in_model_dtype(tiny_checkpoint, tmp_path):
    """On a GPU model.dtype is bf16: the baselines used to run in bf16 while the QAT row (and int4/) stayed fp32.
    model.dtype=bf16 on CPU is the same set-up: every row, QAT's included, and the saved int4 model in bf16."""
    out = tmp_path / "bf16"
    report = run_recipe(tiny_overrides(tiny_checkpoint, out, "compare.finetune_baseline=true", "model.dtype=bf16"))
    assert report["eval_dtype"] == "bfloat16"
    rows = report["results"]
    assert set(rows) == {"bf16", "ptq", "qat", "bf16_finetuned", "ptq_finetuned"}
    assert {name: r["dtype"] for name, r in rows.items()} == dict.fromkeys(rows, "bfloat16")
    assert "Every row evaluated in bfloat16" in (out / "report.md").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune.data import python_docs
    from qatune.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(out / "int4")  # the checkpoint holds what the report measured
    assert model.model.layers[0].mlp.up_proj.weight.scale.dtype == torch.bfloat16
    again = perplexity(model, AutoTokenizer.from_pretrained(out / "int4"), python_docs("validation")[:4], seq_len=64,
                       batch_size=4, progress=False)  # fmt: skip
    assert again["perplexity"] == pytest.approx(rows["qat"]["perplexity"], rel=1e-6)


def metrics(out, run: str, key: str = "loss") -> list[float]:
    return [json.loads(x)[key] for x in (out / run / "metrics.jsonl").read_text().splitlines()]


def test_gptq_rows_then_qat_after_the_float_finetune_distilled_from_it(tiny_checkpoint, tmp_path):
    """The seeds' schedule: float fine-tune (the fair baseline, saved), then a short QAT phase from it with its own
    learning rate, distilled from it; RTN and GPTQ rows of both float models; eval_perplexity gives the same PTQ
    numbers for the saved fine-tuned model with the same quantizer section (one PTQ rule)."""
    out = tmp_path / "out"
    gptq = ["quantizer.gptq.samples=4", "quantizer.gptq.seq_len=64"]
    report = run_recipe(tiny_overrides(
        tiny_checkpoint, out, "compare.finetune_baseline=true", "compare.gptq=true", "qat.start=finetuned",
        "qat.max_steps=2", "qat.lr=1e-4", "qat.warmup_steps=0", "distillation.weight=1.0", *gptq,
    ))  # fmt: skip
    r = report["results"]
    assert set(r) == {"bf16", "ptq", "gptq", "qat", "bf16_finetuned", "ptq_finetuned", "gptq_finetuned"}
    assert report["training_runs"]["bf16_finetuned"]["steps"] == 4 and report["training"]["steps"] == 2
    # QAT's own schedule: cosine from its own peak 1e-4, no warm-up (logged after each step: 1e-4 x (1 + cos pi/2) / 2)
    assert metrics(out, "qat", "lr") == pytest.approx([5e-5, 0.0], abs=1e-12)
    # QAT starts from the fine-tuned weights and the loss is the KL to them: tiny next to the float run's CE.
    assert metrics(out, "qat")[0] < 0.2 * metrics(out, "bf16_finetuned")[0]
    assert r["gptq_finetuned"]["perplexity"] != pytest.approx(r["ptq_finetuned"]["perplexity"], rel=1e-4)
    expected = (r["gptq_finetuned"]["perplexity"] - r["qat"]["perplexity"]) / (
        r["gptq_finetuned"]["perplexity"] - r["bf16_finetuned"]["perplexity"]
    )
    assert report["recovery_vs_gptq"] == pytest.approx(expected)
    assert "GPTQ int4 of the same fine-tuned model" in (out / "report.md").read_text()

    finetuned = out / "bf16_finetuned" / "model"
    module, cfg = load_recipe_config("eval_perplexity", "eval_perplexity", [
        f"model.path={finetuned}", f"output_dir={tmp_path / 'eval'}", "seq_len=64", "batch_size=8",
        "dataset.max_documents=4", *gptq, "quantize=rtn",
        f"compare_with=[{{name: gptq, path: '{finetuned}', quantize: gptq}}, {{name: float, path: '{finetuned}'}}]",
    ])  # fmt: skip
    evaluated = module.main(cfg)
    assert evaluated["float"]["perplexity"] == pytest.approx(r["bf16_finetuned"]["perplexity"], rel=1e-6)
    assert evaluated["rtn"]["perplexity"] == pytest.approx(r["ptq_finetuned"]["perplexity"], rel=1e-6)
    assert evaluated["gptq"]["perplexity"] == pytest.approx(r["gptq_finetuned"]["perplexity"], rel=1e-6)


def test_gptq_initialised_qat_starts_from_other_weights(tiny_checkpoint, tmp_path):
    common = ("compare.baseline=false", "max_steps=2", "quantizer.gptq.samples=4", "quantizer.gptq.seq_len=64")
    for init in ("rtn", "gptq"):
        run_recipe(tiny_overrides(tiny_checkpoint, tmp_path / init, *common, f"qat.init={init}"))
    rtn, gptq = metrics(tmp_path / "rtn", "qat"), metrics(tmp_path / "gptq", "qat")
    assert gptq[0] != pytest.approx(rtn[0], rel=1e-4)  # the first forward already sees GPTQ's rounding


def test_teacher_distillation_on_two_processes_matches_one(tiny_checkpoint, tmp_path):
    """DDP over gloo: each rank holds the frozen teacher; the loss curve equals one process with the same batch."""
    common = tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false", "distillation.weight=0.5",
                            "distillation.teacher=original", "distillation.chunk_size=16")  # fmt: skip
    one = [*common, f"output_dir={tmp_path / 'one'}", "batch_size=4"]
    proc = subprocess.run([*TUNE, "qat_recipe", "--config", "smollm2_135m", *one], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_two_processes([*common, f"output_dir={tmp_path / 'two'}", "batch_size=2"])
    assert "world size 2" in proc.stdout and "parameters identical on all 2 ranks" in proc.stdout
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), rel=1e-3)


def test_teacher_distillation_under_fsdp2_matches_ddp(tiny_checkpoint, tmp_path):
    """FSDP2 on 2 CPU processes: the teacher sharded like the student (its lm_head gathered for the chunked KL):
    the same loss curve as DDP."""
    common = tiny_overrides(tiny_checkpoint, tmp_path, "compare.baseline=false", "distillation.weight=0.5",
                            "distillation.teacher=original", "distillation.chunk_size=16")  # fmt: skip
    for strategy in ("ddp", "fsdp2"):
        run_two_processes([*common, f"output_dir={tmp_path / strategy}", f"distributed.strategy={strategy}"])
    assert losses_of(tmp_path / "fsdp2") == pytest.approx(losses_of(tmp_path / "ddp"), rel=1e-3)
