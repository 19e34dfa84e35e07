"""Bad inputs get one line naming the bad value and what is accepted, exit code 2, and nothing written, before any
weight loads (`tune validate` rejects the same ones). Each case here was a traceback, a late error or silence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import make_tiny_llama

from qatune.cli import main
from qatune.errors import ConfigError

# (override, what the one line must name). All need no weights: validate rejects them, run rejects them at once.
WEIGHT_FREE = [
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0: give an integer >= 1"),
    ("batch_size=0", "batch_size=0: give an integer >= 1"),
    ("batch_size=-1", "batch_size=-1: give an integer >= 1"),
    ("optimizer.lr=nan", "optimizer.lr=nan: give a positive finite learning rate"),
    ("optimizer.lr=-1", "optimizer.lr=-1"),
    ("max_steps=-5", "max_steps=-5: give an integer >= 1 (or null"),
    ("max_steps=0", "max_steps=0"),
    ("keep_last_n_checkpoints=0", "keep_last_n_checkpoints=0: give an integer >= 1"),
    ("clip_grad_norm=0", "clip_grad_norm=0.0: give a positive number, or null"),
    ("seq_len=1", "seq_len=1: give an integer >= 2"),
    ("distributed.strategy=zero3", "distributed.strategy 'zero3' is not one of ddp, fsdp2"),
    ("mixed_precision=fp8", "mixed_precision 'fp8' is not one of auto, bf16, no"),
    ("device=tpu", "device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ("model.dtype=fp8", "model.dtype 'fp8' is not one of auto, bf16"),
    ("dataset.format=xml", "dataset.format 'xml' is not one of text, instruct, chat"),
    ("eval.protocol=wikitext", "eval.protocol 'wikitext' is not one of gptq, lm_eval, sliding"),
    ("eval.batch_size=0", "eval.batch_size=0: give an integer >= 1"),
    ("eval.runs=0", "eval.runs=0: give an integer >= 1"),
    ("~seq_len", "cannot delete 'seq_len': the recipe always has this key; set it instead"),
    ("~model", "cannot delete 'model'"),
    ("~no_such_key", "cannot delete 'no_such_key': no such key (valid: activation_checkpointing, batch_size"),
    ("output_dir=README.md", "output_dir 'README.md' is a file"),
    ("output_dir=README.md/out", "output_dir 'README.md/out': 'README.md' is a file"),
    ("output_dir=locked/out", "output_dir 'locked/out': 'locked' is not writable by this user"),
    ("output_dir=previous", "output_dir 'previous' holds a previous run (int4/, report.json); pass overwrite=true"),
    ("overwrite=true resume=true", "overwrite=true and resume=true contradict"),
    ("model.path=README.md", "model.path 'README.md' is a file; give the checkpoint directory"),
    ("model.path=", "model.path is empty: give a checkpoint directory or a hub id"),
    ("model.path=broken", "broken/config.json is not valid JSON"),
    ("model.path=no/such/dir", "model.path 'no/such/dir': no such checkpoint directory"),
    ("eval_dataset.max_documents=0", "eval_dataset.max_documents must be a positive integer or null, got 0"),
    ("dataset.path=nope.jsonl", "dataset.path 'nope.jsonl' does not exist"),
    ("quantizer.embedding=int2", "quantizer embedding 'int2' is not one of none, int8, int4"),
    ("quantizer.embedding_group_size=48", "quantizer embedding_group_size 48 is not supported; use one of (32, 64"),
]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


@pytest.fixture
def inputs(tmp_path, monkeypatch, tiny_tokenizer):
    """A working directory holding the bad inputs, and `trap`: a checkpoint whose config and tokenizer load but
    whose weights are garbage, so an error that came after the weights started loading would say so instead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("a file, not a directory\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama", "hidden')  # a download cut short
    (tmp_path / "locked").mkdir(mode=0o500)
    (tmp_path / "previous" / "int4").mkdir(parents=True)
    (tmp_path / "previous" / "report.json").write_text("{}\n")
    trap = tmp_path / "trap"
    make_tiny_llama(vocab_size=len(tiny_tokenizer)).config.save_pretrained(trap)
    tiny_tokenizer.save_pretrained(trap)
    (trap / "model.safetensors").write_bytes(b"not safetensors")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    yield tmp_path
    (tmp_path / "locked").chmod(0o700)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: the not-writable case cannot fail as root")
def test_a_directory_this_user_cannot_write_is_refused(inputs, capsys):
    assert main(["validate", "smollm2_135m", "output_dir=locked/out"]) == 2
    assert "output_dir 'locked/out': 'locked' is not writable by this user" in one_error_line(capsys)


@pytest.mark.parametrize(("override", "message"), [c for c in WEIGHT_FREE if "locked" not in c[0]])
def test_validate_rejects_what_run_would(override, message, capsys, inputs):
    overrides = override.split(" ")
    assert main(["validate", "smollm2_135m", *overrides]) == 2
    assert message in one_error_line(capsys)
    if not override.startswith("model.path"):
        overrides.append("model.path=trap")
    if not override.startswith(("~", "output_dir")):
        overrides.append("output_dir=out")
    elif override.startswith("~"):  # the default output_dir (out/...) would be fine, but keep it inside tmp_path
        overrides.append("output_dir=out")
    assert main(["run", "qat_recipe", "--config", "smollm2_135m", *overrides]) == 2
    assert message in one_error_line(capsys)


# Found only once the file is read: after the tokenizer, before any weights (the trap's would fail to load).
DATA_FILES = [
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b"\n', "dataset.path 'bad.jsonl': line 2 is not valid JSON (Expecting"),
    ("binary.jsonl", b'{"text": "a"}\n{"text": "\xff\xfe"}\n', "dataset.path 'binary.jsonl': line 2 is not UTF-8"),
    ("binary.txt", b"text\n\x89PNG\r\n\x00\xff", "dataset.path 'binary.txt': line 2 is not UTF-8 text (byte 0x89"),
]


@pytest.mark.parametrize(("name", "data", "message"), DATA_FILES)
def test_an_unreadable_data_file_is_named_with_its_line(name, data, message, capsys, inputs):
    (inputs / name).write_bytes(data)
    argv = [
        "run",
        "qat_recipe",
        "--config",
        "smollm2_135m",
        "model.path=trap",
        f"dataset.path={name}",
        "output_dir=out",
    ]
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    (inputs / name).unlink()  # the fixture checks that nothing else was written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["compare_with=[{name: int4, path: no/such/int4}]"], "compare_with[0].path 'no/such/int4': no such"),
        (["compare_with=[{name: model, path: trap}]"], "compare_with[0].name 'model' is taken"),
        (["output_dir=README.md"], "output_dir 'README.md' is a file"),
        (["protocol=wikitext"], "protocol 'wikitext' is not one of gptq, lm_eval, sliding"),
        (["stride=16"], "stride=16 is only used by protocol sliding, not 'gptq'"),
    ],
)
def test_eval_perplexity_checks_every_model_before_the_first_evaluation(overrides, message, capsys, inputs):
    for argv in (["validate", "eval_perplexity"], ["run", "eval_perplexity", "--config", "eval_perplexity"]):
        assert main([*argv, "model.path=trap", *overrides]) == 2
        assert message in one_error_line(capsys)


