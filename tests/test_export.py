"""GGUF and ExecuTorch export carry the int4 codes torchao trained, byte for byte, and runtimes read them back."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationIntxWeightConfig,
    IntxUnpackedToInt8Tensor,
    MappingType,
    PerGroup,
    quantize_,
)

from qatune.export import export_executorch, export_gguf, generate_pte, permute_for_llama_cpp

Q4_0 = gguf.GGMLQuantizationType.Q4_0
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def int4_model(group_size: int = 32, tied: bool = False, lm_head: bool = True, layers: int = 2, **config) -> nn.Module:
    model = make_tiny_llama(tie_word_embeddings=tied, layers=layers)
    scheme = Int8DynamicActivationIntxWeightConfig(
        weight_dtype=config.pop("weight_dtype", torch.int4), weight_granularity=PerGroup(group_size), **config
    )
    quantize_(model, scheme, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (lm_head or fqn != "lm_head"))
    return model


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_for_llama_cpp, written from llama.cpp's layout (interleaved rotary pairs)."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def q4_0_codes_and_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode Q4_0 bytes per ggml's block_q4_0: fp16 d, then 16 bytes of (element j | element j + 16 << 4), q + 8."""
    rows = blocks.shape[0]
    blocks = blocks.reshape(rows, -1, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0]
    qs = blocks[..., 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8
    return codes.reshape(rows, -1), d


def q8_0_codes_and_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode Q8_0 bytes per ggml's block_q8_0: fp16 d, then 32 int8 codes."""
    rows = blocks.shape[0]
    blocks = blocks.reshape(rows, -1, 34)
    return blocks[..., 2:].copy().view(np.int8).reshape(rows, -1), blocks[..., :2].copy().view(np.float16)[..., 0]


def gguf_tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def linear_weights(model: nn.Module) -> dict[str, IntxUnpackedToInt8Tensor]:
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and isinstance(m.weight, IntxUnpackedToInt8Tensor)
    }


def fp16_scale_twin(model: nn.Module, tied: bool = False) -> nn.Module:
    """A float tiny Llama holding the int4 model's values with fp16 scales: what llama.cpp multiplies by."""
    twin = make_tiny_llama(tie_word_embeddings=tied)
    quantized = {n: w for n, w in model.named_parameters() if isinstance(w, IntxUnpackedToInt8Tensor)}
    with torch.no_grad():
        for name, w in quantized.items():  # the linears, and a quantized embedding
            scale16 = w.scale.half().float().repeat_interleave(w.block_size[1], dim=1)
            twin.get_parameter(name).copy_(w.qdata.float() * scale16)
    return twin


