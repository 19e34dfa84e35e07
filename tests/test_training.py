"""The accelerate training loop: resume equals an uninterrupted run, NaN stops cleanly, accumulation is exact."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from torch.utils.data import Dataset

from qatune.training import TrainConfig, TrainingError, _checkpoints, make_accelerator, train

ADAMW = {"_component_": "torch.optim.AdamW", "lr": 3e-3}
COSINE = {"_component_": "transformers.get_cosine_schedule_with_warmup", "num_warmup_steps": 2}


class Blocks(Dataset):
    """Token blocks with learnable structure (each block counts up from a random start)."""

    def __init__(self, n: int = 32, seq_len: int = 32, vocab: int = 512, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(seq_len)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Killed(Exception):
    pass


def kill_at(step_to_die: int):
    def on_step(model, step):
        if step == step_to_die:
            raise Killed  # as if the process died right after the checkpoint of `step_to_die`

    return on_step


def run(tmp_path, name, optimizer=ADAMW, on_step=None, **overrides):
    cfg = TrainConfig(**{"batch_size": 4, "max_steps": 6, **overrides})
    acc = make_accelerator(torch.device("cpu"), cfg.gradient_accumulation_steps, str(tmp_path))
    model = make_tiny_llama(seed=1)
    model, result = train(
        model, Blocks(), cfg=cfg, optimizer_cfg=optimizer, scheduler_cfg=COSINE,
        accelerator=acc, output_dir=tmp_path / name, seed=0, on_step=on_step,
    )  # fmt: skip
    return model, result


def test_loss_decreases_and_metrics_are_written(tmp_path):
    _, result = run(tmp_path, "a", max_steps=8)
    assert result.steps == 8 and result.tokens == 8 * 4 * 32
    assert result.losses[-1] < result.losses[0] - 0.25
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert lines[0]["lr"] < lines[2]["lr"]  # warm-up


def test_resume_equals_uninterrupted(tmp_path):
    full_model, full = run(tmp_path, "full", max_steps=6)
    # Interrupted after the checkpoint of step 3, then resumed to 6 with a fresh model and optimizer.
    with pytest.raises(Killed):
        run(tmp_path, "cut", save_every_n_steps=3, on_step=kill_at(3))
    assert [p.name for p in _checkpoints(tmp_path / "cut")] == ["step_3"]
    resumed_model, resumed = run(tmp_path, "cut", save_every_n_steps=3, resume=True)
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    for (n, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_across_epoch_boundary(tmp_path):
    # 32 blocks / batch 4 = 8 steps per epoch: cut at 6, resume to 12 (crosses into epoch 1).
    _, full = run(tmp_path, "full", max_steps=12)
    with pytest.raises(Killed):
        run(tmp_path, "cut", max_steps=12, save_every_n_steps=6, on_step=kill_at(6))
    _, resumed = run(tmp_path, "cut", max_steps=12, save_every_n_steps=6, resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)


def test_gradient_accumulation_matches_big_batch(tmp_path):
    _, big = run(tmp_path, "big", batch_size=4, max_steps=4, optimizer={"_component_": "torch.optim.SGD", "lr": 0.1})
    _, acc = run(tmp_path, "acc", batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                 optimizer={"_component_": "torch.optim.SGD", "lr": 0.1})  # fmt: skip
    assert acc.losses == pytest.approx(big.losses, rel=1e-4)


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path):
    bad = {"_component_": "torch.optim.SGD", "lr": 1e12}
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step (\d+).*last good checkpoint: .*step_") as e:
        run(tmp_path, "nan", max_steps=20, save_every_n_steps=1, clip_grad_norm=None, optimizer=bad)
    bad_step = int(e.value.args[0].split(" at step ")[1].split()[0])
    ckpts = _checkpoints(tmp_path / "nan")
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == bad_step - 1 and all(torch.isfinite(torch.tensor(state["losses"])))
    assert not list((tmp_path / "nan" / "checkpoints").glob(".*tmp"))  # no half-written checkpoint left


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    from qatune.errors import ConfigError
    from qatune.training import check_resume

    ckpt = tmp_path / "step_4"
    ckpt.mkdir()
    run = {"batch_size": 4, "world_size": 2, "quantizer": {"scheme": "8da4w", "group_size": 32}, "seq_len": 512}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "run": run}))
    check_resume(ckpt, dict(run))  # the same run: fine
    with pytest.raises(ConfigError, match=r"saved with world_size=2, this run has world_size=1; resume with the same"):
        check_resume(ckpt, run | {"world_size": 1})
    with pytest.raises(ConfigError, match=r"quantizer=\{'scheme': '8da4w', 'group_size': 32\}, this run has quantizer"):
        check_resume(ckpt, run | {"quantizer": {"scheme": "4w", "group_size": 32}})
    check_resume(ckpt, run | {"batch_size": 2}, allow=["batch_size"])  # changed on purpose
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4}))  # saved before runs were stored
    check_resume(ckpt, run | {"batch_size": 2})


def _check_shared(rank: int, world: int, port: int, dirs: list[str]) -> None:
    import os

    from accelerate import Accelerator

    from qatune.training import check_shared_output_dir

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    accelerator = Accelerator(cpu=True)
    check_shared_output_dir(accelerator, Path(dirs[rank]))


@pytest.mark.parametrize("shared", [True, False])
def test_a_multi_process_run_needs_an_output_dir_every_rank_sees(tmp_path, shared):
    # Two gloo processes. Not shared: each rank is given its own directory, as two nodes without a shared
    # filesystem each have their own disk; rank 1 cannot see rank 0's token and every rank refuses.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = [str(tmp_path / "out")] * 2 if shared else [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for d in dirs:
        Path(d).mkdir(exist_ok=True)
    if shared:
        mp.spawn(_check_shared, args=(2, port, dirs), nprocs=2)
        assert list((tmp_path / "out").iterdir()) == []  # the token is gone
    else:
        with pytest.raises(mp.ProcessRaisedException, match=r"rank\(s\) \[1\] do not see the files rank 0 writes"):
            mp.spawn(_check_shared, args=(2, port, dirs), nprocs=2)


class MaskedBlocks(Blocks):
    """Blocks whose first tokens are masked (-100) by very different amounts, as prompts are in instruct data:
    1, 31, 16 and 28 target tokens."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        labels = item["labels"].clone()
        labels[: [31, 1, 16, 4][i % 4]] = -100
        return {"input_ids": item["input_ids"], "labels": labels}


