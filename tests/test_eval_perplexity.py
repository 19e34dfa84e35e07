"""`tune run eval_perplexity`: float, PTQ on the fly and a saved int4 checkpoint side by side."""

import json

import pytest

from qatune.cli import load_recipe_config, main
from qatune.models import load_model, load_tokenizer
from qatune.quantization import PTQ_QUANTIZER, quantize_ptq_, resolve_quantizer, save_quantized


def test_float_ptq_and_saved_int4_side_by_side(tiny_checkpoint, tmp_path, capsys):
    # A PTQ'd int4 checkpoint on disk must evaluate exactly like PTQ on the fly of the same float model.
    int4 = tmp_path / "int4"
    q = resolve_quantizer(PTQ_QUANTIZER)  # eval_perplexity's default quantizer section: qat_recipe's (lm_head float)
    model = quantize_ptq_(load_model(str(tiny_checkpoint)), q)
    save_quantized(model, load_tokenizer(str(tiny_checkpoint)), int4)
    out = tmp_path / "eval"
    overrides = [
        f"model.path={tiny_checkpoint}", f"output_dir={out}", "seq_len=64", "dataset.max_documents=4",
        f"compare_with=[{{name: ptq, path: '{tiny_checkpoint}', quantize: rtn}}, {{name: int4, path: '{int4}'}}]",
    ]  # fmt: skip
    module, cfg = load_recipe_config("eval_perplexity", "eval_perplexity", overrides)
    results = module.main(cfg)
    saved = json.loads((out / "perplexity.json").read_text())
    assert list(saved) == ["model", "ptq", "int4"] and saved == json.loads(json.dumps(results))
    assert saved["int4"]["perplexity"] == pytest.approx(saved["ptq"]["perplexity"], rel=1e-6)
    assert saved["ptq"]["perplexity"] != pytest.approx(saved["model"]["perplexity"], rel=1e-4)
    assert all(r["tokens"] == saved["model"]["tokens"] > 0 for r in saved.values())
    printed = capsys.readouterr().out
    assert all(f"{name} " in printed for name in saved)


def test_bad_quantize_value_fails_before_loading(capsys):
    assert main(["run", "eval_perplexity", "--config", "eval_perplexity", "quantize=int3"]) == 2
    err = capsys.readouterr().err
    assert "int3" in err and "rtn or gptq" in err


def test_the_old_scheme_spelling_names_the_new_one(capsys):
    assert main(["run", "eval_perplexity", "--config", "eval_perplexity", "quantize=4w"]) == 2
    assert "use quantize=rtn (or gptq) quantizer.scheme=4w" in capsys.readouterr().err
