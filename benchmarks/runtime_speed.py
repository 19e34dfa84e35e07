"""File size and batch-1 speed of each exported int4 artifact against its float twin in the same runtime.

    python benchmarks/runtime_speed.py --int4 out/smollm2_135m/int4             # a qat_recipe output (QAT codes)
    python benchmarks/runtime_speed.py --runtimes gguf --threads 2               # no --int4: PTQ SmolLM2 on the fly

Runtimes: gguf = llama.cpp through llama-cpp-python (`pip install 'qatune[llama-cpp]'`, compiles llama.cpp: ~4 min on 2
cores); executorch = the ExecuTorch runtime over an XNNPACK `.pte` (`pip install 'qatune[executorch]'`); torch =
transformers + torchao eager over the --int4 directory itself, with a KV cache (no twin). Artifacts: int4
(qatune's export: the torchao int4 codes as Q4_0 / XNNPACK 8da4w) and float twins of --float, the checkpoint QAT started
from (GGUF f32 and f16, `.pte` fp32; speed and size do not depend on the trained values); and, for llama.cpp, two Q4_0
files made by llama.cpp's own quantizer (`llama_model_quantize`, linears Q4_0, embedding/output f16 as in ours):
`requant Q4_0` re-quantizes the int4 model's own (dequantized) weights, as converting a QAT checkpoint to a float GGUF
and running llama-quantize would, and `PTQ Q4_0` quantizes the float twin. Files are written once into
--work-dir and reused (lowering a `.pte` takes long). Speed: a prompt of --prompt-len tokens of held-out Python docs in
one call (prefill), then --decode greedy tokens one call each (decode), median of --runs. `linear MiB` is the bytes of
the decoder's linear weights (GGUF only: read from the file's tensor table). `agree`: over --agree-prompts prompts (the
first validation docs, --prompt-len tokens each), on how many all 16 greedy tokens equal the eager torchao model's
(no KV cache); `tie` is, where a runtime's token first differs, the largest gap between eager's logits for eager's
token and for the runtime's: a gap below the kernels' logit drift (~2%, a few tenths here) is a tie flip, not a bug.
`ppl`: token perplexity from the runtime's own logits on --ppl-docs held-out docs in windows of --ppl-seq-len
(qatune.evaluation's gptq protocol, the recipe's eval: the torch row reproduces report.json's QAT perplexity);
`top1_%`: at how many of those positions the runtime's top token is eager torchao's (teacher-forced, so one flip does
not carry over to the tokens after it, as it does in `agree`).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from qatune.report import markdown_table
from qatune.runtimes import ExecuTorchRunner, LlamaCppRunner, eager_greedy, greedy_agreement, time_runner

Q4_0 = gguf.GGMLQuantizationType.Q4_0
LINEAR_GGUF = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class TorchRunner:
    """transformers + torchao eager over the int4 directory (the `hf` format), with a KV cache: the reference the
    runtimes are compared with, and a measure of how far eager's own floating-point order moves greedy tokens."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        from qatune.models import load_model

        self.model = load_model(str(path), device="cpu")

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> int:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self._next(torch.tensor([ids]))

    @torch.no_grad()
    def step(self, token: int) -> int:
        return self._next(torch.tensor([[token]]))

    def _next(self, ids: torch.Tensor) -> int:
        return int(self.model(ids, cache=self.cache, use_cache=True).logits[0, -1].argmax())

    @torch.no_grad()
    def window_logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids]), use_cache=False).logits[0]


RUNNERS = {"gguf": LlamaCppRunner, "executorch": ExecuTorchRunner, "torch": TorchRunner}


def gguf_linear_bytes(path: Path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name.split(".")[-2] in LINEAR_GGUF)