SGD = {"_component_": "torch.optim.SGD", "lr": 0.5}


def one_masked_step(out, **overrides):
    cfg = TrainConfig(**{"max_steps": 1, "clip_grad_norm": None, **overrides})
    acc = make_accelerator(torch.device("cpu"), cfg.gradient_accumulation_steps, str(out))
    model, result = train(
        make_tiny_llama(seed=1), MaskedBlocks(n=4), cfg=cfg, optimizer_cfg=SGD, scheduler_cfg=None, accelerator=acc,
        output_dir=out, seed=0,
    )  # fmt: skip
    return model, result


def _masked_step_on_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    model, result = one_masked_step(Path(out), batch_size=1, gradient_accumulation_steps=4 // world)
    if rank == 0:
        torch.save({"state": model.state_dict(), "losses": result.losses}, Path(out) / "rank0.pt")


def test_the_loss_is_normalised_by_target_tokens_across_micro_batches(tmp_path):
    # batch 1 x 4 accumulation steps must give the gradient of one batch of 4: the mean over all 76 target tokens,
    # not the mean of four per-micro-batch means (where the block with 1 target token weighs like the full ones).
    # SGD, so that the weights after a step are the gradient (Adam's first step would hide its scale).
    big, big_run = one_masked_step(tmp_path / "big", batch_size=4)
    acc, acc_run = one_masked_step(tmp_path / "acc", batch_size=1, gradient_accumulation_steps=4)
    start = make_tiny_llama(seed=1)
    moved = [(b - s).abs().max().item() for b, s in zip(big.parameters(), start.parameters(), strict=True)]
    assert max(moved) > 1e-3  # the step did move the weights
    for b, a in zip(big.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert acc_run.losses == pytest.approx(big_run.losses, rel=1e-5)  # the logged loss is the token mean too


def test_the_loss_is_normalised_by_target_tokens_across_ranks(tmp_path):
    # Two gloo processes, batch 1 x 2 accumulation steps each: the same global batch of the 4 masked blocks, so the
    # same step as one process with batch 4 (DDP averages over ranks; the token count is summed over them).
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_masked_step_on_rank, args=(2, port, str(tmp_path / "two")), nprocs=2)
    two = torch.load(tmp_path / "two" / "rank0.pt")
    big, big_run = one_masked_step(tmp_path / "big", batch_size=4)
    for name, b in big.state_dict().items():
        torch.testing.assert_close(two["state"][name], b, rtol=1e-4, atol=1e-6)
    assert two["losses"] == pytest.approx(big_run.losses, rel=1e-5)


def test_a_runs_peak_memory_is_its_own(tmp_path):
    # The process held 512 MiB more before this run (as the baselines' models are before QAT): the run's peak
    # leaves it out. ru_maxrss, the process's lifetime peak, did not.
    from qatune.measure import current_memory

    spike = torch.ones(2**27)  # 512 MiB, touched
    before = current_memory()
    del spike
    _, result = run(tmp_path, "a", max_steps=1)
    assert result.peak_memory_bytes < before - 2**28
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["peak_memory_bytes"] <= result.peak_memory_bytes


def fresh_accelerator_state():
    """accelerate keeps one precision per process (as the recipe uses it); a test that switches resets it, as
    accelerate's own AccelerateTestCase does."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_mixed_precision_keeps_fp32_master_weights_and_optimizer_states(tmp_path, fused):
    """The GPU recipe's precision, run on CPU: fp32 weights and AdamW states, bf16 compute under autocast, with the
    fused fake quant and with torchao's own."""
    from qatune.quantization import fake_quantize_, resolve_quantizer

    cfg = TrainConfig(batch_size=4, max_steps=2, save_every_n_steps=2)
    model = fake_quantize_(make_tiny_llama(seed=1), resolve_quantizer({"scheme": "8da4w", "fused": fused}))
    computed = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: computed.append(o.dtype))
    fresh_accelerator_state()
    acc = make_accelerator(torch.device("cpu"), 1, str(tmp_path), mixed_precision="bf16")
    assert acc.mixed_precision == "bf16"
    model, result = train(
        model, Blocks(), cfg=cfg, optimizer_cfg=ADAMW, scheduler_cfg=None, accelerator=acc,
        output_dir=tmp_path / "bf16", seed=0,
    )  # fmt: skip
    assert computed and set(computed) == {torch.bfloat16}  # the linears ran in bf16
    computed.clear()
    model(input_ids=Blocks()[0]["input_ids"][None])
    assert computed == [torch.float32]  # the trained model runs as saved: autocast was a training setting
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    optimizer = torch.load(_checkpoints(tmp_path / "bf16")[-1] / "optimizer.bin", weights_only=False)
    states = [t for s in optimizer["state"].values() for t in s.values() if t.numel() > 1]
    assert states and {t.dtype for t in states} == {torch.float32}  # exp_avg, exp_avg_sq
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # bf16 compute is not fp32 compute: the same run without autocast gives a near but different first loss.
    fresh_accelerator_state()
    plain = make_accelerator(torch.device("cpu"), 1, str(tmp_path), mixed_precision="no")
    model = fake_quantize_(make_tiny_llama(seed=1), resolve_quantizer({"scheme": "8da4w", "fused": fused}))
    _, fp32 = train(
        model, Blocks(), cfg=TrainConfig(batch_size=4, max_steps=2), optimizer_cfg=ADAMW, scheduler_cfg=None,
        accelerator=plain, output_dir=tmp_path / "fp32", seed=0,
    )  # fmt: skip
    assert fp32.losses[0] == pytest.approx(result.losses[0], rel=2e-2) and fp32.losses[0] != result.losses[0]


def test_the_gpu_check_runs_on_cpu(tmp_path):
    """benchmarks/gpu_check.py's CPU twin: the three bf16 mixed-precision runs and the int4 round trip it measures."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {r["run"]: r for r in report["rows"]}
    assert set(rows) == {"plain", "fused_qat", "torchao_qat"} and not report["failures"]
    assert all(r["weights_dtype"] == "{torch.float32}" and r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["fused_qat"]["final_loss"] == rows["torchao_qat"]["final_loss"]  # the same numerics, bit for bit
    assert report["int4"]["bit_exact"] and report["int4"]["weight"] == "IntxUnpackedToInt8Tensor"
    # each row's peak memory is its own: no earlier row's model (the trained fused one) still alive at its start
    assert [rows[r]["models_alive_at_start"] for r in ("plain", "fused_qat", "torchao_qat")] == [0, 0, 0]
    assert report["fused_kernels"] == {"8da4w": True, "8da4w_bf16_autocast": True, "4w": True, "4w_bf16_autocast": True}
