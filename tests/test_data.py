"""qatune.data: sources, exact packing, prompt masking of chat data, deterministic sharded batching and resume."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from qatune.data import (
    IGNORE_INDEX,
    DatasetConfig,
    PackedDataset,
    build_dataset,
    check_dataset_config,
    instruct_to_messages,
    load_conversations,
    load_texts,
    python_docs,
    tokenize_and_pack,
    tokenize_and_pack_conversations,
    tokenize_conversation,
)
from qatune.errors import ConfigError

# ---------------------------------------------------------------------------------------------------- sources


def test_python_docs_split_is_deterministic_disjoint_and_complete():
    from pydoc_data.topics import topics

    train, val = python_docs("train"), python_docs("validation")
    assert (len(train), len(val)) == (40, 39) and len(topics) == 79
    assert train == python_docs("train") and python_docs("test") == val
    ordered = [topics[k] for k in sorted(topics)]
    assert train[0] == ordered[0] and val[0] == ordered[1] and train[-1] == ordered[-1]
    assert sorted(train + val) == sorted(ordered)
    with pytest.raises(ValueError, match="'dev'"):
        python_docs("dev")


def test_load_texts_python_docs_default_and_max_documents():
    assert load_texts(DatasetConfig()) == python_docs("train")
    assert load_texts(DatasetConfig(split="validation", max_documents=3)) == python_docs("validation")[:3]


def test_config_is_an_omegaconf_schema():
    # Recipes merge YAML into DatasetConfig and pass the DictConfig itself on.
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"split": "test", "max_documents": 2})
    assert load_texts(cfg) == python_docs("validation")[:2]
    with pytest.raises(ValidationError, match="max_documents"):
        OmegaConf.merge(OmegaConf.structured(DatasetConfig), {"max_documents": "many"})


def test_txt_file_is_one_document(tmp_path):
    text = "= Title =\n\nFirst paragraph.\n\nSecond paragraph.\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    assert load_texts(DatasetConfig(path=str(path), split="validation")) == [text]


def test_jsonl_and_parquet_files(tmp_path):
    rows = [{"text": f"document number {i}", "id": i} for i in range(5)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "docs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    expected = [r["text"] for r in rows]
    for path in (jsonl, parquet):
        assert load_texts(DatasetConfig(path=str(path))) == expected
        assert load_texts(DatasetConfig(path=str(path), max_documents=2)) == expected[:2]
    renamed = tmp_path / "body.jsonl"
    renamed.write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in rows))
    assert load_texts(DatasetConfig(path=str(renamed), column="body")) == expected


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl"):
        load_texts(DatasetConfig(path=str(tmp_path / "nope.jsonl")))
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text("")
        with pytest.raises(ValueError, match=f"{name}' is empty"):
            load_texts(DatasetConfig(path=str(tmp_path / name)))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="no text"):
        load_texts(DatasetConfig(path=str(tmp_path / "blank.txt")))
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file type.*\.jsonl"):
        load_texts(DatasetConfig(path=str(tmp_path / "data.csv")))
    (tmp_path / "rows.jsonl").write_text('{"content": "a", "id": 1}\n')
    with pytest.raises(ValueError, match="no column 'text'; its columns are 'content', 'id'"):
        load_texts(DatasetConfig(path=str(tmp_path / "rows.jsonl")))


def test_config_errors():
    with pytest.raises(ValueError, match="'markdown' is not one of text, instruct, chat"):
        check_dataset_config(DatasetConfig(format="markdown"))
    with pytest.raises(ValueError, match="max_documents"):
        load_texts(DatasetConfig(max_documents=0))
    with pytest.raises(ValueError, match="set name"):
        load_texts(DatasetConfig(name=None))
    with pytest.raises(ValueError, match="format=instruct"):
        load_texts(DatasetConfig(format="instruct", path=None, name="yahma/alpaca-cleaned"))


def test_hub_dataset_offline_error_is_one_line(monkeypatch):
    # datasets' own offline switch: fails at once instead of retrying the unreachable Hub for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="wikitext") as err:
        load_texts(DatasetConfig(name="wikitext", config="wikitext-2-raw-v1", split="test"))
    message = str(err.value)
    assert "\n" not in message and "dataset.path=" in message and "python_docs" in message


# ---------------------------------------------------------------------------------------------------- packing


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pack_two_docs_exact_blocks(tiny_tokenizer):
    docs = ["def f(x):", "", "return x + 1"]  # the empty document is skipped (no double EOS)
    a, b = _ids(tiny_tokenizer, docs[0]), _ids(tiny_tokenizer, docs[2])
    eos = tiny_tokenizer.eos_token_id
    stream = a + [eos] + b
    assert len(stream) % 4 != 0  # so there is a tail to drop
    blocks = tokenize_and_pack(docs, tiny_tokenizer, seq_len=4)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 4, 4)
    assert blocks.flatten().tolist() == stream[: len(stream) // 4 * 4]
    assert blocks.flatten().tolist()[len(a)] == eos and blocks.flatten().tolist().count(eos) == 1
    # seq_len 1 keeps every token: the stream decodes to the docs joined by the EOS token
    whole = tokenize_and_pack(docs, tiny_tokenizer, seq_len=1).flatten().tolist()
    assert whole == stream and tiny_tokenizer.decode(whole) == "def f(x):<|im_end|>return x + 1"


def test_pack_drops_tail_and_rejects_tiny_corpus(tiny_tokenizer):
    texts = python_docs("validation")[:2]
    n_tokens = sum(len(_ids(tiny_tokenizer, t)) for t in texts) + 1
    blocks = tokenize_and_pack(texts, tiny_tokenizer, seq_len=100)
    assert blocks.shape == (n_tokens // 100, 100)
    assert n_tokens % 100 != 0 and blocks.numel() == n_tokens - n_tokens % 100
    with pytest.raises(ValueError, match=f"has {n_tokens} tokens: too few for one block of seq_len {n_tokens + 1}"):
        tokenize_and_pack(texts, tiny_tokenizer, seq_len=n_tokens + 1)
    with pytest.raises(ValueError, match="seq_len must be a positive"):
        tokenize_and_pack(texts, tiny_tokenizer, seq_len=0)


def test_build_dataset_text_labels_are_input_ids(tiny_tokenizer):
    ds = build_dataset(DatasetConfig(split="validation", max_documents=2), tiny_tokenizer, seq_len=64)
    expected = tokenize_and_pack(python_docs("validation")[:2], tiny_tokenizer, 64)
    assert isinstance(ds, PackedDataset) and len(ds) == expected.shape[0] and ds.seq_len == 64
    item = ds[3]
    assert item["input_ids"].tolist() == expected[3].tolist() and torch.equal(item["labels"], item["input_ids"])


# ---------------------------------------------------------------------------------------------------- chat masking


def test_instruct_masks_prompt_exactly(tiny_tokenizer):
    row = {"instruction": "Add one.", "input": "x = 41", "output": "x = 42"}
    messages = instruct_to_messages(row)
    assert messages == [
        {"role": "user", "content": "Add one.\n\nx = 41"},
        {"role": "assistant", "content": "x = 42"},
    ]
    ids, labels = tokenize_conversation(messages, tiny_tokenizer)
    prompt = _ids(tiny_tokenizer, "<|im_start|>user\nAdd one.\n\nx = 41<|im_end|>\n<|im_start|>assistant\n")
    answer = _ids(tiny_tokenizer, "x = 42<|im_end|>\n")
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    assert tiny_tokenizer.eos_token_id in labels  # the answer's end token is trained on
    # Tokenizing the prompt and the answer apart gives the same ids as the template's own tokenization here.
    assert ids == list(tiny_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert instruct_to_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0]["content"] == "Hi"


def test_multi_turn_chat_trains_only_on_assistant_turns(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, labels = tokenize_conversation(messages, tiny_tokenizer)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans.append(current)
    assert [tiny_tokenizer.decode(s) for s in spans] == ["4<|im_end|>\n", "6<|im_end|>\n"]
    masked = tiny_tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE_INDEX])
    assert masked == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_instruct_dataset_packs_ids_and_labels_together(tmp_path, tiny_tokenizer):
    rows = [
        {"instruction": f"Say the number {i} in words, please, at some length.", "input": "", "output": f"N{i}"}
        for i in range(12)
    ]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DatasetConfig(path=str(path), format="instruct")
    conversations = load_conversations(cfg)
    assert conversations[3] == instruct_to_messages(rows[3])
    streams = [tokenize_conversation(m, tiny_tokenizer) for m in conversations]
    ids = [t for s in streams for t in s[0]]
    labels = [t for s in streams for t in s[1]]
    seq_len = 16
    ds = build_dataset(cfg, tiny_tokenizer, seq_len)
    # Blocks made only of prompt tokens are dropped; the kept ones are exact slices of the two streams.
    blocks = [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    kept = [b for b in blocks if any(lab != IGNORE_INDEX for lab in b[1][1:])]
    assert 0 < len(kept) < len(blocks)
    assert ds.input_ids.tolist() == [b[0] for b in kept] and ds.labels.tolist() == [b[1] for b in kept]


def test_chat_format_errors(tmp_path, tiny_tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="role/content"):
        load_conversations(DatasetConfig(path=str(path), format="chat"))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no column 'instruction', 'output'; its columns are 'prompt', 'response'"):
        load_conversations(DatasetConfig(path=str(alpaca), format="instruct"))
    no_template = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no chat_template"):
        tokenize_conversation([{"role": "user", "content": "hi"}], no_template)
    only_user = [[{"role": "user", "content": "hello there, how are you"}]] * 4
    with pytest.raises(ValueError, match="no block holds an assistant answer"):
        tokenize_and_pack_conversations(only_user, tiny_tokenizer, seq_len=8)


def test_chat_column(tmp_path, tiny_tokenizer):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conv, "id": 0}) + "\n")
    assert load_conversations(DatasetConfig(path=str(path), format="chat")) == [conv]
