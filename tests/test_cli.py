"""The `tune` command as a user types it: ls, cp, validate of every shipped config, run errors."""

import os
import subprocess
import sys

import pytest

from qatune import registry
from qatune.cli import main

SHIPPED = [(recipe, name) for recipe, names in registry.list_recipes().items() for name in names]


def test_ls_lists_every_recipe_and_config(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for recipe, name in SHIPPED:
        assert recipe in out and name in out
    assert {"qat_recipe", "eval_perplexity"} <= set(registry.list_recipes())
    expected = {"llama2_7b", "llama3_8b", "llama3_1_8b", "llama3_2_1b", "llama3_2_3b", "smollm2_135m", "smollm2_360m"}
    assert expected <= set(registry.list_recipes()["qat_recipe"])


@pytest.mark.parametrize(("recipe", "name"), SHIPPED)
def test_every_shipped_config_validates(recipe, name, capsys):
    # export's default model.path is the int4 dir a qat_recipe run writes: there after that run, not on a fresh clone
    after_a_run = ["model.path=HuggingFaceTB/SmolLM2-135M-Instruct"] if recipe == "export" else []
    assert main(["validate", name, *after_a_run]) == 0
    assert f"valid for recipe {recipe}" in capsys.readouterr().out


def test_cp_then_validate_the_copy(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    assert main(["cp", "llama3_8b", str(dest)]) == 0
    assert dest.read_text() == (registry.configs_dir() / "qat_recipe" / "llama3_8b.yaml").read_text()
    assert main(["validate", str(dest), "batch_size=1"]) == 0
    assert "valid for recipe qat_recipe" in capsys.readouterr().out
    assert main(["cp", "llama3_8b", str(dest)]) == 2  # refuses to overwrite without --force
    assert "already exists" in capsys.readouterr().err


def test_validate_reports_a_bad_copy_in_one_line(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    main(["cp", "smollm2_135m", str(dest)])
    dest.write_text(dest.read_text().replace("batch_size: 4", "batch_sise: 4"))
    assert main(["validate", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_sise" in err and "batch_size" in err


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("no_such_key=3", "no_such_key"),
        ("quantizer.scheme=8da3w", "8da3w"),
        ("optimizer._component_=torch.optim.AdamV", "AdamV"),
        ("batch_size=four", "batch_size"),
        ("export.formats=[hf,onnx]", "onnx"),
        ("self_distillation=1.5", "self_distillation"),
    ],
)
def test_run_with_bad_override_fails_before_loading(override, expected):
    # A real subprocess through the installed console script: exit code and the exact stderr a user sees.
    proc = subprocess.run(
        [sys.executable, "-m", "qatune.cli", "run", "qat_recipe", "--config", "llama3_8b", override],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1]
    assert "Traceback" not in proc.stderr


def test_unknown_names_suggest_close_ones(capsys):
    assert main(["run", "qat_recipie", "--config", "llama3_8b"]) == 2
    assert "qat_recipe" in capsys.readouterr().err
    assert main(["validate", "llama3_8"]) == 2
    assert "llama3_8b" in capsys.readouterr().err


def test_validate_says_which_checks_need_a_config_json_it_does_not_have(tmp_path):
    """A hub id not downloaded yet: validate cannot match lora.target_modules against the model, and says so (tune
    run refuses a bad target only after loading). Once config.json is in the HF cache, validate checks it."""
    import json

    from conftest import make_tiny_llama

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "QATUNE_CACHE": str(tmp_path)}
    argv = [sys.executable, "-m", "qatune.cli", "validate", "llama3_8b_lora", "model.path=someone/tiny-llama",
            "lora.target_modules=[no_such_proj]", f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = "not checked: lora.target_modules against the model's linears (model.path 'someone/tiny-llama'"
    assert expected in proc.stdout
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(make_tiny_llama().config.to_dict()))
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llama" / "refs" / "main").write_text("abc123")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "'no_such_proj' matches no linear layer" in proc.stderr, proc.stderr[-2000:]
