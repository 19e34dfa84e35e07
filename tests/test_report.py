"""The report: recovery arithmetic, report.json round trip, report.md rows and Δ values, report.png."""

from __future__ import annotations

import json
import sys

import pytest

from qatune.report import format_table, headline, recovery, write_report


def results(**ppl: float) -> dict:
    return {name: {"perplexity": value} for name, value in ppl.items()}


def test_no_recovery_against_the_original_model():
    # QAT fine-tunes; PTQ of the original does not: (20 - 12) / (20 - 10) would credit QAT with the fine-tuning.
    r = results(bf16=10.0, ptq=20.0, qat=12.0)
    assert recovery(r) is None
    assert headline(r).startswith("No recovery figure: `qat` is fine-tuned, `bf16` and `ptq` are not")


def test_recovery_against_the_finetuned_baseline():
    # The fine-tuned pair wins over the plain one: (18 - 12) / (18 - 8) = 0.6, not (20 - 12) / (20 - 10).
    r = results(bf16=10.0, ptq=20.0, qat=12.0, bf16_finetuned=8.0, ptq_finetuned=18.0)
    assert recovery(r) == pytest.approx(0.6)
    assert recovery(results(qat=12.0, bf16_finetuned=8.0, ptq_finetuned=18.0)) == pytest.approx(0.6)
    assert recovery(results(qat=20.0, bf16_finetuned=8.0, ptq_finetuned=18.0)) == pytest.approx(-0.2)  # QAT worse
    assert headline(r).startswith("**Recovery: 60.0%**")


def test_recovery_against_gptq_and_the_headline_verdict():
    # GPTQ of the fine-tuned model loses 6 of RTN's 10: QAT at 12 wins back 60% of RTN's loss, 2/6 of GPTQ's.
    r = results(qat=12.0, bf16_finetuned=8.0, ptq_finetuned=18.0, gptq_finetuned=14.0)
    assert recovery(r, "gptq_finetuned") == pytest.approx(2 / 6)
    assert headline(r).endswith("QAT int4 beats GPTQ int4 of the same fine-tuned model: 12.000 vs 14.000.")
    r = results(qat=15.0, bf16_finetuned=8.0, ptq_finetuned=18.0, gptq_finetuned=14.0)
    assert "QAT int4 does not beat GPTQ int4" in headline(r) and recovery(r, "gptq_finetuned") < 0


def test_recovery_is_none_when_not_computable():
    assert recovery(results(bf16=10.0, ptq=20.0)) is None  # no qat
    assert recovery(results(bf16=10.0, qat=12.0)) is None  # no ptq
    assert recovery(results(bf16=10.0, ptq=10.0, qat=12.0)) is None  # PTQ lost nothing
    assert recovery(results(bf16=10.0, ptq=20.0, qat=12.0, bf16_finetuned=8.0)) is None  # no ptq_finetuned
    assert recovery({}) is None


def full_report() -> dict:
    measured = {"size_bytes": 538_000_000, "linear_bits_per_weight": 32.0, "peak_memory_bytes": 900 * 2**20,
                "prefill_tokens_per_s": 340.0, "decode_tokens_per_s": 15.4, "threads": 2, "device": "cpu",
                "prompt_len": 128, "decode_tokens": 32, "runs": 5}  # fmt: skip
    r = {
        "bf16": {"perplexity": 10.0, **measured},
        "ptq": {"perplexity": 12.5, **measured, "size_bytes": 200 * 2**20, "linear_bits_per_weight": 5.0},
        "qat": {"perplexity": 11.0, **measured},
        "bf16_finetuned": {"perplexity": 9.0},
        "ptq_finetuned": {"perplexity": 13.0},
        "qat_lora": {"perplexity": 10.5},
    }
    return {
        "model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "config": {"seed": 0, "quantizer": {"scheme": "8da4w", "group_size": 32}},
        "results": r,
        "recovery": recovery(r),
        "training": {
            "steps": 40,
            "tokens": 81920,
            "tokens_per_s": 35.5,
            "peak_memory_bytes": 3 * 2**30,
            "wall_s": 2300.0,
        },
    }


def test_write_report_files(tmp_path):
    report = full_report()
    assert report["recovery"] == pytest.approx(0.5)  # (13 - 11) / (13 - 9)
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    assert json.loads(paths["json"].read_text()) == report

    md = paths["md"].read_text()
    rows: dict[str, list[str]] = {}  # model -> its cells (padding-agnostic)
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells)  # the results table comes first
    assert set(report["results"]) <= set(rows)
    # Δ vs bf16 = 10.0: absolute and relative.
    assert rows["ptq"][1:4] == ["12.500", "+2.500", "+25.0%"]
    assert rows["qat"][1:4] == ["11.000", "+1.000", "+10.0%"]
    assert rows["bf16_finetuned"][1:4] == ["9.000", "-1.000", "-10.0%"]
    assert rows["bf16"][1:4] == ["10.000", "+0.000", "+0.0%"]
    assert "200.0 MiB" in rows["ptq"] and "5.00" in rows["ptq"] and "900.0 MiB" in rows["bf16"]
    assert "**Recovery: 50.0%**" in md and "(ptq_finetuned − qat) / (ptq_finetuned − bf16_finetuned)" in md
    assert "- `ptq`: the original model, post-training quantized" in md  # the legend says what each row is
    training = [
        cells
        for line in md.splitlines()
        if line.startswith("| qat ") and (cells := [c.strip() for c in line.strip().strip("|").split("|")])
    ]
    assert ["qat", "40", "81920", "35.5", "3072.0 MiB", "2300.0", "—"] in training  # no trainable_params recorded
    assert not list(tmp_path.glob("out/*.tmp")) and not list(tmp_path.glob("out/.*"))  # atomic: no leftovers

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(paths["png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_write_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    paths = write_report(full_report(), tmp_path)
    assert set(paths) == {"json", "md"}
    assert not (tmp_path / "report.png").exists()
    assert "report.png skipped" in capsys.readouterr().out
    assert "report.png" not in paths["md"].read_text()


def test_write_report_rejects_a_report_without_results(tmp_path):
    with pytest.raises(ValueError, match="results"):
        write_report({"model": {}}, tmp_path)


def test_format_table_has_every_model_and_missing_cells():
    text = format_table(results(bf16=14.80, ptq=25.12, qat=13.36))
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["model", "perplexity"]
    assert [line.split()[0] for line in lines[2:]] == ["bf16", "ptq", "qat"]
    assert lines[3].split()[1:4] == ["25.120", "+10.320", "+69.7%"]
    assert "—" in lines[3]  # unmeasured size
    assert len({len(line) for line in lines}) == 1  # aligned