@pytest.mark.parametrize("group_size", [32, 128])
def test_q4_0_blocks_hold_torchao_codes_and_scales_exactly(tmp_path, tiny_tokenizer, group_size):
    model = int4_model(group_size)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", embeddings="f32")
    tensors = gguf_tensors(path)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    weights = linear_weights(model)
    assert len(weights) == 2 * 7 + 1  # every projection of both layers, and lm_head
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for hf_name, w in weights.items():
        t = tensors[name_map.get_name(hf_name, try_suffixes=(".weight",))]
        assert t.tensor_type == Q4_0 and tuple(t.shape[::-1]) == tuple(w.shape)
        blocks = np.asarray(t.data)
        dequant = gguf.quants.dequantize(blocks, Q4_0).reshape(w.shape)
        codes, d = q4_0_codes_and_scales(blocks)
        n_head = next((h for key, h in heads.items() if key in hf_name), None)
        if n_head:
            dequant, codes, d = unpermute(dequant, n_head), unpermute(codes, n_head), unpermute(d, n_head)
        # int4 codes: byte-exact; one fp16 scale per torchao group, repeated over its blocks of 32
        np.testing.assert_array_equal(codes, w.qdata.numpy())
        scale16 = w.scale.float().numpy().astype(np.float16)
        np.testing.assert_array_equal(d, np.repeat(scale16, group_size // 32, axis=1))
        # the values llama.cpp computes are torchao's, up to the fp16 rounding of the scale
        torchao_fp16 = (w.qdata.float() * torch.from_numpy(scale16).float().repeat_interleave(group_size, 1)).numpy()
        np.testing.assert_array_equal(dequant, torchao_fp16)
        np.testing.assert_allclose(dequant, w.dequantize().numpy(), rtol=1e-3, atol=1e-7)


def test_gguf_metadata_and_tokenizer(tmp_path, tiny_tokenizer):
    model = int4_model()
    reader = gguf.GGUFReader(export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    c = model.config
    expected = {
        "general.architecture": "llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_0),
        "llama.block_count": c.num_hidden_layers,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads,
        "llama.vocab_size": c.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tiny_tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tiny_tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": tiny_tokenizer.pad_token_id,
        "tokenizer.chat_template": tiny_tokenizer.chat_template,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    vocab = tiny_tokenizer.get_vocab()
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    types = fields["tokenizer.ggml.token_type"]
    assert [types[vocab[t]] for t in ("<|im_start|>", "<|im_end|>")] == [gguf.TokenType.CONTROL] * 2
    assert types[vocab["the"]] == gguf.TokenType.NORMAL
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(pair) for pair in merges]
    norms = gguf_tensors(reader.data.filename)
    assert norms["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_transformers_reads_the_gguf_as_the_int4_model(tmp_path, tiny_tokenizer):
    """An independent GGUF reader (transformers: its own un-permute and gguf dequantize) rebuilds torchao's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = int4_model(64)
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", embeddings="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    reference = fp16_scale_twin(model)
    ids = torch.tensor([tiny_tokenizer("def f(x):\n    return x * 2")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "Built-in functions: print(len('abc'))"
    assert tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0,
        rope_scaling={**rope, "original_max_position_embeddings": 512},
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    freqs = np.asarray(gguf_tensors(export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf"))["rope_freqs.weight"].data)
    # llama.cpp divides each rotary frequency by these factors (convert_hf_to_gguf.py, LlamaModel)
    base = 500000.0 ** (np.arange(0, 128, 2, dtype=np.float32) / 128)
    wavelen = 2 * np.pi * base
    smooth = (512 / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < 512 / 4.0, 1.0, np.where(wavelen > 512 / 1.0, 32.0, 1 / ((1 - smooth) / 32 + smooth)))
    np.testing.assert_allclose(freqs, expected, rtol=1e-5)


def test_tied_embeddings(tmp_path, tiny_tokenizer):
    # lm_head left in float and tied: llama.cpp reuses token_embd, so no output.weight
    float_head = int4_model(tied=True, lm_head=False)
    assert "output.weight" not in gguf_tensors(export_gguf(float_head, tiny_tokenizer, tmp_path / "a.gguf"))
    # lm_head int4 while the embedding stays float: the int4 head must be written
    int4_head = int4_model(tied=True, lm_head=True)
    tensors = gguf_tensors(export_gguf(int4_head, tiny_tokenizer, tmp_path / "b.gguf", embeddings="q8_0"))
    assert tensors["output.weight"].tensor_type == Q4_0
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == gguf.GGMLQuantizationType.Q8_0
    dequant = gguf.quants.dequantize(np.asarray(embd.data), embd.tensor_type)
    embedding = int4_head.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(dequant, embedding, atol=np.abs(embedding).max() / 127 / 2 + 1e-6)  # half a Q8_0 step


def test_permutation_moves_whole_rows():
    rows = torch.arange(16 * 3).reshape(16, 3)
    permuted = permute_for_llama_cpp(rows, n_head=2)
    assert sorted(permuted[:, 0].tolist()) == rows[:, 0].tolist()
    np.testing.assert_array_equal(unpermute(permuted.numpy(), 2), rows.numpy())
    # head 0 of size 8: HF rows (0..3 | 4..7) rotate as pairs (i, i + 4); llama.cpp wants them adjacent
    assert permuted[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(weight_dtype=torch.int8), "torch.int8 weights"),
        (dict(weight_mapping_type=MappingType.ASYMMETRIC), "asymmetric"),
        (dict(group_size=16), "block size (1, 16)"),
    ],
)
def test_unmappable_schemes_are_refused(tmp_path, tiny_tokenizer, config, message):
    model = int4_model(**config)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_float_twin_reads_back_as_the_float_model(tmp_path, tiny_tokenizer):
    """allow_float=True writes the float twin benchmarks compare with: transformers reads it back to the same logits."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama()
    export_gguf(model, tiny_tokenizer, tmp_path / "f32.gguf", embeddings="f32", allow_float=True)
    tensors = gguf_tensors(tmp_path / "f32.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f32.gguf").eval()
    ids = torch.tensor([tiny_tokenizer("def f(x):\n    return x * 2")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_cpp_runs_the_gguf_as_the_int4_model(tmp_path, tiny_tokenizer):
    """llama.cpp itself loads the file, tokenizes like the Hugging Face tokenizer, and computes the int4 model's
    logits; the float twin gives the float model's."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs the llama-cpp extra")

    def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the file's own tokenizer
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)]))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    text = "def f(x):\n    return x * 2  # <|im_end|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    model = int4_model()
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", embeddings="f32")
    reference = fp16_scale_twin(model)
    with torch.no_grad():
        eager, exact = model(torch.tensor([ids])).logits[0], reference(torch.tensor([ids])).logits[0]
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    # llama.cpp rounds activations to Q8_0 blocks, torchao to per-token int8: each is within ~1% of the exact product
    assert rel(got, exact) < 0.02 and rel(eager, exact) < 0.02

    float_model = make_tiny_llama()
    export_gguf(float_model, tiny_tokenizer, tmp_path / "f32.gguf", embeddings="f32", allow_float=True)
    with torch.no_grad():
        float_logits = float_model(torch.tensor([ids])).logits[0]
    assert rel(llama_cpp_logits(tmp_path / "f32.gguf", ids), float_logits) < 1e-3  # llama.cpp's KV cache is f16
    assert rel(float_logits, exact) > 5 * rel(got, exact)  # what the int4 file runs is the int4 model, not the float


def test_float_model_and_bad_options_are_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="no int4 weights"):
        export_gguf(make_tiny_llama(), tiny_tokenizer, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="embeddings='bf16'"):
        export_gguf(int4_model(), tiny_tokenizer, tmp_path / "m.gguf", embeddings="bf16")
    assert not list(tmp_path.iterdir())


def test_sentencepiece_style_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    llama2_like = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    )
    with pytest.raises(ValueError, match="byte fallback"):
        export_gguf(int4_model(), llama2_like, tmp_path / "m.gguf")


def test_executorch_pte_generates_like_eager(tmp_path):
    pytest.importorskip("executorch", reason="needs the executorch extra")
    from qatune.export.executorch import load_pte

    model = int4_model(layers=1)
    # XNNPACK stores group scales in bf16. With bf16-representable scales the .pte computes what torchao eager does
    # (measured: 3e-7 relative); with fp32 scales the rounding alone moves logits ~1-2% and can flip a greedy token.
    with torch.no_grad():
        for w in linear_weights(model).values():
            w.scale.copy_(w.scale.bfloat16().float())
    prompt = [5, 17, 42, 99]
    with torch.no_grad():  # eager greedy without a cache: nothing shared with the exported program
        ids = torch.tensor([prompt])
        for _ in range(16):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        eager_logits = model(ids).logits
    path = export_executorch(model, tmp_path / "m.pte", max_seq_len=32)
    # the export borrows the model (cache buffers, attention kernel) and gives it back as it was
    assert not [name for name, _ in model.named_buffers() if "et_" in name]
    assert model.config._attn_implementation != "qatune_executorch"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager_logits, rtol=0, atol=0)
    assert generate_pte(path, prompt, max_new_tokens=16) == ids[0, len(prompt) :].tolist()
    forward = load_pte(path)
    pte_logits = forward.execute([ids, torch.arange(ids.shape[1])])[0]
    torch.testing.assert_close(pte_logits, eager_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_smollm2_gguf_carries_ptq_codes(tmp_path, smollm2_dir):
    from qatune.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(smollm2_dir)), load_tokenizer(str(smollm2_dir))
    quantize_(model, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32)))
    path = export_gguf(model, tokenizer, tmp_path / "smollm2-q4_0.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors  # lm_head is int4, the embedding is not: the tie must be written out
    for hf_name, gguf_name in [
        ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
        ("model.layers.29.mlp.down_proj.weight", "blk.29.ffn_down.weight"),
        ("lm_head.weight", "output.weight"),
    ]:
        w = model.get_parameter(hf_name)
        codes, _ = q4_0_codes_and_scales(np.asarray(tensors[gguf_name].data))
        if "q_proj" in hf_name:
            codes = unpermute(codes, model.config.num_attention_heads)
        np.testing.assert_array_equal(codes, w.qdata.numpy())


@pytest.fixture
def float_checkpoint(tmp_path, tiny_tokenizer):
    path = tmp_path / "float"
    make_tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_recipe_refuses_a_float_checkpoint(float_checkpoint):
    from qatune.cli import load_recipe_config

    recipe, cfg = load_recipe_config("export", "export", [f"model.path={float_checkpoint}"])
    with pytest.raises(ValueError, match="float checkpoint.*qat_recipe.*quantize=rtn"):
        recipe.main(cfg)
    with pytest.raises(ValueError, match="format='onnx'"):
        load_recipe_config("export", "export", [f"model.path={float_checkpoint}", "format=onnx"])


def test_recipe_ptq_on_the_fly_writes_gguf_beside_the_checkpoint(float_checkpoint):
    from qatune.cli import load_recipe_config

    recipe, cfg = load_recipe_config("export", "export", [f"model.path={float_checkpoint}", "quantize=rtn"])
    path = recipe.main(cfg)
    assert path == float_checkpoint.parent / "model-q4_0.gguf"
    assert gguf_tensors(path)["blk.1.ffn_down.weight"].tensor_type == Q4_0


def test_recipe_exports_a_saved_int4_dir(tmp_path, float_checkpoint):
    quantization = pytest.importorskip("qatune.quantization", reason="needs qatune.quantization")
    from qatune.cli import load_recipe_config
    from qatune.models import load_model, load_tokenizer

    model = load_model(str(float_checkpoint))
    q = quantization.resolve_quantizer({"scheme": "8da4w", "group_size": 64})
    quantization.save_quantized(
        quantization.quantize_ptq_(model, q), load_tokenizer(str(float_checkpoint)), tmp_path / "int4"
    )
    recipe, cfg = load_recipe_config("export", "export", [f"model.path={tmp_path / 'int4'}", "format=gguf"])
    path = recipe.main(cfg)
    assert path == tmp_path / "model-q4_0.gguf"
    codes, _ = q4_0_codes_and_scales(np.asarray(gguf_tensors(path)["blk.0.ffn_up.weight"].data))
    np.testing.assert_array_equal(codes, model.get_parameter("model.layers.0.mlp.up_proj.weight").qdata.numpy())
    with pytest.raises(ValueError, match="already quantized"):
        recipe.main(load_recipe_config("export", "export", [f"model.path={tmp_path / 'int4'}", "quantize=rtn"])[1])


def test_executorch_refuses_a_sliding_window_shorter_than_the_cache(tmp_path):
    pytest.importorskip("executorch", reason="needs the executorch extra")
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)  # fmt: skip
    with pytest.raises(ValueError, match="sliding_window=16.*max_seq_len<=16"):
        export_executorch(MistralForCausalLM(config), tmp_path / "m.pte", max_seq_len=32, allow_float=True)
    assert not list(tmp_path.iterdir())


def test_recipe_reports_the_pte_as_executorch_runs_it(tiny_checkpoint, tmp_path):
    pytest.importorskip("executorch", reason="needs the executorch extra")
    from test_qat_recipe import run_recipe, tiny_overrides

    out = tmp_path / "out"
    overrides = tiny_overrides(tiny_checkpoint, out, "compare.baseline=false", "export.formats=[hf,executorch]")
    fast_measure = ["eval.measure=true", "eval.prompt_len=16", "eval.decode_tokens=4", "eval.runs=1"]
    report = run_recipe([*overrides, "export.max_seq_len=128", *fast_measure])
    served, eager = report["results"]["qat_executorch"], report["results"]["qat"]
    assert "error" not in served, served.get("error")
    assert served["runtime"] == "executorch" and served["file"] == "model-8da4w.pte"
    # The same int4 model, XNNPACK's kernels and bf16 scales: perplexity from the .pte's own logits.
    assert served["perplexity"] == pytest.approx(eager["perplexity"], rel=0.02)
    assert served["tokens"] == eager["tokens"] and served["decode_tokens_per_s"] > 0
    assert "run by executorch" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ quantized embeddings


def embedding_model(embedding: str, tied: bool = False, layers: int = 2) -> nn.Module:
    """PTQ through qatune (the path convert_to_int4 shares): 8da4w linears, lm_head included, and the embedding."""
    from qatune.quantization import QuantScheme, quantize_ptq_

    return quantize_ptq_(make_tiny_llama(tie_word_embeddings=tied, layers=layers), QuantScheme(embedding=embedding))


@pytest.mark.parametrize(("embedding", "qtype"), [("int4", Q4_0), ("int8", Q8_0)])
def test_gguf_token_embd_holds_the_embedding_codes_and_scales(tmp_path, tiny_tokenizer, embedding, qtype):
    model = embedding_model(embedding)
    w = model.model.embed_tokens.weight
    tensors = gguf_tensors(export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf"))
    t = tensors["token_embd.weight"]
    assert t.tensor_type == qtype and "output.weight" in tensors  # untied: lm_head is its own table
    blocks = np.asarray(t.data)
    codes, d = (q4_0_codes_and_scales if qtype == Q4_0 else q8_0_codes_and_scales)(blocks)
    np.testing.assert_array_equal(codes, w.qdata.numpy())  # no re-quantization
    scale16 = w.scale.float().numpy().astype(np.float16)
    np.testing.assert_array_equal(d, scale16)
    dequant = gguf.quants.dequantize(blocks, qtype).reshape(w.shape)  # gguf's own dequantizer
    expected = w.qdata.float() * torch.from_numpy(scale16).float().repeat_interleave(32, dim=1)
    np.testing.assert_array_equal(dequant, expected.numpy())


def test_gguf_writes_a_tied_int4_embedding_and_lm_head_once(tmp_path, tiny_tokenizer):
    """Tied, embedding int4 at the linears' group size: lm_head's codes are the embedding's, so one token_embd
    table serves both (llama.cpp multiplies by it when output.weight is absent); transformers reads it back so."""
    from transformers import AutoModelForCausalLM

    model = embedding_model("int4", tied=True)
    head, table = model.lm_head.weight, model.model.embed_tokens.weight
    assert torch.equal(head.qdata, table.qdata) and torch.equal(head.scale, table.scale)
    path = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    tensors = gguf_tensors(path)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == Q4_0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    ids = torch.tensor([tiny_tokenizer("def f(x):\n    return x * 2")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, fp16_scale_twin(model, tied=True)(ids).logits, rtol=1e-4, atol=1e-4
        )

    int8 = embedding_model("int8", tied=True)  # int8 table, int4 head: two tables
    two = export_gguf(int8, tiny_tokenizer, tmp_path / "two.gguf")
    tensors = gguf_tensors(two)
    assert tensors["output.weight"].tensor_type == Q4_0 and tensors["token_embd.weight"].tensor_type == Q8_0
    table_bytes = 512 * 256 // 32 * 18  # one Q4_0 table
    assert os.path.getsize(two) - os.path.getsize(path) >= table_bytes


@pytest.mark.parametrize("embedding", ["int4", "int8"])
def test_executorch_runs_the_quantized_embedding_from_its_codes(tmp_path, embedding):
    """The .pte holds the embedding as ExecuTorch's quantized embedding op (codes + scales, not a float table) and
    computes the eager model's logits."""
    pytest.importorskip("executorch", reason="needs the executorch extra")
    from qatune.export.executorch import load_pte

    model = embedding_model(embedding, layers=1)
    with torch.no_grad():  # bf16-representable scales: XNNPACK keeps linear scales in bf16 (see the test above)
        for w in model.parameters():
            if isinstance(w, IntxUnpackedToInt8Tensor):
                w.scale.copy_(w.scale.bfloat16().float())
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        eager = model(ids).logits
    path = export_executorch(model, tmp_path / "m.pte", max_seq_len=32)
    got = load_pte(path).execute([ids, torch.arange(ids.shape[1])])[0]
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
    float_table = 512 * 256 * 4
    codes = 512 * 256 * (4 if embedding == "int4" else 8) // 8
    plain = export_executorch(embedding_model("none", layers=1), tmp_path / "plain.pte", max_seq_len=32)
    assert os.path.getsize(plain) - os.path.getsize(path) >= 0.9 * (float_table - codes - 512 * 256 // 32 * 4)
