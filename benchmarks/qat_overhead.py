"""What fake quantization costs a training step: tokens/s and peak memory without it, with torchao's, with ours.

    python benchmarks/qat_overhead.py                               # SmolLM2-135M-Instruct, batch 4 x 512 tokens
    python benchmarks/qat_overhead.py --model path/to/hf_dir --batch-size 2 --seq-len 128 --steps 5 --threads 1

One training step = forward + backward + AdamW step on one batch of random tokens (the speed of fake quant does not
depend on the text). Variants, each in a fresh process so that its peak memory is its own:
  (a) plain    no fake quantization
  (b) torchao  torchao's FakeQuantizedLinear as QATConfig prepares it (quantizer.fused=false)
  (c) fused    the same modules with qatune.fused_fake_quant's forward (quantizer.fused=true, the default)
Seconds per step are the median of `--steps` steps after `--warmup` warm-up steps. Peak memory is the process's peak
RSS on CPU (loading included, the same for every variant), torch's peak allocation on CUDA. On CPU every variant
runs with glibc's mmap threshold fixed as qatune's trainer sets it (qatune.device.mmap_large_cpu_tensors);
`--glibc-default` leaves glibc's dynamic threshold, whose heap fragmentation adds 10-20% to the peaks. The last line is
`ratio (c)/(a): X.XX` (tokens/s of fused over plain).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from qatune.report import markdown_table

VARIANTS = ("plain", "torchao", "fused")
MARKER = "RESULT "


def measure_one(args: argparse.Namespace) -> dict:
    """Runs in the child process: load, (fake-)quantize, train `warmup + steps` steps; returns one row."""
    import torch

    from qatune.device import mmap_large_cpu_tensors, resolve_device
    from qatune.models import load_model
    from qatune.quantization import QuantScheme, fake_quantize_

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cpu" and not args.glibc_default:
        mmap_large_cpu_tensors()  # as qatune's trainer does on CPU, for every variant
    model = load_model(args.model, dtype="auto", device=device)
    if args.one != "plain":
        q = QuantScheme(scheme=args.scheme, group_size=args.group_size, fused=args.one == "fused")
        fake_quantize_(model, q)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also synchronizes on CUDA
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[args.warmup :])
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "variant": args.one,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "step_times_s": times,
        "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "peak_memory_bytes": peak,
        "losses": losses,
    }


def run_child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--model", args.model, "--device", args.device,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--scheme", args.scheme, "--group-size", str(args.group_size),
           "--threads", str(args.threads), *(["--glibc-default"] if args.glibc_default else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(MARKER))


def format_rows(rows: list[dict]) -> str:
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    header = ["variant", "s/step", "tokens/s", "peak MiB", "tokens/s vs plain", "peak vs plain"]
    table = [header]
    for r in rows:
        table.append([
            r["variant"], f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}" if plain else "—",
            f"{r['peak_memory_bytes'] / plain['peak_memory_bytes']:.2f}" if plain else "—",
        ])  # fmt: skip
    return "\n".join(markdown_table(table[0], table[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="HF id or local HF dir")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="measured steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scheme", default="8da4w", help="8da4w | 4w | 8da8w")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument(
        "--glibc-default", action="store_true", help="leave glibc's mmap threshold alone (qatune's trainer fixes it)"
    )
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()

    if args.one:
        print(MARKER + json.dumps(measure_one(args)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {VARIANTS}")
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, not {args.steps} and {args.warmup}")
    rows = []
    for variant in variants:
        row = run_child(variant, args)
        rows.append(row)
        print(f"measured {variant}: {json.dumps(row)}", file=sys.stderr, flush=True)
    first = rows[0]
    print(f"{args.model}: one training step (forward + backward + AdamW) on batch {args.batch_size} x "
          f"{args.seq_len} tokens, {args.scheme} g{args.group_size}, median of {args.steps} steps after "
          f"{args.warmup} warm-up; device {first['device']}, {first['dtype']}, {first['threads']} threads")  # fmt: skip
    print(format_rows(rows))
    if args.json:
        from qatune.files import atomic_write_json

        atomic_write_json(args.json, rows)
    by_name = {r["variant"]: r for r in rows}
    if "plain" in by_name and "fused" in by_name:
        print(f"ratio (c)/(a): {by_name['fused']['tokens_per_s'] / by_name['plain']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
