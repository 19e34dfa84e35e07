"""Training and evaluation data: load texts or conversations, tokenize, pack into fixed-length blocks, batch.

Sources (`DatasetConfig`, the YAML `dataset:` / `eval_dataset:` sections):
  - `name: python_docs` (default): the stdlib's `pydoc_data.topics` (79 documents, in every CPython, offline).
  - a Hugging Face Hub dataset (`name`, `config`, `split`, `data_files`, `streaming`) through `datasets`.
  - `path:` a local file (wins over `name`): `.txt` (the whole file is ONE document, like a wikitext dump: no
    paragraph splitting, so no EOS is inserted mid-article), `.json`/`.jsonl`/`.parquet` (one document or example
    per row). A local file is its own split: `split` is ignored.

Formats: `text` (a text column), `instruct` (Alpaca columns instruction/input/output) and `chat` (a column of
role/content message lists). Instruct/chat examples are rendered with the tokenizer's chat template and trained on
the assistant answers only (labels -100 everywhere else).

Packing: documents are tokenized once, joined with EOS, concatenated and cut into non-overlapping `seq_len` blocks
(the tail is dropped). Attention is not masked at document boundaries (standard pretraining-style packing).

Batching and resume: `build_dataloader` shards by rank and reshuffles every epoch from `seed + epoch`; the trainer
iterates `epoch_batches(loader, epoch, skip_batches)`, which starts mid-epoch without loading the skipped blocks.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from qatune.errors import ConfigError

BUILTIN = ("python_docs",)
FORMATS = ("text", "instruct", "chat")
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
DEFAULT_COLUMN = {"text": "text", "chat": "messages"}  # instruct always reads instruction/input/output
INSTRUCT_COLUMNS = ("instruction", "output")  # required; "input" is optional
IGNORE_INDEX = -100  # the label HF causal LMs (and torch's cross_entropy) skip


@dataclass
class DatasetConfig:
    """Where the data comes from and how to read it (the YAML `dataset:` / `eval_dataset:` section)."""

    name: str | None = "python_docs"  # python_docs, or a hub dataset: wikitext, allenai/c4, yahma/alpaca-cleaned
    config: str | None = None  # hub config, e.g. wikitext-2-raw-v1
    split: str = "train"
    path: str | None = None  # local .txt / .json / .jsonl / .parquet; wins over `name`
    column: str | None = None  # None: "text" for format=text, "messages" for format=chat
    format: str = "text"  # text | instruct (alpaca instruction/input/output) | chat (role/content messages)
    streaming: bool = False  # hub only (c4): read rows lazily; use with max_documents
    max_documents: int | None = None  # keep only the first N rows
    data_files: str | None = None  # hub data_files, e.g. en/c4-train.00000-of-01024.json.gz for allenai/c4


def check_dataset_config(cfg: DatasetConfig, section: str = "dataset") -> None:
    """Validate a dataset section (named `section` in messages, e.g. eval_dataset) without loading anything
    (recipes call it before loading weights)."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"{section}.format {cfg.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ConfigError(f"{section}.max_documents must be a positive integer or null, got {cfg.max_documents}")
    if cfg.path is not None:
        path = Path(cfg.path)
        if path.suffix not in LOCAL_SUFFIXES:
            raise ConfigError(
                f"{section}.path {cfg.path!r}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}"
            )
        if not path.is_file():
            raise ConfigError(f"{section}.path {cfg.path!r} does not exist")
        if path.suffix == ".txt" and cfg.format != "text":
            raise ConfigError(
                f"{section}.path {cfg.path!r}: a .txt file holds plain text; format={cfg.format} needs rows"
            )
    elif not cfg.name:
        raise ConfigError(f"{section}: set name (python_docs or a hub dataset) or path (a local .txt/.jsonl/.parquet)")
    elif cfg.name in BUILTIN and cfg.format != "text":
        raise ConfigError(f"{section}.name {cfg.name!r} is plain text; it has no format={cfg.format} examples")


# ---------------------------------------------------------------------------------------------------- sources


def python_docs(split: str) -> list[str]:
    """The stdlib's Python documentation topics: even-indexed (sorted keys) = train, odd-indexed = validation/test."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    if split == "train":
        return docs[0::2]
    if split in ("validation", "test"):
        return docs[1::2]
    raise ConfigError(f"python_docs has splits train and validation (alias test), not {split!r}")


def load_rows(cfg: DatasetConfig) -> Iterable[dict[str, Any]]:
    """Rows of the configured split (a `datasets` Dataset, or an IterableDataset when streaming from the hub)."""
    import datasets

    check_dataset_config(cfg)
    if cfg.path is not None:
        path = Path(cfg.path)
        if path.stat().st_size == 0:
            raise ConfigError(f"dataset.path {cfg.path!r} is empty")
        if path.suffix == ".txt":
            try:
                return [{"text": path.read_text(encoding="utf-8")}]
            except UnicodeDecodeError:
                raise ConfigError(f"dataset.path {cfg.path!r}: {unreadable_line(path)}") from None
        builder = "parquet" if path.suffix == ".parquet" else "json"
        # One pass first: pyarrow takes bytes that are not UTF-8 and fails only when that row is read, and for a
        # bad JSON line datasets logs an error and says "An error occurred while generating the dataset", no line.
        if builder == "json" and (bad := unreadable_line(path)):
            raise ConfigError(f"dataset.path {cfg.path!r}: {bad}")
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # pyarrow/datasets parse errors are long and multi-line
            raise ConfigError(f"dataset.path {cfg.path!r}: cannot read it as {builder}: {_first_line(e)}") from e
    elif cfg.name == "python_docs":
        rows = [{"text": t} for t in python_docs(cfg.split)]
    else:
        try:
            rows = datasets.load_dataset(
                cfg.name, cfg.config, split=cfg.split, data_files=cfg.data_files, streaming=cfg.streaming
            )
        except Exception as e:  # offline: ConnectionError; a typo: DatasetNotFoundError; a bad split: ValueError
            where = f"{cfg.name!r}" + (f" (config {cfg.config!r}, split {cfg.split!r})" if cfg.config else "")
            raise ConfigError(
                f"cannot load dataset {where}: {_first_line(e)}; offline, point dataset.path= at a local "
                ".txt/.jsonl/.parquet file or use dataset.name=python_docs"
            ) from e
    if cfg.max_documents is not None:
        if isinstance(rows, list):
            rows = rows[: cfg.max_documents]
        elif isinstance(rows, datasets.IterableDataset):
            rows = rows.take(cfg.max_documents)
        else:
            rows = rows.select(range(min(cfg.max_documents, len(rows))))
    return rows


def load_texts(cfg: DatasetConfig) -> list[str]:
    """The documents of a format=text dataset, in order (empty rows kept: wikitext's protocol joins them)."""
    if cfg.format != "text":
        raise ValueError(f"load_texts reads format=text datasets; this one is format={cfg.format}")
    column = cfg.column or DEFAULT_COLUMN["text"]
    texts = [row[column] for row in _checked_rows(cfg, [column])]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(
            f"dataset {_describe(cfg)} row {bad}: column {column!r} holds {type(texts[bad]).__name__}, not text"
        )
    if not any(t.strip() for t in texts):
        raise ConfigError(f"dataset {_describe(cfg)} has no text in column {column!r}")
    return texts


def load_conversations(cfg: DatasetConfig) -> list[list[dict[str, str]]]:
    """Examples of a format=instruct or format=chat dataset as lists of {"role", "content"} messages."""
    if cfg.format == "instruct":
        return [instruct_to_messages(row) for row in _checked_rows(cfg, list(INSTRUCT_COLUMNS))]
    if cfg.format == "chat":
        column = cfg.column or DEFAULT_COLUMN["chat"]
        conversations = []
        for i, row in enumerate(_checked_rows(cfg, [column])):
            messages = row[column]
            if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ConfigError(f"dataset {_describe(cfg)} row {i}: {column!r} must be a list of role/content dicts")
            conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
        return conversations
    raise ValueError(f"load_conversations reads format=instruct or chat datasets; this one is format={cfg.format}")


def instruct_to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca row -> [user, assistant]: user = instruction (+ blank line + input when there is one)."""
    prompt = row["instruction"]
    if row.get("input"):
        prompt = f"{prompt}\n\n{row['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _checked_rows(cfg: DatasetConfig, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Yield rows, first checking that `columns` exist (named in the error with the columns that do)."""
    rows = iter(load_rows(cfg))
    first = next(rows, None)
    if first is None:
        raise ConfigError(f"dataset {_describe(cfg)} has no rows")
    missing = [c for c in columns if c not in first]
    if missing:
        hint = " (set dataset.column=...)" if cfg.format != "instruct" else " (format=instruct needs Alpaca columns)"
        raise ConfigError(
            f"dataset {_describe(cfg)} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(repr, first))}{hint}"
        )
    yield first
    yield from rows


def unreadable_line(path: Path) -> str | None:
    """Which line of a text / JSON Lines file is not UTF-8 (or, in a .jsonl, not one JSON value): the message
    the parsers do not give. None when every line reads."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if path.suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    return f"line {n} is not valid JSON ({e.msg} at column {e.colno}); each line holds one JSON object"
    return None


def _describe(cfg: DatasetConfig) -> str:
    return repr(cfg.path) if cfg.path is not None else repr(cfg.name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- tokenize + pack


def tokenize_and_pack(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> torch.Tensor:
    """Tokenize each document once, join them with EOS, cut into [n_blocks, seq_len] (the tail is dropped).

    No BOS is added: `add_special_tokens=False`, EOS alone marks where one document ends and the next begins.
    Empty documents are skipped (no EOS pairs).
    """
    eos = _eos_id(tokenizer)
    docs = [t for t in texts if t]
    stream: list[int] = []
    for start in range(0, len(docs), 1000):  # batches bound the peak memory of the tokenizer's output
        batch = tokenizer(docs[start : start + 1000], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in batch:
            if stream:
                stream.append(eos)
            stream.extend(ids)
    return _cut(torch.tensor(stream, dtype=torch.long), seq_len)


def tokenize_conversation(
    messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation rendered with the tokenizer's chat template.

    Labels are -100 on everything but the assistant turns: a turn's label span starts right after its assistant
    header (the text `add_generation_prompt=True` appends) and runs to the end of its rendering (its end token
    included, and whatever the template puts after it, e.g. ChatML's newline). Each span is tokenized on its own,
    as at inference, where the answer is generated after the separately tokenized prompt.
    """
    if tokenizer.chat_template is None:
        raise ConfigError(
            "the tokenizer has no chat_template; format=instruct/chat needs an instruct model's tokenizer"
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # Cut points: [masked, answer, masked, answer, ..., masked]; every prefix rendering must be a prefix of `full`.
    cuts = [0]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        for prefix in (
            tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True),
            tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False),
        ):
            if not full.startswith(prefix) or len(prefix) < cuts[-1]:
                raise ConfigError(
                    "the chat template does not render a conversation's first turns as a prefix of the whole "
                    "(it rewrites earlier turns); cannot mask the prompt tokens"
                )
            cuts.append(len(prefix))
    cuts.append(len(full))
    segments = [full[a:b] for a, b in itertools.pairwise(cuts)]
    ids: list[int] = []
    labels: list[int] = []
    for k, seg_ids in enumerate(tokenizer(segments, add_special_tokens=False)["input_ids"]):
        ids += seg_ids
        labels += seg_ids if k % 2 == 1 else [IGNORE_INDEX] * len(seg_ids)
    return ids, labels


def tokenize_and_pack_conversations(
    conversations: Iterable[Sequence[dict[str, str]]], tokenizer: PreTrainedTokenizerBase, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate rendered conversations (the template delimits them) and cut ids and labels together.

    Returns (input_ids, labels), both [n_blocks, seq_len]. Blocks with no answer token to predict are dropped:
    they carry no loss, and a batch of only such blocks would give a NaN mean loss.
    """
    ids_stream: list[int] = []
    labels_stream: list[int] = []
    for messages in conversations:
        ids, labels = tokenize_conversation(messages, tokenizer)
        ids_stream += ids
        labels_stream += labels
    input_ids = _cut(torch.tensor(ids_stream, dtype=torch.long), seq_len)
    labels = _cut(torch.tensor(labels_stream, dtype=torch.long), seq_len)
    keep = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)  # the model shifts: position 0 is never a target
    if not keep.any():
        raise ConfigError("no block holds an assistant answer token to train on (are there assistant turns?)")
    return input_ids[keep], labels[keep]


def _cut(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    if seq_len < 1:
        raise ConfigError(f"seq_len must be a positive integer, got {seq_len}")
    n_blocks = stream.numel() // seq_len
    if n_blocks == 0:
        raise ConfigError(f"the corpus has {stream.numel()} tokens: too few for one block of seq_len {seq_len}")
    return stream[: n_blocks * seq_len].view(n_blocks, seq_len)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token; packing needs one to separate documents")
    return tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------------- dataset


class PackedDataset(Dataset):
    """Fixed-length blocks: item i = {"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}.

    For text, labels are input_ids (HF causal LMs shift them internally); for instruct/chat, -100 off the answers.
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [n_blocks, seq_len], got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
        self.input_ids = input_ids
        self.labels = input_ids if labels is None else labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def build_dataset(cfg: DatasetConfig, tokenizer: PreTrainedTokenizerBase, seq_len: int) -> PackedDataset:
    """Load, tokenize and pack the configured dataset (dispatch on `cfg.format`)."""
    check_dataset_config(cfg)
    if cfg.format == "text":
        return PackedDataset(tokenize_and_pack(load_texts(cfg), tokenizer, seq_len))
    input_ids, labels = tokenize_and_pack_conversations(load_conversations(cfg), tokenizer, seq_len)
    return PackedDataset(input_ids, labels)
