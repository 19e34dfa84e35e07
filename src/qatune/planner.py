"""Memory planner: per-GPU memory of a QAT fine-tune, estimated without loading a single weight.

    plan = plan_memory("meta-llama/Meta-Llama-3-8B-Instruct", num_gpus=8, strategy="fsdp2", batch_size=2)
    print(format_plan(plan))

The model is built by transformers on the meta device (shapes only, no memory) and torchao's QAT `prepare` is
applied to it, so the parameter count is transformers' own and the set of fake-quantized linears is torchao's own.
Everything else is arithmetic; the formulas and their sources are in docs/memory.md.

Hub ids are resolved offline from `KNOWN_ARCHITECTURES` (the `config.json` values of the shipped configs' models);
a local directory is read from its own `config.json`.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qatune.errors import ConfigError

GB = 1e9  # GPU sizes are sold in GB; every figure here is in the same unit
FIT_FRACTION = 0.9  # the caching allocator reserves more than the tensors it holds: keep 10% headroom
STRATEGIES = ("fsdp2", "ddp", "single")
# bf16: mixed precision, fp32 master weights/grads/optimizer states, bf16 compute under autocast (what qat_recipe
# runs with mixed_precision auto/bf16; FSDP2 gathers the fp32 weights). bf16-pure: everything bf16 (torchtune's
# `dtype: bf16` recipes; not a qatune mode, for comparison). fp32: everything fp32 (mixed_precision=no).
DTYPES = ("bf16", "bf16-pure", "fp32")
MASTER_BYTES = {"bf16": 4, "bf16-pure": 2, "fp32": 4}
COMPUTE_BYTES = {"bf16": 2, "bf16-pure": 2, "fp32": 4}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}  # fp32 tensors per parameter
QAT_SCHEMES = ("8da4w", "4w", "8da8w")

# config.json values of the shipped configs' models (hub unreachable here). Sources: the models' config.json on the
# Hugging Face Hub as quoted in public code (see docs/memory.md); parameter counts are checked against the models'
# published ones in tests/test_planner.py.
_LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", **_LLAMA3_ROPE},
    ),
    "meta-llama/Llama-3.2-1B-Instruct": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", **_LLAMA3_ROPE, "factor": 32.0},
    ),
    "meta-llama/Llama-3.2-3B-Instruct": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", **_LLAMA3_ROPE, "factor": 32.0},
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(
        model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
        num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
    ),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class ModelStats:
    """What the memory formulas need, read off transformers' meta model after torchao's fake-quant prepare."""

    name: str
    params: int  # unique parameters (tied embeddings counted once), as transformers builds them
    layer_params: int  # one decoder layer
    layer_linear_params: int  # fake-quantized linear weights in one decoder layer
    head_linear_params: int  # fake-quantized weights outside the layers (lm_head)
    linears_per_layer: int
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # num_key_value_heads * head_dim
    vocab: int
    fake_quant: str  # how the fake-quantized linears were found


def load_architecture(model: str | Path | dict | Any):
    """A transformers config from a hub id in KNOWN_ARCHITECTURES, a local dir with config.json, a dict or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        values = dict(model)
        return AutoConfig.for_model(values.pop("model_type", "llama"), **values)
    path = Path(str(model))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json; the planner needs the model's config.json")
        return AutoConfig.from_pretrained(path)
    if str(model) in KNOWN_ARCHITECTURES:
        return load_architecture(KNOWN_ARCHITECTURES[str(model)])
    raise ConfigError(
        f"unknown model {str(model)!r}: pass a local directory with a config.json, or one of "
        f"{', '.join(KNOWN_ARCHITECTURES)}"
    )


