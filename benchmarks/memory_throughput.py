"""Size, peak memory and batch-1 speed of a float model vs its torchao int4 PTQ, each in a fresh process.

    python benchmarks/memory_throughput.py                      # SmolLM2-135M-Instruct: float, 8da4w, 4w
    python benchmarks/memory_throughput.py --model path/to/hf_dir --schemes float,8da4w --runs 5 --threads 1

Float is fp32 on the CPU, bf16 on a GPU. 8da4w = int8 dynamic per-token activations + int4 symmetric
group-32 weights; 4w = int4 weights only. Each model is loaded, quantized and measured in its own
subprocess so that its peak memory is its own (the float weights of a previous model, or allocator caches,
would otherwise count). Columns: size in memory (torchao keeps int4 values in int8) and packed (4 bits +
scales), bits per linear weight (packed / stored), peak RSS while generating (the whole process: Python,
torch, tokenizer, weights, activations, KV cache; `baseline MiB` is the RSS of the same process with the
model loaded, before generating), the process's peak over its whole life (loading the float weights before
quantizing them included), prefill and decode tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time

from qatune.report import markdown_table

SCHEMES = ("float", "8da4w", "4w")
MARKER = "RESULT "


def own_weights(model) -> None:
    """Copy plain weights out of the checkpoint's mmap, then give freed heap back to the OS.

    transformers loads safetensors through mmap; once quantize_ has read every weight, the whole file's
    pages are resident and stay mapped while any float weight (the embedding) is still a view into it:
    ~400 MB of fp32 residue in RSS for SmolLM2-135M. A deployed int4 model holds none of it.
    """
    import torch

    from qatune.device import release_free_heap

    for p in model.parameters():
        if type(p) is torch.nn.Parameter and p.device.type == "cpu":
            p.data = p.data.clone()
    gc.collect()
    release_free_heap()


def measure_one(args: argparse.Namespace) -> dict:
    """Runs in the child process: load, quantize, measure; returns one row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatune.device import resolve_device
    from qatune.measure import measure_model
    from qatune.models import resolve_model_path
    from qatune.quantization import quantize_ptq_, resolve_quantizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 is slower than fp32 on this CPU
    path = resolve_model_path(args.model)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if args.one != "float":
        quantize_ptq_(model, resolve_quantizer({"scheme": args.one, "group_size": args.group_size}))
    own_weights(model)
    load_s = time.perf_counter() - start
    row = measure_model(
        model, tokenizer, prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, runs=args.runs, warmup=1
    )
    if device.type == "cpu":
        row["process_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"model": args.one, "dtype": str(dtype).removeprefix("torch."), "load_s": load_s, **row}


def run_child(scheme: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", scheme, "--model", args.model, "--device", args.device,
           "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
           "--runs", str(args.runs), "--group-size", str(args.group_size), "--threads", str(args.threads)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {scheme} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(MARKER))


def format_rows(rows: list[dict]) -> str:
    def mib(n: float | None) -> str:
        return "—" if n is None else f"{n / 2**20:.0f}"

    header = ["model", "dtype", "size MiB", "packed MiB", "bits/w packed", "bits/w stored", "baseline MiB",
              "peak gen MiB", "peak life MiB", "prefill tok/s", "decode tok/s", "threads"]  # fmt: skip
    table = [header]
    for r in rows:
        table.append([
            r["model"], r["dtype"], mib(r["size_bytes"]), mib(r["packed_size_bytes"]),
            f"{r['linear_bits_per_weight']:.2f}", f"{r['linear_storage_bits_per_weight']:.2f}",
            mib(r["memory_before_bytes"]), mib(r["peak_memory_bytes"]), mib(r.get("process_peak_bytes")),
            f"{r['prefill_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s']:.2f}", str(r["threads"]),
        ])  # fmt: skip
    return "\n".join(markdown_table(table[0], table[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="HF id or local HF dir")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {SCHEMES}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--one", choices=SCHEMES, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()

    if args.one:
        print(MARKER + json.dumps(measure_one(args)), flush=True)
        return
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}; choose from {SCHEMES}")
    rows = []
    for scheme in schemes:
        row = run_child(scheme, args)
        rows.append(row)
        print(f"measured {scheme}: {json.dumps(row)}", file=sys.stderr, flush=True)
    first = rows[0]
    print(f"{args.model}: batch 1, prefill {first['prompt_len']} tokens, {first['decode_tokens']} greedy decode "
          f"steps with KV cache, median of {first['runs']} runs after 1 warm-up; device {first['device']}")  # fmt: skip
    print(format_rows(rows))
    if args.json:
        from qatune.files import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