def gguf_exact_weights(model, path: Path) -> tuple[int, int]:
    """How many quantized weights (linears, and the embedding where quantized) in the GGUF dequantize (gguf's own
    Q4_0 / Q8_0 reader) to exactly torchao's dequantized weight with its scales rounded to fp16 (llama.cpp's q/k row
    order); and how many quantized weights the model has."""
    from qatune.export import permute_for_llama_cpp

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    exact = total = 0
    for name, w in model.named_parameters():
        if not hasattr(w, "qdata"):
            continue
        total += 1
        group = w.block_size[1]
        scale16 = w.scale.to(torch.float16).float().repeat_interleave(group, dim=1)
        expected = w.qdata.float() * scale16
        if n_head := next((h for key, h in heads.items() if f".{key}." in name), None):
            expected = permute_for_llama_cpp(expected, n_head)
        key = names.get_name(name, try_suffixes=(".weight",))
        if key == "output.weight" and key not in tensors:  # llama.cpp's rule: no output.weight, multiply by token_embd
            key = "token_embd.weight"
        t = tensors[key]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape)
        exact += bool(np.array_equal(got, expected.numpy()))
    return exact, total


def build_artifacts(args, runtimes: list[str]) -> tuple:
    """Export what --work-dir lacks; returns {(runtime, kind): path}, the prompts, eager int4's greedy tokens and
    logits for each, the int4 model, the perplexity windows and eager's top token at each of their positions."""
    from qatune.data import python_docs
    from qatune.evaluation import gptq_windows
    from qatune.export import export_executorch, export_gguf
    from qatune.models import load_model, load_tokenizer
    from qatune.quantization import quantize_ptq_, resolve_quantizer

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.float)
    docs = python_docs("validation")
    prompts = [tokenizer(doc)["input_ids"][: args.prompt_len] for doc in docs[: args.agree_prompts]]
    held_out = "\n\n".join(docs[: args.ppl_docs])  # qatune.evaluation's gptq protocol
    windows = gptq_windows(tokenizer(held_out, verbose=False)["input_ids"], args.ppl_seq_len)
    if args.int4:
        int4 = load_model(args.int4, device="cpu")
    else:
        int4 = quantize_ptq_(load_model(args.float, device="cpu"), resolve_quantizer({"scheme": "8da4w"}))
    eager = [eager_greedy(int4, prompt) for prompt in prompts]
    with torch.no_grad():
        eager_top = [int4(torch.tensor([inputs])).logits[0].argmax(-1) for inputs, _ in windows]
    paths, float_model = {}, None
    f32 = work / "model-f32.gguf"
    plan = {  # (runtime, artifact): (file, the model it is made from, how)
        ("gguf", "int4 Q4_0"): (work / "model-q4_0.gguf", "int4", lambda m, p: export_gguf(m, tokenizer, p)),
        ("gguf", "f16 twin"): (
            work / "model-f16.gguf", "float", lambda m, p: export_gguf(m, tokenizer, p, allow_float=True)
        ),
        ("gguf", "f32 twin"): (
            f32, "float", lambda m, p: export_gguf(m, tokenizer, p, embeddings="f32", allow_float=True)
        ),
        ("gguf", "requant Q4_0"): (
            work / "model-requant-q4_0.gguf", "int4", lambda m, p: requantized_by_llama_cpp(m, tokenizer, p)
        ),
        ("gguf", "PTQ Q4_0"): (
            work / "model-ptq-q4_0.gguf", "float", lambda m, p: llama_cpp_q4_0(f32, p, lm_head_is_int4(int4))
        ),
        ("executorch", "int4 8da4w"): (
            work / "model-8da4w.pte", "int4", lambda m, p: export_executorch(m, p, max_seq_len=args.n_ctx)
        ),
        ("executorch", "fp32 twin"): (
            work / "model-fp32.pte", "float",
            lambda m, p: export_executorch(m, p, max_seq_len=args.n_ctx, allow_float=True),
        ),
    }  # fmt: skip
    for (runtime, kind), (path, source, export) in plan.items():
        if runtime not in runtimes:
            continue
        if not path.is_file():
            start = time.perf_counter()
            if source == "int4":
                export(int4, path)
            else:
                float_model = float_model or load_model(args.float, dtype="fp32", device="cpu")
                export(float_model, path)
            print(f"exported {path} in {time.perf_counter() - start:.0f} s", flush=True)
        paths[runtime, kind] = path
    if "torch" in runtimes and args.int4:
        paths["torch", "int4 8da4w"] = Path(args.int4)
    return paths, prompts, eager, int4, windows, eager_top