def _arch_key(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


@functools.lru_cache(maxsize=32)
def _model_stats(key: str, qat_scheme: str | None, group_size: int) -> ModelStats:
    from transformers import AutoConfig

    from qatune.models import meta_model

    values = json.loads(key)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    fake_quant = "none"
    if qat_scheme is not None:
        fake_quant = _prepare_on_meta(model, qat_scheme, group_size)
    linears = _fake_quantized_linears(model) if qat_scheme is not None else {}
    layer0 = {n: w for n, w in linears.items() if n.startswith("model.layers.0.")}
    in_layers = {n for n in linears if n.startswith("model.layers.")}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelStats(
        name=getattr(config, "_name_or_path", "") or config.model_type,
        params=params,
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        layer_linear_params=sum(layer0.values()),
        head_linear_params=sum(w for n, w in linears.items() if n not in in_layers),
        linears_per_layer=len(layer0),
        num_layers=len(layers),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_dim=config.num_key_value_heads * head_dim,
        vocab=config.vocab_size,
        fake_quant=fake_quant,
    )


@dataclass(frozen=True)
class LoraStats:
    adapter_params: int  # rank x (in + out) summed over the adapted linears
    layer_weight_params: int  # the adapted weights of one decoder layer


def lora_stats(model: str | Path | dict | Any, rank: int, targets: tuple[str, ...]) -> LoraStats:
    """The adapters qatune.lora would add (same target rule), counted on the meta device."""
    from qatune.lora import lora_targets
    from qatune.models import meta_model

    meta = meta_model(load_architecture(model))
    names = lora_targets(meta, list(targets))
    chosen = [meta.get_submodule(n) for n in names]
    layer0 = [meta.get_submodule(n) for n in names if n.startswith("model.layers.0.")]
    return LoraStats(
        adapter_params=sum(rank * (m.in_features + m.out_features) for m in chosen),
        layer_weight_params=sum(m.weight.numel() for m in layer0),
    )


def _prepare_on_meta(model: torch.nn.Module, scheme: str, group_size: int) -> str:
    """Apply torchao's QAT prepare to the meta model; fall back to "every nn.Linear" if torchao refuses."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.qat import QATConfig

    granularity = PerAxis(0) if scheme == "8da8w" else PerGroup(group_size)
    weight_dtype = torch.int8 if scheme == "8da8w" else torch.int4
    if scheme == "4w":
        base = IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)
    else:
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(model, QATConfig(base, step="prepare"))
    except Exception as e:  # e.g. in_features not divisible by group_size: count every linear instead
        return f"analytical (torchao prepare failed on meta: {type(e).__name__})"
    return "torchao QATConfig prepare on meta"


def _fake_quantized_linears(model: torch.nn.Module) -> dict[str, int]:
    """Weight sizes of the linears torchao fake-quantizes (all nn.Linear when prepare could not run)."""
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    fq = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    return fq or {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def model_stats(model: str | Path | dict | Any, qat_scheme: str | None = "8da4w", group_size: int = 32) -> ModelStats:
    return _model_stats(_arch_key(load_architecture(model)), qat_scheme, group_size)


def _memory(
    s: ModelStats,
    *,
    num_gpus: int,
    strategy: str,
    dtype: str,
    optimizer: str,
    batch_size: int,
    seq_len: int,
    activation_checkpointing: bool,
    qat_scheme: str | None,
    group_size: int,
    lora: LoraStats | None = None,
    embedding_group_size: int | None = None,
    teacher_chunk: int | None = None,
) -> dict[str, float]:
    """Per-GPU bytes of each part (formulas: docs/memory.md)."""
    shards = num_gpus if strategy == "fsdp2" else 1
    p = s.params
    root = p - s.num_layers * s.layer_params  # embeddings, final norm, untied lm_head: FSDP2's root unit
    master, compute = MASTER_BYTES[dtype], COMPUTE_BYTES[dtype]
    act_scale = compute // 2  # the activation coefficients are for bf16 compute; fp32 doubles them

    weights = master * p / shards  # the weights the optimizer updates (sharded under FSDP2)
    if strategy == "fsdp2":  # all-gathered in the weights' dtype: the root unit plus the current and prefetched layer
        weights += master * (root + 2 * s.layer_params)  # (qatune.fsdp: fp32, so int4 codes come from fp32 weights)
    elif dtype == "bf16" and qat_scheme is None:  # autocast caches a bf16 copy of every weight for the forward (a
        weights += 2 * p  # fake-quantized linear casts its fake-quantized weight instead: counted under fake quant)
    grads = master * p / shards  # gradients in the weights' dtype (FSDP2: reduce_dtype = param dtype, sharded)
    if strategy == "fsdp2":
        grads += master * max(root, s.layer_params)  # one unit's unsharded gradient before its reduce-scatter
    elif strategy == "ddp":
        grads += master * p  # DDP's flat communication buckets (gradient_as_bucket_view=False)
    optimizer_bytes = OPTIMIZER_STATES[optimizer] * master * p / shards  # torch keeps states in the param dtype
    if lora is not None:  # QAT + LoRA (qatune.lora): a frozen base in the compute dtype, fp32 adapters train
        a = lora.adapter_params
        weights = compute * p + 4 * a  # no autocast copies: the base already is in the compute dtype
        grads = 4 * a * (2 if strategy == "ddp" else 1)  # (DDP: plus its buckets)
        optimizer_bytes = OPTIMIZER_STATES[optimizer] * 4 * a

    tokens = batch_size * seq_len
    h, i, kv, n_layers = s.hidden, s.intermediate, s.kv_dim, s.num_layers
    # Saved for backward by one Llama decoder layer (SDPA flash/mem-efficient kernel, no s^2 term), bytes/token.
    layer = tokens * (20 * h + 4 * kv + 8 * i + 4 * s.heads + 8) * act_scale
    # Around the loss's backward: bf16 logits (held by the model output) + fp32 log-softmax saved by cross-entropy +
    # its fp32 and bf16 gradients = 12 bytes per vocab entry; plus the final norm's and lm_head's saved inputs.
    head = tokens * (12 * s.vocab + 8 * h) * act_scale
    # Fake quant (torchao 0.18, traced on real tensors): fake-quantized copies of weights and activations kept for
    # backward. Weight copies are the *unsharded* weights whatever the strategy.
    fq_layer = fq_head = 0.0
    if qat_scheme is not None:
        weight_bytes = 4 + (4 / group_size if qat_scheme != "8da8w" else 0)  # 2 bf16 copies + per-group qparams
        fq_layer = weight_bytes * s.layer_linear_params * act_scale
        fq_head = weight_bytes * s.head_linear_params * act_scale
        if qat_scheme != "4w":  # dynamic per-token activation fake quant
            fq_layer += tokens * (20 * h + 2 * i + 4 * s.linears_per_layer) * act_scale
            fq_head += tokens * (4 * h + 4) * act_scale
    if lora is not None:  # each adapted linear also saves its merged weight W + s B A for the backward
        fq_layer += compute * lora.layer_weight_params
    if qat_scheme is not None and embedding_group_size:  # quantizer.embedding: torchao's FakeQuantizedEmbedding
        # saves its fake-quantized table (weights' dtype) and 2 fp32 qparams per group (measured: 4.25 B/elem at g32)
        table_bytes = compute if lora is not None else master
        fq_head += (table_bytes + 8 / embedding_group_size) * s.vocab * h
    # Autocast over fp32 weights keeps the residual stream in fp32, as does fp32 training.
    residual_bytes = 4 if dtype in ("fp32", "bf16") and lora is None else compute
    without_ac = n_layers * (layer + fq_layer) + head + fq_head
    # Checkpointing keeps each layer's input; backward recomputes one layer at a time.
    with_ac = n_layers * tokens * h * residual_bytes + (layer + fq_layer) + head + fq_head
    activations = with_ac if activation_checkpointing else without_ac
    # distillation: the frozen teacher in the compute dtype (sharded like the student under FSDP2, plus its gathered
    # root and current layer), and per chunk of teacher_chunk positions its logits plus ~5 fp32 [chunk, vocab] tensors.
    teacher = 0.0
    if teacher_chunk:
        teacher = compute * p / shards + (compute * (root + s.layer_params) if strategy == "fsdp2" else 0)
        teacher += batch_size * min(teacher_chunk, seq_len) * s.vocab * (compute + 20)
    total = weights + grads + optimizer_bytes + activations + teacher
    return {
        "teacher": teacher,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer_bytes,
        "activations": activations,
        "activations_with_ac": with_ac,
        "activations_without_ac": without_ac,
        "logits": head,
        "fake_quant": n_layers * fq_layer + fq_head if not activation_checkpointing else fq_layer + fq_head,
        "total": total,
    }


def plan_memory(
    model_path_or_config: str | Path | dict | Any,
    *,
    num_gpus: int = 1,
    strategy: str | None = None,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 2048,
    activation_checkpointing: bool = True,
    qat: bool = True,
    qat_scheme: str = "8da4w",
    group_size: int = 32,
    gpu_memory_gb: float = 80,
    lora_rank: int = 0,
    lora_targets: tuple[str, ...] = (),
    embedding_group_size: int | None = None,
    teacher_chunk: int | None = None,
) -> dict[str, Any]:
    """Per-GPU memory plan of full fine-tuning (with QAT fake quantization when `qat`), or with `lora_rank` of
    QAT + LoRA, and what to change if it does not fit. `strategy` defaults to fsdp2 on several GPUs, single on one.
    Bytes are per GPU."""
    strategy = strategy or ("fsdp2" if num_gpus > 1 else "single")
    _check(num_gpus=num_gpus, strategy=strategy, dtype=dtype, optimizer=optimizer, batch_size=batch_size,
           seq_len=seq_len, qat_scheme=qat_scheme, group_size=group_size, gpu_memory_gb=gpu_memory_gb)  # fmt: skip
    scheme = qat_scheme if qat else None
    stats = model_stats(model_path_or_config, scheme, group_size)
    knobs = dict(num_gpus=num_gpus, strategy=strategy, dtype=dtype, optimizer=optimizer, batch_size=batch_size,
                 seq_len=seq_len, activation_checkpointing=activation_checkpointing, qat_scheme=scheme,
                 group_size=group_size, embedding_group_size=embedding_group_size if qat else None,
                 teacher_chunk=teacher_chunk)  # fmt: skip
    if lora_rank:
        knobs["lora"] = lora_stats(model_path_or_config, lora_rank, tuple(lora_targets))
    memory = _memory(stats, **knobs)
    budget = gpu_memory_gb * GB * FIT_FRACTION
    fits = memory["total"] <= budget
    return {
        "model": str(model_path_or_config) if isinstance(model_path_or_config, (str, Path)) else stats.name,
        "params": stats.params,
        "num_layers": stats.num_layers,
        "fake_quantized_params": stats.num_layers * stats.layer_linear_params + stats.head_linear_params,
        "fake_quant": stats.fake_quant,
        **{k: v for k, v in knobs.items() if k not in ("qat_scheme", "lora")},
        "lora_rank": lora_rank,
        "trainable_params": knobs["lora"].adapter_params if lora_rank else stats.params,
        "qat": scheme,
        "gpu_memory_gb": gpu_memory_gb,
        "bytes": memory,
        "total_gb": memory["total"] / GB,
        "fits": fits,
        "advice": _advice(stats, knobs, memory, budget),
    }


def _check(*, num_gpus, strategy, dtype, optimizer, batch_size, seq_len, qat_scheme, group_size, gpu_memory_gb):
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy == "single" and num_gpus != 1:
        raise ConfigError(f"strategy 'single' runs on one GPU, got num_gpus={num_gpus}; use fsdp2 or ddp")
    if dtype not in DTYPES:
        raise ConfigError(
            f"unknown dtype {dtype!r}; use bf16 (mixed precision, fp32 master weights), bf16-pure or fp32"
        )
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZER_STATES)}")
    if qat_scheme not in QAT_SCHEMES:
        raise ConfigError(f"unknown qat_scheme {qat_scheme!r}; use one of {', '.join(QAT_SCHEMES)}")
    for name, value in (("num_gpus", num_gpus), ("batch_size", batch_size), ("seq_len", seq_len),
                        ("group_size", group_size), ("gpu_memory_gb", gpu_memory_gb)):  # fmt: skip
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def _advice(stats: ModelStats, knobs: dict, memory: dict, budget: float) -> list[str]:
    """Smallest single changes that make the plan fit (or, when it fits, a faster setting that also fits)."""

    def total(**change) -> float:
        return _memory(stats, **{**knobs, **change})["total"]

    gb = lambda b: f"{b / GB:.1f} GB"  # noqa: E731
    advice = []
    if memory["total"] <= budget:
        if knobs["activation_checkpointing"] and total(activation_checkpointing=False) <= budget:
            advice.append("activation_checkpointing=false also fits (faster: no recompute)")
        return advice
    if not knobs["activation_checkpointing"] and total(activation_checkpointing=True) <= budget:
        advice.append(
            f"enable activation checkpointing (activation_checkpointing=true): activations "
            f"{gb(memory['activations_without_ac'])} -> {gb(memory['activations_with_ac'])}"
        )
    ac = {"activation_checkpointing": True}
    for gpus in (2, 4, 8, 16, 32, 64, 128, 256):
        if gpus >= knobs["num_gpus"] and total(num_gpus=gpus, strategy="fsdp2", **ac) <= budget:
            if gpus != knobs["num_gpus"] or knobs["strategy"] != "fsdp2":
                advice.append(f"use FSDP2 on {gpus} GPUs (--nproc_per_node {gpus}) with activation checkpointing")
            break
    if total(**ac) <= budget:  # checkpointing alone is enough; the other levers below would cost more
        return advice
    with_ac = "" if knobs["activation_checkpointing"] else " with activation checkpointing"
    if knobs["batch_size"] > 1:
        fitting = [b for b in range(knobs["batch_size"] - 1, 0, -1) if total(batch_size=b, **ac) <= budget]
        if fitting:
            advice.append(
                f"reduce batch_size to {fitting[0]}{with_ac} and raise gradient_accumulation_steps to keep the "
                "effective batch"
            )
    if total(batch_size=1, **ac) > budget:
        seq = knobs["seq_len"] // 2
        while seq >= 128 and total(seq_len=seq, batch_size=1, **ac) > budget:
            seq //= 2
        if seq >= 128:
            advice.append(f"reduce seq_len to {seq} (batch_size=1{with_ac})")
    if knobs["optimizer"] in ("adamw", "adam") and total(optimizer="sgd", **ac) <= budget:
        advice.append("AdamW's two fp32 states are 8 bytes/param: plain SGD fits (often a worse fine-tune)")
    if not advice:
        advice.append("does not fit even on 256 GPUs with FSDP2: use LoRA/QAT+LoRA or a smaller model")
    return advice


def estimate_from_config(cfg, num_gpus: int = 1, gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """`plan_memory` for a recipe config (`tune estimate` / `tune run --dry-run`); loads no weights."""
    from omegaconf import OmegaConf

    def get(key: str, default=None):
        value = OmegaConf.select(cfg, key, default=default)
        return default if value is None else value

    component = str(get("optimizer._component_", "torch.optim.AdamW")).rsplit(".", 1)[-1].lower()
    if component == "sgd":
        component = "sgd_momentum" if float(get("optimizer.momentum", 0) or 0) > 0 else "sgd"
    if component not in OPTIMIZER_STATES:
        component = "adamw"  # other optimizers: assume Adam-like two states per parameter
    quantizer = get("quantizer")
    mixed_precision = str(get("mixed_precision", "auto"))
    return plan_memory(
        get("model.path"),
        num_gpus=num_gpus,
        # One process shards nothing: the recipe ignores distributed.strategy there, and so does the plan.
        strategy=get("distributed.strategy", "fsdp2") if num_gpus > 1 else "single",
        dtype="fp32" if mixed_precision == "no" else "bf16",  # auto/bf16 on GPUs: bf16 autocast, fp32 master weights
        optimizer=component,
        batch_size=int(get("batch_size", 1)),
        seq_len=int(get("seq_len", 2048)),
        activation_checkpointing=bool(get("activation_checkpointing", False)),
        qat=quantizer is not None,
        qat_scheme=str(get("quantizer.scheme", "8da4w")),
        group_size=int(get("quantizer.group_size", 32)),
        gpu_memory_gb=float(gpu_memory_gb or get("gpu_memory_gb", 80)),
        lora_rank=int(get("lora.rank", 0)),
        lora_targets=tuple(get("lora.target_modules", ())),
        embedding_group_size=None
        if get("quantizer.embedding", "none") == "none"
        else int(get("quantizer.embedding_group_size", 32)),
        teacher_chunk=int(get("distillation.chunk_size", 256)) if float(get("distillation.weight", 0)) > 0 else None,
    )


def check_plan_fits(cfg, num_processes: int, gpu_memory_bytes: int) -> None:
    """Refuse, before any weight loads, a GPU run whose plan needs more than the GPU holds (the plan counts tensors,
    a lower bound: past the GPU's whole memory it cannot fit). A model the planner cannot size is not refused."""
    try:
        plan = estimate_from_config(cfg, num_gpus=num_processes, gpu_memory_gb=gpu_memory_bytes / GB)
    except ConfigError:  # a hub id outside KNOWN_ARCHITECTURES: nothing to plan with before the download
        return
    if plan["bytes"]["total"] <= gpu_memory_bytes:
        return
    fixes = "; ".join(plan["advice"])
    raise ConfigError(
        f"memory plan: {plan['total_gb']:.1f} GB per GPU on {num_processes} GPU(s) ({plan['strategy']}), more than "
        f"this GPU's {gpu_memory_bytes / GB:.1f} GB; what fits: {fixes}; or QAT + LoRA (a lora: section, e.g. "
        f"--config llama3_8b_lora); `tune estimate --config ... --nproc_per_node N` prints the plan"
    )


def format_plan(plan: dict[str, Any]) -> str:
    """A table of the plan, one line per part, in GB per GPU."""
    b = plan["bytes"]
    ac = "on" if plan["activation_checkpointing"] else "off"
    dtype = plan["dtype"] + (" (fp32 master weights)" if plan["dtype"] == "bf16" else "")
    if plan.get("lora_rank"):
        dtype = plan["dtype"] + (" compute, frozen bf16 base, fp32 adapters" if plan["dtype"] == "bf16" else "")
    qat = f"{plan['qat']} (group {plan['group_size']})" if plan["qat"] else "off"
    if plan.get("lora_rank"):
        qat += f", LoRA rank {plan['lora_rank']} ({plan['trainable_params']:,} trainable parameters, frozen base)"
    rows = [
        ("weights (+ compute copies)", b["weights"]),
        ("gradients", b["grads"]),
        ("optimizer states", b["optimizer"]),
        ("activations (in use)", b["activations"]),
        ("  with checkpointing", b["activations_with_ac"]),
        ("  without checkpointing", b["activations_without_ac"]),
        ("  of which logits + loss", b["logits"]),
        ("  of which fake quant", b["fake_quant"]),
        ("distillation teacher", b["teacher"]),
        ("total", b["total"]),
    ]
    lines = [
        f"memory plan: {plan['model']}  ({plan['params']:,} parameters, {plan['num_layers']} layers)",
        f"  {plan['num_gpus']} GPU(s), {plan['strategy']}, {dtype}, {plan['optimizer']}, batch {plan['batch_size']}"
        f" x seq {plan['seq_len']}, activation checkpointing {ac}, QAT {qat}",
        f"  {'per GPU':<34}",
        *(f"  {name:<34}{value / GB:8.2f} GB" for name, value in rows),
        f"  fits a {plan['gpu_memory_gb']:g} GB GPU (with {100 * (1 - FIT_FRACTION):.0f}% headroom): "
        + ("yes" if plan["fits"] else "NO"),
    ]
    lines += [f"  - {a}" for a in plan["advice"]]
    return "\n".join(lines)
