"""vLLM serving the QAT int4 export vs its float twin, talked to as a client would (HTTP on 127.0.0.1 only).

    make vllm                                                                  # .venv-vllm (once)
    python benchmarks/vllm_serving.py --int4 out/smollm2_135m/int4 [--w4a8]    # prints one table

For each artifact it starts `vllm serve` (qatune.vllm_server: 127.0.0.1, stopped also on error) and measures: load time
(start to healthy), held-out perplexity from vLLM's own prompt logprobs vs eager PyTorch on the same windows (the
recipe's gptq windows over the Python-docs validation split), greedy-token agreement with eager over 16 tokens of
each prompt, batch-1 decode tokens/s, and output tokens/s with 8 concurrent requests.

Artifacts (written to --work-dir, reused when present):
  int4 w4a16  the vLLM export of --int4 (the int4 codes exactly, bf16 scales; bf16 activations)
  int4 w4a8   with --w4a8 (8da4w only): the same codes, int8 dynamic per-token activations
  float twin  the same weights dequantized by compressed-tensors, bf16: what vLLM would serve without int4
Eager reference: the float twin in transformers, bf16 (the same weights in the same dtype), and for the int4 rows also
eager torchao (the --int4 directory as the recipe measured it, fp32, int8 activations for 8da4w).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from qatune.data import python_docs
from qatune.evaluation import perplexity, text_windows
from qatune.export.vllm import dequantized_model, export_vllm
from qatune.models import load_model, load_tokenizer
from qatune.report import markdown_table
from qatune.runtimes import eager_greedy, greedy_agreement
from qatune.vllm_server import VllmServer, served_metrics


def concurrent_throughput(server: VllmServer, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens/s with len(prompts) requests in flight at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(lambda p: server.complete(p, max_tokens)[0], prompts))
    return sum(map(len, outputs)) / (time.perf_counter() - start)


def build(args, int4, tokenizer) -> tuple[dict[str, Path], Path]:
    work = Path(args.work_dir)
    paths = {"int4 w4a16": work / "w4a16"}
    if args.w4a8:
        paths["int4 w4a8"] = work / "w4a8"
    for kind, path in paths.items():
        if not (path / "config.json").is_file():
            export_vllm(int4, tokenizer, path, vllm_scheme=kind.split()[-1])
    twin = work / "float_twin"
    if not (twin / "config.json").is_file():
        model = dequantized_model(paths["int4 w4a16"], torch.bfloat16)
        model.save_pretrained(twin)
        tokenizer.save_pretrained(twin)
    return {**paths, "float twin": twin}, paths["int4 w4a16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", required=True, help="an int4 dir from qat_recipe (output_dir/int4)")
    parser.add_argument("--work-dir", default="out/vllm_serving", help="exports and the twin are written here")
    parser.add_argument("--w4a8", action="store_true", help="also the w4a8 export (8da4w: int8 activations)")
    parser.add_argument("--docs", type=int, default=8, help="held-out docs for perplexity (the recipe's 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="perplexity window (the recipe's eval.seq_len)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement and concurrency")
    args = parser.parse_args()
    torch.set_num_threads(2)

    int4 = load_model(args.int4, device="cpu")
    tokenizer = load_tokenizer(args.int4)
    paths, int4_dir = build(args, int4, tokenizer)
    texts = python_docs("validation")[: args.docs]
    windows = text_windows(tokenizer, texts, args.seq_len)
    later = python_docs("validation")[args.docs : args.docs + args.prompts]
    prompts = [tokenizer(t)["input_ids"][: args.prompt_len] for t in later]
    twin = dequantized_model(int4_dir, torch.bfloat16)
    eager_twin = perplexity(twin, tokenizer, texts, seq_len=args.seq_len, progress=False)["perplexity"]
    eager_torchao = perplexity(int4, tokenizer, texts, seq_len=args.seq_len, progress=False)["perplexity"]
    eager_tokens = {"twin": [eager_greedy(twin, p, 16) for p in prompts]}
    if args.w4a8:
        eager_tokens["torchao"] = [eager_greedy(int4, p, 16) for p in prompts]

    rows = []
    for kind, path in paths.items():
        # w4a8 quantizes activations to int8 as torchao's 8da4w does; the others run the twin's bf16 numerics.
        reference = "torchao" if kind.endswith("w4a8") else "twin"
        with VllmServer(path, max_model_len=1024, max_num_seqs=len(prompts)) as server:
            served = served_metrics(server, windows, prompts[0], decode_tokens=args.decode, runs=args.runs)
            same, gap = greedy_agreement(lambda p, n: server.complete(p, n)[0], prompts, eager_tokens[reference])
            batch8 = concurrent_throughput(server, prompts, args.decode)
        eager = eager_torchao if reference == "torchao" else eager_twin
        rows.append({
            "artifact": kind, "kernel": ", ".join(served["kernels"]) or "(bf16 GEMM)", "load_s": served["load_s"],
            "vllm_ppl": served["perplexity"], "eager_ppl": eager,
            "ppl_diff_%": 100 * (served["perplexity"] / eager - 1), "eager_torchao_ppl": eager_torchao,
            "agree": f"{same}/{len(prompts)}", "split_gap": gap, "decode_tok_s": served["decode_tokens_per_s"],
            "prefill_tok_s": served["prefill_tokens_per_s"], "batch8_tok_s": batch8,
            "MiB": sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20,
        })  # fmt: skip
        print(f"measured {kind}: {rows[-1]}", flush=True)

    headers = list(rows[0])
    cell = {float: lambda v: f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"}
    print("\n".join(markdown_table(headers, [[cell.get(type(r[h]), str)(r[h]) for h in headers] for r in rows])))
    int4, float_twin = rows[0], rows[-1]
    print(
        f"int4 vs float twin: decode {int4['decode_tok_s'] / float_twin['decode_tok_s']:.2f}x, 8 concurrent "
        f"{int4['batch8_tok_s'] / float_twin['batch8_tok_s']:.2f}x, file {int4['MiB'] / float_twin['MiB']:.3f}x"
    )
    tokens = sum(sum(t != -100 for t in targets) for _, targets in windows)
    print(f"ppl: {len(windows)} windows of {args.seq_len} tokens ({tokens} predicted) of {args.docs} held-out docs; "
          f"eager_ppl and agree (16 greedy tokens on {len(prompts)} prompts; split_gap: the largest gap in eager's "
          f"logprobs where they part) against the float twin in transformers, bf16, for w4a16 and the twin, against "
          f"eager torchao for w4a8; decode: batch "
          f"1, {args.prompt_len}-token prompt, {args.decode} tokens, median of {args.runs}; batch8: {len(prompts)} "
          f"requests at once, {args.decode} tokens each")  # fmt: skip
    if not math.isfinite(statistics.mean(r["vllm_ppl"] for r in rows)):
        raise SystemExit("a perplexity is not finite")


if __name__ == "__main__":
    main()
