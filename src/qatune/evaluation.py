"""Perplexity of a causal LM on local text, under three named protocols that papers and tools report.

- `gptq` (default; the GPTQ and AWQ papers' evaluation): join the documents with "\\n\\n", tokenize once with the
  tokenizer's default special tokens (what their code does: `tokenizer(text)`, so a Llama tokenizer prepends one BOS
  to the whole stream and a GPT-2-style one adds nothing), cut non-overlapping windows of `seq_len` tokens, drop the
  tail, and score every next-token prediction inside each window: `seq_len - 1` per window (the first token of a
  window has no context and is not predicted). The papers average each window's mean loss over windows; with equal
  windows that is the same number as our mean over all predicted tokens.
- `lm_eval` (lm-evaluation-harness's `wikitext` task, `loglikelihood_rolling`): each document on its own, tokenized
  with the tokenizer's defaults, split into rolling windows of `seq_len` exactly as lm-eval's
  `get_rolling_token_windows(..., context_len=1)` + `make_disjoint_window` do: the first window is prefixed with the
  BOS token (EOS when there is none) so every token of the document is predicted; later windows predict the next
  `seq_len` tokens each, the last one with a full window of context. Reports lm-eval's `word_perplexity`,
  `byte_perplexity` and `bits_per_byte` (words counted as its wikitext task does: `len(re.split(r"\\s+", doc))`).
- `sliding` (Hugging Face's perplexity guide): windows of `seq_len` tokens starting every `stride` tokens over the
  joined text; each window scores only its last `trg_len` tokens (those not scored by the previous window), so every
  token but the first is predicted once, with up to `seq_len - stride` tokens of extra context. The tail is kept.
  With `stride == seq_len` the windows are gptq's (plus the tail window, if any).

`perplexity` is the token perplexity exp(mean NLL over predicted tokens) in every protocol.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from qatune.errors import ConfigError, check_at_least

PROTOCOLS = ("gptq", "lm_eval", "sliding")
IGNORE = -100  # target id of positions that are fed to the model but not scored

# A window is (input ids, target ids): targets[i] is the token predicted after inputs[:i+1], or IGNORE.
Window = tuple[list[int], list[int]]


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    *,
    seq_len: int = 2048,
    protocol: str = "gptq",
    stride: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Token perplexity of `model` on `texts` under `protocol` (see the module docstring), on the model's device.

    Returns {protocol, perplexity, nll (mean per predicted token), tokens (predicted tokens), windows, wall_s,
    tokens_per_s, seq_len} plus `stride` for sliding and `word_perplexity`, `byte_perplexity`, `bits_per_byte`,
    `words`, `bytes`, `documents` for lm_eval.
    """
    docs = [texts] if isinstance(texts, str) else list(texts)
    _check_args(model, docs, seq_len, protocol, stride, batch_size)

    start = time.perf_counter()
    if protocol == "lm_eval":
        docs = [d for d in docs if d]  # an empty document has no token to predict
    windows = text_windows(tokenizer, docs, seq_len, protocol, stride)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = _score(model, windows, batch_size, pad_id, progress, desc=f"perplexity ({protocol})")
    wall_s = time.perf_counter() - start

    mean_nll = total_nll / total_tokens
    result = {
        "protocol": protocol,
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": total_tokens,
        "windows": len(windows),
        "wall_s": wall_s,
        "tokens_per_s": total_tokens / wall_s if wall_s > 0 else float("inf"),
        "seq_len": seq_len,
    }
    if protocol == "sliding":
        result["stride"] = stride or seq_len
    if protocol == "lm_eval":
        words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval's wikitext `process_results`
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        result |= {
            "word_perplexity": math.exp(total_nll / words),
            "byte_perplexity": math.exp(total_nll / n_bytes),
            "bits_per_byte": total_nll / n_bytes / math.log(2),
            "words": words,
            "bytes": n_bytes,
            "documents": len(docs),
        }
    return result


def text_windows(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    seq_len: int,
    protocol: str = "gptq",
    stride: int | None = None,
) -> list[Window]:
    """The (inputs, targets) windows `protocol` scores on `docs` (see the module docstring)."""
    if protocol == "lm_eval":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ConfigError("protocol lm_eval needs a tokenizer with a BOS or EOS token to prefix each document")
        return [w for d in docs if d for w in lm_eval_windows(_encode(tokenizer, d), seq_len, prefix)]
    ids = _encode(tokenizer, "\n\n".join(docs))
    if protocol == "gptq":
        if len(ids) < seq_len:
            raise ConfigError(
                f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                "give more text or a smaller seq_len"
            )
        return gptq_windows(ids, seq_len)
    if len(ids) < 2:
        raise ConfigError(f"text has {len(ids)} token(s); the sliding protocol needs at least 2")
    return sliding_windows(ids, seq_len, stride or seq_len)