def llama_cpp_q4_0(source: Path, target: Path, output_q4_0: bool) -> Path:
    """llama.cpp's own Q4_0 quantization of a float GGUF (`llama-quantize --pure --token-embedding-type f16
    [--output-tensor-type f16] source target Q4_0`): every linear layer to Q4_0 with llama.cpp's rounding, the token
    embedding f16 and the output layer Q4_0 or f16 as in qatune's file, so the two differ only in how the codes were
    made."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.pure = True
    params.token_embedding_type = int(gguf.GGMLQuantizationType.F16)
    params.output_tensor_type = int(Q4_0 if output_q4_0 else gguf.GGMLQuantizationType.F16)
    partial = target.with_name(target.name + ".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to Q4_0")
    partial.replace(target)
    return target


def requantized_by_llama_cpp(int4: torch.nn.Module, tokenizer, target: Path) -> Path:
    """The int4 model's own weights (dequantized, exact in f32) re-quantized by llama.cpp's Q4_0 rule: what a user
    gets by converting the QAT checkpoint to a float GGUF and running llama-quantize on it (a quantized embedding is
    dequantized too and stored f16, llama-quantize's usual choice)."""
    import copy

    from qatune.export import export_gguf
    from qatune.quantization import quantized_embedding_names, quantized_linear_names

    model = copy.deepcopy(int4)
    for name in quantized_linear_names(model) + quantized_embedding_names(model):
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(module.weight.dequantize(), requires_grad=False)
    f32 = target.with_name(target.stem + "-f32.gguf")
    export_gguf(model, tokenizer, f32, embeddings="f32", allow_float=True)
    try:
        return llama_cpp_q4_0(f32, target, output_q4_0=lm_head_is_int4(int4))
    finally:
        f32.unlink()


def lm_head_is_int4(model: torch.nn.Module) -> bool:
    from qatune.quantization import quantized_linear_names

    return any(model.get_submodule(name) is model.get_output_embeddings() for name in quantized_linear_names(model))


def changed_codes(ours: Path, theirs: Path) -> float:
    """The fraction of Q4_0 codes (nibbles) that differ between two GGUF files of the same model, over the Q4_0
    tensors both hold (a shared Q4_0 `token_embd` in ours is `output.weight` plus an f16 `token_embd` in theirs)."""

    def q4_0(path: Path) -> dict[str, np.ndarray]:  # each block: fp16 scale, then 16 bytes of two codes each
        tensors = gguf.GGUFReader(path).tensors
        return {t.name: np.asarray(t.data).reshape(-1, 18)[:, 2:] for t in tensors if t.tensor_type == Q4_0}

    a, b = q4_0(ours), q4_0(theirs)
    a = {k: v for k, v in a.items() if k in b}
    if not a:
        raise ValueError(f"{ours} and {theirs} hold no Q4_0 tensor in common")
    diff = sum(int(((x ^ y) & 0x0F != 0).sum() + ((x ^ y) >> 4 != 0).sum()) for x, y in ((a[k], b[k]) for k in a))
    return diff / sum(2 * x.size for x in a.values())


def score_windows(runner, windows: list, eager_top: list[torch.Tensor]) -> tuple[float, float]:
    """Token perplexity from the runtime's own logits over qatune.evaluation's gptq windows (the recipe's protocol),
    and the fraction of those positions where the runtime's top token is eager torchao's."""
    from qatune.evaluation import IGNORE

    nll, count, same = 0.0, 0, 0
    for (inputs, targets), top in zip(windows, eager_top, strict=True):
        logits = runner.window_logits(inputs).float()
        nll += F.cross_entropy(logits, torch.tensor(targets), ignore_index=IGNORE, reduction="sum").item()
        count += sum(t != IGNORE for t in targets)
        same += int((logits.argmax(-1) == top).sum())
    return math.exp(nll / count), same / sum(len(inputs) for inputs, _ in windows)


def runner_greedy(runner):
    """generate(prompt, n) for greedy_agreement: the runner's prefill, then n - 1 steps of its KV cache."""

    def generate(prompt: list[int], n: int) -> list[int]:
        got = [runner.prefill(prompt)]
        for _ in range(n - 1):
            got.append(runner.step(got[-1]))
        return got

    return generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", help="an int4 dir from qat_recipe (default: PTQ of --float on the fly)")
    parser.add_argument("--float", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the float checkpoint (twins)")
    parser.add_argument("--runtimes", default="gguf,executorch,torch", help="comma-separated: gguf, executorch, torch")
    parser.add_argument("--work-dir", default="out/runtime_speed", help="artifacts are written (and reused) here")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=256, help="context / KV-cache length")
    parser.add_argument("--agree-prompts", type=int, default=8, help="prompts for the greedy-agreement check")
    parser.add_argument("--ppl-docs", type=int, default=8, help="held-out docs for perplexity (the recipe's 8)")
    parser.add_argument("--ppl-seq-len", type=int, default=128, help="perplexity window (the recipe's eval.seq_len)")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if bad := [r for r in runtimes if r not in RUNNERS]:
        parser.error(f"--runtimes {','.join(bad)}: choose from {', '.join(RUNNERS)}")
    if args.ppl_seq_len > args.n_ctx:
        parser.error(f"--ppl-seq-len {args.ppl_seq_len} is longer than --n-ctx {args.n_ctx}")
    torch.set_num_threads(args.threads)

    paths, prompts, eager, int4, windows, eager_top = build_artifacts(args, runtimes)
    prompt = prompts[0]
    if ("gguf", "int4 Q4_0") in paths:
        exact, total = gguf_exact_weights(int4, paths["gguf", "int4 Q4_0"])
        print(f"GGUF: {exact} of {total} quantized weights dequantize exactly to torchao's (fp16 scales)")
        changed = changed_codes(paths["gguf", "int4 Q4_0"], paths["gguf", "requant Q4_0"])
        print(f"llama.cpp's own Q4_0 rounding of the same weights changes {changed:.1%} of the int4 codes")
    rows, twins = [], {}
    for (runtime, kind), path in paths.items():
        runner = RUNNERS[runtime](path, args.threads, args.n_ctx)
        result = time_runner(runner, prompt, args.decode, args.runs)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
        row = {"runtime": runtime, "artifact": kind, "file": path.name, "file_MiB": size / 2**20}
        row["linear_MiB"] = gguf_linear_bytes(path) / 2**20 if runtime == "gguf" else None
        row |= {k: result[k] for k in ("prefill_tok_s", "decode_tok_s")}
        row["ppl"], top1 = score_windows(runner, windows, eager_top)
        row["top1_%"] = 100 * top1
        same, tie = greedy_agreement(runner_greedy(runner), prompts, eager)
        row["agree"], row["tie"] = f"{same}/{len(prompts)}", tie
        rows.append(row)
        print(f"measured {runtime} {kind}: {row}", flush=True)
    for row in rows:  # the int4 row against each float twin of the same runtime
        twins.setdefault(row["runtime"], []).append(row)
    lines = []
    for runtime, group in twins.items():
        int4 = next(r for r in group if r["artifact"].startswith("int4"))
        for twin in (r for r in group if r["artifact"].endswith("twin")):
            size = int4["file_MiB"] / twin["file_MiB"]  # the whole file: embedding and lm_head included
            speed = int4["decode_tok_s"] / twin["decode_tok_s"]
            line = f"{runtime}: int4 vs {twin['artifact']}: decode {speed:.2f}x faster, file {size:.3f}x"
            if int4["linear_MiB"]:
                line += f", linears {int4['linear_MiB'] / twin['linear_MiB']:.3f}x"
            lines.append(line)
    headers = ["runtime", "artifact", "file", "file_MiB", "linear_MiB", "prefill_tok_s", "decode_tok_s", "ppl"]
    headers += ["top1_%", "agree", "tie"]
    cell = {float: lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}", type(None): lambda v: "-"}
    column = {"ppl": lambda v: f"{v:.2f}"}  # perplexities differ in the second decimal
    table = [[column.get(h, cell.get(type(r[h]), str))(r[h]) for h in headers] for r in rows]
    print("\n".join(markdown_table(headers, table)))
    print(f"prompt {len(prompt)} tokens, decode {args.decode}, median of {args.runs} runs, {args.threads} threads;"
          f" ppl: {len(windows)} windows of {args.ppl_seq_len} held-out tokens; agree: 16 greedy tokens on"
          f" {len(prompts)} prompts")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
