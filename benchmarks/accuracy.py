"""QAT against the PTQ users would pick instead, on the same fine-tune: one table, one command (issue 27).

    python benchmarks/accuracy.py --work out/accuracy --steps 60 180 --schemes 8da4w 4w
    python benchmarks/accuracy.py --work out/accuracy --steps 180 --schemes 8da4w --rows after_float_kd   # a subset

Rows, per scheme and step count N (SmolLM2-135M, `tune run qat_recipe --config smollm2_135m`, its data and eval):
  float        the float fine-tune, N steps (`bf16_finetuned`; shared by both schemes: it never fake-quantizes)
  rtn, gptq    that float model post-training quantized: round to nearest, GPTQ (quantizer.gptq's calibration)
  qat          QAT as before issue 27: fake quant from the original model, N steps, next-token loss
  qat_kd       the same with the float fine-tune as a frozen teacher (loss = KL(teacher || student))
  after_float  QAT after the float fine-tune: qat.start=<the float model>, --phase-steps x N steps at --phase-lr
  after_float_kd     the same, distilled from the float model (the smollm2_135m default's schedule at N = 180)
  gptq_after_float_kd  the same, GPTQ-initialised (qat.init=gptq)
Every row names its whole schedule (qat.*, distillation.*), so the table does not move when the config's default does.
In-domain: the recipe's eval (8 held-out Python-docs topics, seq 128). Second domain, never trained on: the GNU GPL
v3 text every Debian/Ubuntu machine ships (/usr/share/common-licenses/GPL-3, legal English, ~8k tokens), evaluated
by `tune run eval_perplexity` (its PTQ is the recipe's rule: the same quantizer section). Every run is one `tune run`
subprocess, one at a time; a row whose report.json exists is not rerun (the command resumes). Wall time per row:
its training (+ the float fine-tune it starts from, for the after_float rows).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROWS = ("qat", "qat_kd", "after_float", "after_float_kd", "gptq_after_float_kd")
SECOND_DOMAIN = Path("/usr/share/common-licenses/GPL-3")
GPTQ = ["quantizer.gptq.samples=32", "quantizer.gptq.seq_len=512"]  # every run's: the recipe's and eval_perplexity's
EVAL = [
    "seq_len=128",
    "batch_size=8",
    "dataset.name=python_docs",
    "dataset.split=validation",
    "dataset.max_documents=8",
]  # fmt: skip  (the smollm2_135m recipe's eval)


def tune(args: list[str]) -> None:
    args = [*args, *GPTQ]
    cmd = [sys.executable, "-m", "qatune.cli", "run", *args]
    print(" ".join(["tune", "run", *args]), flush=True)
    subprocess.run(cmd, check=True)


def train(out: Path, overrides: list[str]) -> dict:
    if not (out / "report.json").is_file():
        tune(["qat_recipe", "--config", "smollm2_135m", f"output_dir={out}", "overwrite=true", "compare.baseline=false",
              "eval.measure=false", "compare.finetune_baseline=false", "export.formats=[hf]", *overrides])  # fmt: skip
    return json.loads((out / "report.json").read_text())


def row_overrides(row: str, scheme: str, steps: int, float_model: Path, args) -> list[str]:
    common = [f"quantizer.scheme={scheme}", f"max_steps={steps}", "qat.init=rtn"]
    no_teacher = ["distillation.weight=0"]
    teacher = ["distillation.weight=1.0", f"distillation.teacher={float_model}"]
    from_step_0 = ["qat.start=original", "qat.max_steps=null", "qat.lr=null", "qat.warmup_steps=null"]
    phase = [f"qat.start={float_model}", f"qat.max_steps={max(1, round(args.phase_steps * steps))}",
             f"qat.lr={args.phase_lr}", f"qat.warmup_steps={args.phase_warmup}"]  # fmt: skip
    return (
        common
        + {
            "qat": from_step_0 + no_teacher,
            "qat_kd": from_step_0 + teacher,
            "after_float": phase + no_teacher,
            "after_float_kd": phase + teacher,
            "gptq_after_float_kd": phase + teacher + ["qat.init=gptq"],
        }[row]
    )


def second_domain(out: Path, entries: dict[str, tuple[Path, str | None]], scheme: str) -> dict:
    """Perplexity on the second domain of every model, {name: (path, quantize)}, in one eval_perplexity run (again
    when the rows changed)."""
    text = out.parent / "gpl-3.txt"
    shutil.copyfile(SECOND_DOMAIN, text)
    asked = {name: [str(path), quantize] for name, (path, quantize) in entries.items()}
    if not (out / "entries.json").is_file() or json.loads((out / "entries.json").read_text()) != asked:
        (first, (path, quantize)), *rest = entries.items()
        compare = ", ".join(f"{{name: {n}, path: '{p}', quantize: {q or 'null'}}}" for n, (p, q) in rest)
        tune(["eval_perplexity", "--config", "eval_perplexity", f"model.path={path}", f"quantize={quantize or 'null'}",
              f"output_dir={out}", f"dataset.path={text}", "seq_len=128", "batch_size=8", f"quantizer.scheme={scheme}",
              f"compare_with=[{compare}]"])  # fmt: skip
        (out / "entries.json").write_text(json.dumps(asked))
    results = json.loads((out / "perplexity.json").read_text())
    return dict(zip(entries, (r["perplexity"] for r in results.values()), strict=True))


def in_domain_ptq(work: Path, float_model: Path, scheme: str) -> dict:
    out = work / f"ptq_{scheme}_{float_model.parent.parent.name}"
    if not (out / "perplexity.json").is_file():
        tune(["eval_perplexity", "--config", "eval_perplexity", f"model.path={float_model}", f"output_dir={out}",
              *EVAL, f"quantizer.scheme={scheme}", "quantize=rtn",
              f"compare_with=[{{name: gptq, path: '{float_model}', quantize: gptq}}, {{name: float, path: '{float_model}'}}]"])  # fmt: skip  # noqa: E501
    r = json.loads((out / "perplexity.json").read_text())
    return {"rtn": r["rtn"]["perplexity"], "gptq": r["gptq"]["perplexity"], "float": r["float"]["perplexity"]}


def table(work: Path, scheme: str, steps: int, rows: list[str], args) -> list[list[str]]:
    first = work / f"{args.schemes[0]}_{steps}_qat"  # its float fine-tune serves every scheme
    is_first = str(scheme == args.schemes[0]).lower()
    float_model = first / "bf16_finetuned" / "model"  # written by the first scheme's qat run, just below
    base = train(
        work / f"{scheme}_{steps}_qat",
        [*row_overrides("qat", scheme, steps, float_model, args), f"compare.finetune_baseline={is_first}"],
    )
    float_s = json.loads((first / "report.json").read_text())["training_runs"]["bf16_finetuned"]["wall_s"]
    ppl = {**in_domain_ptq(work, float_model, scheme), "qat": base["results"]["qat"]["perplexity"]}
    wall = {"float": float_s, "rtn": float_s, "gptq": float_s, "qat": base["training"]["wall_s"]}
    models = {"float": (float_model, None), "rtn": (float_model, "rtn"), "gptq": (float_model, "gptq"),
              "qat": (work / f"{scheme}_{steps}_qat" / "int4", None)}  # fmt: skip
    for row in [r for r in rows if r != "qat"]:
        report = train(work / f"{scheme}_{steps}_{row}", row_overrides(row, scheme, steps, float_model, args))
        ppl[row] = report["results"]["qat"]["perplexity"]
        wall[row] = report["training"]["wall_s"] + (float_s if row.startswith(("after", "gptq_after")) else 0)
        models[row] = (work / f"{scheme}_{steps}_{row}" / "int4", None)
    other = second_domain(work / f"second_domain_{scheme}_{steps}", models, scheme)
    f, rtn = ppl["float"], ppl["rtn"]
    out = []
    for name in models:
        recovery = "" if name == "float" else f"{100 * (rtn - ppl[name]) / (rtn - f):.1f}%"
        out.append([scheme, str(steps), name, f"{ppl[name]:.3f}", recovery, f"{other[name]:.2f}", f"{wall[name]:.0f}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("out/accuracy"))
    ap.add_argument("--steps", type=int, nargs="+", default=[60, 180])
    ap.add_argument("--schemes", nargs="+", default=["8da4w", "4w"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--phase-steps", type=float, default=0.2, help="QAT phase length, a fraction of N")
    ap.add_argument("--phase-lr", type=float, default=1e-4)
    ap.add_argument("--phase-warmup", type=int, default=0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    header = ["scheme", "N", "row", "in-domain ppl", "recovery vs RTN", "GPL-3 ppl", "train wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scheme in args.schemes:
        for steps in args.steps:
            lines += ["| " + " | ".join(r) + " |" for r in table(args.work, scheme, steps, args.rows, args)]
            print("\n".join(lines), flush=True)
    (args.work / "accuracy.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