def runtime_perplexity(windows: list[Window], prompt_logprobs: Callable[[list[int]], list[float]]) -> dict:
    """Token perplexity from a runtime that scores a prompt: `prompt_logprobs(ids)[t - 1]` = log p(ids[t] | ids[:t]).

    The same windows and predictions as `perplexity`: a window's targets are its next inputs (and for lm_eval one
    token past them), so scoring inputs + that last target gives every prediction the window makes.
    """
    nll, count = 0.0, 0
    for inputs, targets in windows:
        if any(t != IGNORE and t != nxt for t, nxt in zip(targets, inputs[1:], strict=False)):
            raise ValueError("runtime_perplexity takes windows whose targets are their next inputs")
        ids = inputs + ([targets[-1]] if targets[-1] != IGNORE else [])
        logprobs = prompt_logprobs(ids)
        scored = [lp for lp, t in zip(logprobs, targets, strict=False) if t != IGNORE]
        nll, count = nll - sum(scored), count + len(scored)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows)}


def gptq_windows(ids: Sequence[int], seq_len: int) -> list[Window]:
    """Non-overlapping windows of seq_len tokens, tail dropped; seq_len - 1 predictions each."""
    windows = []
    for begin in range(0, len(ids) - seq_len + 1, seq_len):
        chunk = list(ids[begin : begin + seq_len])
        windows.append((chunk, chunk[1:] + [IGNORE]))
    return windows


def sliding_windows(ids: Sequence[int], seq_len: int, stride: int) -> list[Window]:
    """Hugging Face's strided perplexity: each window scores only the tokens the previous one did not."""
    windows = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        trg_len = end - prev_end  # may be shorter than stride on the last window
        chunk = list(ids[begin:end])
        targets = chunk[1:] + [IGNORE]
        # Position i predicts chunk[i+1]; score only predictions of the last trg_len tokens of the window.
        first_scored = max(len(chunk) - trg_len - 1, 0)
        targets = [IGNORE] * first_scored + targets[first_scored:]
        windows.append((chunk, targets))
        prev_end = end
        if end == len(ids):
            break
    return windows


def lm_eval_windows(ids: Sequence[int], seq_len: int, prefix_token: int) -> list[Window]:
    """lm-eval's `get_rolling_token_windows(ids, prefix_token, seq_len, context_len=1)` + `make_disjoint_window`,
    as (input, target) pairs: every token of `ids` is predicted exactly once."""
    ids = list(ids)
    if not ids:
        return []
    first = min(seq_len, len(ids))
    windows = [([prefix_token] + ids[: first - 1], ids[:first])]
    predicted = first
    while predicted < len(ids):
        n_pred = min(len(ids) - predicted, seq_len)
        end = predicted + n_pred
        inputs = ids[end - seq_len - 1 : end - 1]  # a full window of context; end > seq_len here
        windows.append((inputs, [IGNORE] * (seq_len - n_pred) + ids[end - n_pred : end]))
        predicted = end
    return windows


def _score(
    model: PreTrainedModel, windows: list[Window], batch_size: int, pad_id: int, progress: bool, desc: str
) -> tuple[float, int]:
    """Sum of next-token NLL (nats) and number of scored targets over all windows, batch by batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        with torch.inference_mode(), tqdm(total=len(windows), desc=desc, disable=not progress) as bar:
            for batch in _batches(windows, batch_size):
                width = max(len(inputs) for inputs, _ in batch)
                # Right padding: under causal attention it never changes the scores of real positions.
                inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
                targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, (inp, tgt) in enumerate(batch):
                    inputs[row, : len(inp)] = torch.tensor(inp)
                    targets[row, : len(tgt)] = torch.tensor(tgt)
                    mask[row, : len(inp)] = 1
                inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
                logits = model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
                nll = F.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                total_nll += nll.item()
                total_tokens += int((targets != IGNORE).sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    for i in range(0, len(windows), batch_size):
        yield windows[i : i + batch_size]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Tokenizer defaults for special tokens (see the module docstring); verbose=False silences the
    # "longer than model_max_length" warning: we cut windows ourselves.
    return tokenizer(text, verbose=False)["input_ids"]


def check_eval_args(seq_len: int, protocol: str, batch_size: int, stride: int | None = None, prefix: str = "") -> None:
    """The evaluation's rules that need no model (`tune validate` and `perplexity` alike); `prefix` is the keys'
    section, e.g. "eval." in qat_recipe."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{prefix}protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    check_at_least(f"{prefix}seq_len", seq_len, 2)
    check_at_least(f"{prefix}batch_size", batch_size, 1)
    if stride is not None and protocol != "sliding":
        raise ConfigError(f"{prefix}stride={stride} is only used by protocol sliding, not {protocol!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seq_len):
        raise ConfigError(f"{prefix}stride={stride!r}: give an integer between 1 and seq_len={seq_len}, or null")


def _check_args(
    model: PreTrainedModel, docs: list[str], seq_len: int, protocol: str, stride: int | None, batch_size: int
) -> None:
    check_eval_args(seq_len, protocol, batch_size, stride)
    if not docs or not any(docs):
        raise ConfigError("no text to evaluate: texts is empty (give a string or a non-empty list of documents)")
    if not all(isinstance(d, str) for d in docs):
        bad = next(type(d).__name__ for d in docs if not isinstance(d, str))
        raise ConfigError(f"texts must be a string or a sequence of strings, got an element of type {bad}")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ConfigError(f"seq_len={seq_len} must be between 2 and the model's context ({max_positions} positions)")
