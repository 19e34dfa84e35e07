"""The exported int4 files in their own runtimes, batch 1, in this process: llama.cpp over the GGUF
(llama-cpp-python, the `llama-cpp` extra) and ExecuTorch over the `.pte` (the `executorch` extra).

`qat_recipe` uses these for the report's int4 rows as served (eager torchao dequantizes every weight, so its speed says
nothing about a runtime's); `benchmarks/runtime_speed.py` for the runtime-vs-twin tables. A runner has
`prefill(ids) -> next token`, `step(token) -> next token` (its KV cache) and `window_logits(ids) -> [n, vocab]`.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np
import torch

RUNTIME_MODULES = {"gguf": "llama_cpp", "executorch": "executorch"}  # export format -> what must be importable
RUNTIME_NAMES = {"gguf": "llama.cpp", "executorch": "executorch"}


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama, llama_get_logits_ith

        self._open = lambda **kw: Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                                        n_threads_batch=threads, verbose=False, **kw)  # fmt: skip
        self.llm = self._open()
        self.scoring = None  # opened on first use by window_logits
        self._logits = llama_get_logits_ith

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()

    def _next(self) -> int:
        ptr = self._logits(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))))

    def window_logits(self, ids: list[int]) -> torch.Tensor:
        # a second context that keeps every position's logits (the timed one keeps only the last, as servers do)
        self.scoring = self.scoring or self._open(logits_all=True)
        self.scoring.reset()
        self.scoring.eval(ids)
        return torch.from_numpy(np.array(self.scoring.scores[: len(ids)]))


class ExecuTorchRunner:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        from qatune.export.executorch import load_pte

        _unsafe_reset_threadpool(threads)
        self.forward = load_pte(path)
        self.pos = 0

    def prefill(self, ids: list[int]) -> int:
        logits = self.forward.execute([torch.tensor([ids]), torch.arange(len(ids))])[0]
        self.pos = len(ids)
        return int(logits[0, -1].argmax())

    def step(self, token: int) -> int:
        logits = self.forward.execute([torch.tensor([[token]]), torch.tensor([self.pos])])[0]
        self.pos += 1
        return int(logits[0, -1].argmax())

    def window_logits(self, ids: list[int]) -> torch.Tensor:
        return self.forward.execute([torch.tensor([ids]), torch.arange(len(ids))])[0][0]


def time_runner(runner, prompt: list[int], decode: int, runs: int) -> dict:
    prefill_s, decode_s, tokens = [], [], []
    for _ in range(runs + 1):  # the first run warms up (page-in, thread pools) and is not counted
        start = time.perf_counter()
        token = runner.prefill(prompt)
        mid = time.perf_counter()
        tokens = [token]
        for _ in range(decode - 1):
            tokens.append(runner.step(tokens[-1]))
        end = time.perf_counter()
        prefill_s.append(mid - start)
        decode_s.append((end - mid) / max(decode - 1, 1))
    return {
        "prefill_tok_s": len(prompt) / statistics.median(prefill_s[1:]),
        "decode_tok_s": 1 / statistics.median(decode_s[1:]),
        "tokens": tokens,
    }


@torch.no_grad()
def eager_greedy(model, prompt: list[int], steps: int = 16) -> tuple[list[int], list[torch.Tensor]]:
    """An eager model's greedy tokens, each from a full forward pass (no KV cache), and the log-probabilities each
    came from: the reference a runtime's greedy tokens are compared with."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(steps):
        logprobs.append(torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1))
        tokens.append(int(logprobs[-1].argmax()))
        ids.append(tokens[-1])
    return tokens, logprobs


def greedy_agreement(generate, prompts: list[list[int]], eager: list) -> tuple[int, float]:
    """(on how many prompts `generate(prompt, n)`'s n greedy tokens all equal eager's, the largest gap in eager's
    logprobs between its token and the runtime's where they first part; 0 if they never do). A gap within the
    kernels' rounding noise is a near-tie flip, not a wrong weight."""
    same, gap = 0, 0.0
    for prompt, (want, logprobs) in zip(prompts, eager, strict=True):
        got = generate(prompt, len(want))
        split = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
        if split is None:
            same += 1
        else:
            gap = max(gap, float(logprobs[split][want[split]] - logprobs[split][got[split]]))
    return same, gap


def runtime_installed(fmt: str) -> bool:
    return fmt in RUNTIME_MODULES and importlib.util.find_spec(RUNTIME_MODULES[fmt]) is not None


def measure_runtime(
    fmt: str, path: Path, windows: list, prompt_ids: list[int], *, decode_tokens: int, runs: int, threads: int
) -> dict:
    """One report row: an exported file run by its runtime; perplexity from the runtime's own logits on the eval
    windows, and batch-1 prefill/decode speed."""
    from qatune.evaluation import runtime_perplexity

    n_ctx = max(max(len(w[0]) + 1 for w in windows), len(prompt_ids) + decode_tokens + 1)
    runner = {"gguf": LlamaCppRunner, "executorch": ExecuTorchRunner}[fmt](path, threads, n_ctx)

    def prompt_logprobs(ids: list[int]) -> list[float]:
        logprobs = torch.log_softmax(runner.window_logits(ids).float(), -1)
        return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()

    result = {"runtime": RUNTIME_NAMES[fmt], "file": Path(path).name, "threads": threads}
    result |= runtime_perplexity(windows, prompt_logprobs)
    speed = time_runner(runner, prompt_ids, decode_tokens, runs)
    return result | {
        "prefill_tokens_per_s": speed["prefill_tok_s"],
        "decode_tokens_per_s": speed["decode_tok_s"],
        "prompt_len": len(prompt_ids),
        "decode_tokens": decode_tokens,
        "runs": runs,
    }
