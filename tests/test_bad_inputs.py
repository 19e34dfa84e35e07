"""Bad inputs get one line naming the bad value and what is accepted, exit code 2, and nothing written, before any
weight loads (`tune validate` rejects the same ones). Each case here was a traceback, a late error or silence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qatune.cli import main

# (override, what the one line must name). All need no weights: validate rejects them, run rejects them at once.
WEIGHT_FREE = [
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0: give an integer >= 1"),
    ("batch_size=0", "batch_size=0: give an integer >= 1"),
    ("batch_size=-1", "batch_size=-1: give an integer >= 1"),
    ("optimizer.lr=nan", "optimizer.lr=nan: give a positive finite learning rate"),
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("max_steps=-5", "max_steps=-5: give an integer >= 1 (or null"),
    ("max_steps=0", "max_steps=0"),
    ("clip_grad_norm=0", "clip_grad_norm=0.0: give a positive number, or null"),
    ("distributed.strategy=zero3", "distributed.strategy 'zero3' is not one of ddp, fsdp2"),
    ("~seq_len", "cannot delete 'seq_len': the recipe always has this key; set it instead"),
    ("~model", "cannot delete 'model'"),
    ("~no_such_key", "cannot delete 'no_such_key': no such key (valid: activation_checkpointing, batch_size"),
    ("output_dir=README.md", "output_dir 'README.md' is a file"),
    ("output_dir=README.md/out", "output_dir 'README.md/out': 'README.md' is a file"),
    ("model.path=README.md", "model.path 'README.md' is a file; give the checkpoint directory"),
    ("model.path=", "model.path is empty: give a checkpoint directory or a hub id"),
    ("model.path=broken", "broken/config.json is not valid JSON"),
    ("eval_dataset.max_documents=0", "eval_dataset.max_documents must be a positive integer or null, got 0"),
]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Loading" not in captured.out + captured.err  # no weights were loaded
    return lines[0]


@pytest.mark.parametrize(("override", "message"), WEIGHT_FREE)
def test_validate_rejects_what_run_would(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("a file, not a directory\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama", "hidden')  # a download cut short
    assert main(["validate", "smollm2_135m", override]) == 2
    assert message in one_error_line(capsys)
    out = tmp_path / "out"
    overrides = [override] if override.startswith(("~", "output_dir")) else [override, f"output_dir={out}"]
    if override.startswith("~"):  # the default output_dir (out/...) would be fine, but keep it inside tmp_path
        overrides.append(f"output_dir={out}")
    assert main(["run", "qat_recipe", "--config", "smollm2_135m", *overrides]) == 2
    assert message in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "broken"]  # nothing written


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_an_empty_config_is_not_valid(text, capsys, tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    for argv in (["validate", str(path)], ["run", "qat_recipe", "--config", str(path)]):
        assert main(argv) == 2
        assert "the config is empty (no keys); start from a shipped one: tune cp" in one_error_line(capsys)


def test_no_lr_scheduler_is_a_constant_rate(capsys, tmp_path):
    assert main(["validate", "smollm2_135m", "lr_scheduler=null"]) == 0
    yaml = tmp_path / "no_scheduler.yaml"  # a copy of the default with its lr_scheduler section removed
    main(["cp", "smollm2_135m", str(yaml)])
    lines = yaml.read_text().splitlines()
    start = lines.index("lr_scheduler:")
    kept = lines[:start] + [line for line in lines[start + 1 :] if not line.startswith("  num_warmup_steps")]
    kept = [line for line in kept if "get_cosine_schedule_with_warmup" not in line]
    yaml.write_text("\n".join(kept) + "\n")
    capsys.readouterr()
    assert main(["validate", str(yaml)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "estimate"])
def test_a_process_count_below_one_is_refused(command, capsys):
    argv = [command, *(["qat_recipe"] if command == "run" else []), "--config", "llama3_8b", "--nproc_per_node", "0"]
    assert main(argv) == 2
    assert "--nproc_per_node 0: give a count >= 1" in one_error_line(capsys)


def test_a_loss_that_becomes_nan_ends_in_one_line(tiny_checkpoint, tmp_path):
    # lr_scheduler=null: the constant-rate path runs (it was a TypeError before training started)
    from test_qat_recipe import tiny_overrides

    overrides = tiny_overrides(
        tiny_checkpoint, tmp_path / "out", "compare.baseline=false", "optimizer.lr=1e30", "lr_scheduler=null"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "qatune.cli", "run", "qat_recipe", "--config", "smollm2_135m", *overrides],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became") and "lower optimizer.lr" in last
