"""QAT + LoRA beside full QAT, same data and steps (issue 16): perplexity, recovery, trainable parameters, training
peak memory and tokens/s, from the two runs' report.json.

    python benchmarks/lora_vs_full.py --run out/bench/full out/bench/lora [override ...]   # both runs, then the table
    python benchmarks/lora_vs_full.py out/bench/full out/bench/lora                        # the table only

--run launches `tune run qat_recipe --config smollm2_135m compare.finetune_baseline=true` into the first directory and
the same with `--config smollm2_135m_lora` into the second, one after the other (never two trainings at once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(config: str, out: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "qatune.cli", "run", "qat_recipe", "--config", config, f"output_dir={out}",
           "compare.finetune_baseline=true", "overwrite=true", *overrides]  # fmt: skip
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)


def row(name: str, report: dict) -> list[str]:
    r, t = report["results"], report["training"]
    recovery = report.get("recovery")
    return [name, f"{r['qat']['perplexity']:.3f}", f"{r['ptq_finetuned']['perplexity']:.3f}",
            f"{r['bf16_finetuned']['perplexity']:.3f}", "—" if recovery is None else f"{100 * recovery:.1f}%",
            f"{t['trainable_params']:,}", f"{t['peak_memory_bytes'] / 2**20:.0f} MiB", f"{t['tokens_per_s']:.1f}",
            f"{t['steps']}"]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run both trainings first")
    ap.add_argument("full", type=Path)
    ap.add_argument("lora", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value for both runs, e.g. max_steps=60")
    args = ap.parse_args()
    if args.run:
        run("smollm2_135m", args.full, args.overrides)
        run("smollm2_135m_lora", args.lora, args.overrides)
    dirs = {"full QAT": args.full, "LoRA QAT": args.lora}
    reports = {n: json.loads((d / "report.json").read_text()) for n, d in dirs.items()}
    header = ["run", "qat ppl", "ptq_finetuned", "bf16_finetuned", "recovery", "trainable", "QAT peak", "QAT tok/s",
              "steps"]  # fmt: skip
    rows = [row(n, r) for n, r in reports.items()]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    full, lora = (reports[n]["training"] for n in ("full QAT", "LoRA QAT"))
    print(f"\nLoRA / full QAT: training peak memory {lora['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x, "
          f"tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