def test_a_config_of_another_recipe_names_that_recipe(capsys, inputs):
    assert main(["run", "eval_perplexity", "--config", "smollm2_135m"]) == 2
    assert "config 'smollm2_135m' is a qat_recipe config: tune run qat_recipe --config smollm2_135m" in one_error_line(
        capsys
    )
    main(["cp", "smollm2_135m", "copy.yaml"])
    capsys.readouterr()
    assert main(["run", "eval_perplexity", "--config", "copy.yaml"]) == 2
    assert "(copy.yaml is a valid qat_recipe config: tune run qat_recipe --config copy.yaml)" in one_error_line(capsys)
    (inputs / "copy.yaml").unlink()


def test_debug_shows_the_traceback_of_a_one_line_error(capsys, inputs):
    with pytest.raises(ConfigError, match="batch_size=0"):
        main(["--debug", "validate", "smollm2_135m", "batch_size=0"])


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


def test_a_previous_run_is_kept_unless_overwrite(tiny_checkpoint, tiny_tokenizer, tmp_path, capsys):
    from test_qat_recipe import tiny_overrides

    out = tmp_path / "out"
    argv = ["run", "qat_recipe", "--config", "smollm2_135m"]
    first = tiny_overrides(tiny_checkpoint, out, "compare.baseline=false", "max_steps=1", "save_every_n_steps=1")
    assert main([*argv, *first, "export.formats=[hf,gguf]"]) == 0
    (out / "notes.txt").write_text("mine\n")  # not a run's file: overwrite leaves it
    report = (out / "report.json").read_bytes()
    capsys.readouterr()
    # A second run into the same output_dir: refused before anything loads, the first run's files untouched.
    assert main([*argv, *first]) == 2
    line = one_error_line(capsys)
    assert f"output_dir '{out}' holds a previous run (bf16_finetuned/" not in line  # only what is there
    assert f"output_dir '{out}' holds a previous run (int4/, model-q4_0.gguf, qat/, report.json" in line
    assert (out / "report.json").read_bytes() == report
    # resume=true with the same run: its checkpoint is at the last step, and the run says so (then evaluates, saves).
    assert main([*argv, *first, "resume=true"]) == 0
    assert "the checkpoint is at the run's last step (1): no step left to train" in capsys.readouterr().out
    report = (out / "report.json").read_bytes()
    # resume=true continues the checkpoints, but not with another model: one line naming it, before it loads.
    other = tmp_path / "three_layers"
    make_tiny_llama(vocab_size=len(tiny_tokenizer), tie_word_embeddings=True, layers=3).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    capsys.readouterr()  # save_pretrained's progress bar
    resumed = tiny_overrides(other, out, "compare.baseline=false", "max_steps=2", "resume=true")
    assert main([*argv, *resumed]) == 2
    line = one_error_line(capsys)
    ckpt = out / "qat" / "checkpoints" / "step_1"
    assert line.startswith(f"error: resume=true: {ckpt} was saved with model.path='{tiny_checkpoint}', this run has ")
    assert f"model.path='{other}'; resume with the same value, add model.path to resume_allow_changes" in line
    # Allowed on purpose, the weights themselves do not fit: that too is one line, naming the first key.
    assert main([*argv, *resumed, "resume_allow_changes=[model.path]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: resume=true: checkpoint {ckpt} does not fit this model (")
    assert "model.layers.2" in last and "resume with the model and quantizer it was saved with" in last
    # overwrite=true: the previous run's files go first (its GGUF too, which this run does not write).
    assert main([*argv, *first, "overwrite=true"]) == 0
    assert not (out / "model-q4_0.gguf").exists() and (out / "notes.txt").read_text() == "mine\n"
    assert (out / "report.json").read_bytes() != report and (out / "int4" / "config.json").is_file()


def test_a_bug_keeps_its_traceback(tmp_path):
    # Only the project's own errors become one line: a ValueError from anywhere else (here a recipe's bug) is raised
    # through, traceback and all, instead of being flattened into "error: ..." as every ValueError once was.
    recipe = tmp_path / "buggy_recipe.py"
    recipe.write_text("def main(cfg):\n    raise ValueError('an internal bug')\n")
    config = tmp_path / "buggy.yaml"
    config.write_text("seed: 0\n")
    with pytest.raises(ValueError, match="an internal bug") as e:
        main(["run", str(recipe), "--config", str(config)])
    assert not isinstance(e.value, ConfigError)


def test_unreadable_weights_are_one_line_naming_the_model(inputs, capsys):
    overrides = ["model.path=trap", "output_dir=out", "seq_len=64", "compare.baseline=false"]
    assert main(["run", "qat_recipe", "--config", "smollm2_135m", *overrides]) == 2
    line = one_error_line(capsys)
    assert "model.path 'trap': its weights could not be read (Error while deserializing header" in line


def test_a_failure_on_rank_0_stops_every_rank_at_once(inputs):
    """FSDP2: rank 0 alone reads the weights; when it fails the other rank stops with one line instead of waiting at
    a collective until the timeout, and the launcher's summary is one line too."""
    overrides = ["model.path=trap", "output_dir=out", "seq_len=64", "compare.baseline=false",
                 "distributed.strategy=fsdp2"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "qatune.cli", "run", "--nproc_per_node", "2", "qat_recipe", "--config", "smollm2_135m",
         *overrides], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # Rank 0's line and the other rank's (which names rank 0's error): whichever exits first, torchrun stops the
    # other, so one of the two may be cut (a race); the cause is in each, and the launcher's summary is last.
    cause = "model.path 'trap': its weights could not be read (Error while deserializing header"
    assert any(cause in e for e in errors[:-1]), errors
    first_words = ("error: model.path", "error: rank 0 failed (ConfigError: model.path")
    assert all(e.startswith(first_words) for e in errors[:-1])
    assert errors[-1].startswith("error: workers failed (rank 0 exit code ") and "rank 1 exit code" in errors[-1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rank=0", "lora.rank=0: give an integer >= 1"),
        ("lora.alpha=-1", "lora.alpha=-1.0: give a positive number"),
        ("lora.dropout=0.05", "lora.dropout=0.05: only 0; the adapter is merged inside the fake-quantized weight"),
        ("lora.target_modules=[qproj]", "lora.target_modules: 'qproj' matches no linear layer; the model has ['down_"),
        ("distributed.strategy=fsdp2", "lora with distributed.strategy=fsdp2: not supported"),
    ],
)
def test_bad_lora_values_get_one_line_before_weights_load(override, message, capsys, inputs):
    overrides = [override, "model.path=trap", "output_dir=out"]  # trap: its weights would fail to load
    assert main(["validate", "smollm2_135m_lora", *overrides]) == 2
    assert message in one_error_line(capsys)
    assert main(["run", "qat_recipe", "--config", "smollm2_135m_lora", *overrides]) == 2
    assert message in one_error_line(capsys)


def test_a_lora_key_on_a_config_without_lora_says_which_config(capsys):
    assert main(["validate", "smollm2_135m", "+lora.rank=8"]) == 2
    assert "lora is null in this config" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quantizer.embedding=int4", "quantizer.embedding_group_size=64"],
         "quantizer embedding_group_size 64 does not divide model.embed_tokens's embedding_dim 96; use one of [32]"),
        (["quantizer.skip=[embed]"], "quantizer skip pattern 'embed' matches no linear layer or embedding (names look"),
    ],
)  # fmt: skip
def test_quantizer_settings_the_model_cannot_take_are_refused_from_config_json(
    overrides, message, capsys, inputs, tmp_path_factory
):
    wide = tmp_path_factory.mktemp("wide")  # outside `inputs`, which checks that nothing is written there
    config = make_tiny_llama().config
    config.hidden_size = 96
    config.save_pretrained(wide)  # a config.json, no weights: the check must not need them
    overrides = [f"model.path={wide}", *overrides, "output_dir=out"]
    assert main(["validate", "smollm2_135m", *overrides]) == 2
    assert message in one_error_line(capsys)
    assert main(["run", "qat_recipe", "--config", "smollm2_135m", *overrides]) == 2
    assert message in one_error_line(capsys)
