"""Quantization schemes: QAT prepare (fake quant) and convert, plain PTQ, and int4 checkpoints transformers loads.

Every scheme is one torchao base config, used three ways so the numerics always agree:
  prepare  quantize_(model, QATConfig(base, step="prepare"))   nn.Linear -> FakeQuantizedLinear (trainable)
  convert  quantize_(model, QATConfig(base, step="convert"))   FakeQuantizedLinear -> nn.Linear with int weights
  PTQ      quantize_(model, base)                              what users get without QAT
On CPU with torchao 0.18 the fake-quantized forward equals the converted forward bit for bit, for every scheme here.

  8da4w  Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g)): int8 asymmetric per-token activations, int4
         symmetric per-group weights (ExecuTorch/XNNPACK's scheme; the torchtune/legacy quantizer's numerics).
  4w     IntxWeightOnlyConfig(int4, PerGroup(g)): int4 symmetric per-group weights, float activations (the grid
         GGUF Q4_0 holds). Not Int4WeightOnlyConfig: its QAT fake quant models bf16/tinygemm numerics and its
         convert needs the mslk CUDA kernels ("Requires mslk >= 1.0.0" on CPU).
  8da8w  Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)): int8 per-token activations, int8 per-channel
         weights; group_size is ignored (per-channel is the int8 norm). Not Int8DynamicActivationInt8WeightConfig:
         QATConfig cannot prepare it ("Unexpected base config").

The token embedding (`embedding: int8 | int4`, default none): IntxWeightOnlyConfig(int8 | int4,
PerGroup(embedding_group_size)), symmetric, weight-only, through the same three steps (prepare gives a torchao
FakeQuantizedEmbedding, which fake-quantizes the table its lookup reads); converted = fake-quantized bit for bit.

Tied embeddings (SmolLM2, Llama 3.2): prepare keeps the tie (one Parameter). With `embedding: none` the lookup reads
it unquantized and only lm_head's matmul sees the fake quant; with a quantized embedding both fake-quantize the same
Parameter. Convert gives each its own int weight, so the model is untied (`tie_word_embeddings=False`). With
`embedding: int4` and embedding_group_size = group_size (8da4w, 4w) the two int tables hold the same codes and
scales (int4 symmetric per-group of the same weights): the GGUF export writes that table once (llama.cpp reads
token_embd for the output layer), see qatune.export.gguf.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn
from torchao.quantization import (
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.qat import (
    FakeQuantizedEmbedding,
    FakeQuantizedLinear,
    Int8DynActInt4WeightQATQuantizer,
    QATConfig,
)
from torchao.quantization.qat.linear import enable_linear_fake_quant
from torchao.utils import TorchAOBaseTensor

from qatune.errors import ConfigError
from qatune.files import atomic_dir
from qatune.fused_fake_quant import fuse_fake_quant_
from qatune.gptq import GPTQConfig, gptq_config

logger = logging.getLogger(__name__)

SCHEMES = ("8da4w", "4w", "8da8w")
GROUP_SIZES = (32, 64, 128, 256)
EMBEDDING_TYPES = ("none", "int8", "int4")
QATUNE_KEYS = ("scheme", "group_size", "skip", "fake_quant_after_n_steps", "fused", "range_learning", "embedding",
               "embedding_group_size", "gptq")  # fmt: skip

# The torchtune-form quantizers we accept. torchtune's own name is an alias: torchtune cannot import beside torchao
# 0.18, and its class was a thin re-export of torchao's.
LEGACY_QUANTIZERS = {
    "torchao.quantization.qat.Int8DynActInt4WeightQATQuantizer": Int8DynActInt4WeightQATQuantizer,
    "torchao.quantization.qat.linear.Int8DynActInt4WeightQATQuantizer": Int8DynActInt4WeightQATQuantizer,
    "torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer": Int8DynActInt4WeightQATQuantizer,
}


@dataclass
class QuantScheme:
    scheme: str = "8da4w"  # 8da4w | 4w | 8da8w
    group_size: int = 32  # 32 | 64 | 128 | 256; ignored by 8da8w (per-channel weights)
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of linears (or embeddings) kept float: lm_head
    fake_quant_after_n_steps: int = 0  # train in float first; the trainer calls enable_fake_quant at that step
    fused: bool = True  # fused fake quant (qatune.fused_fake_quant): torchao's numerics, much less time and memory
    range_learning: bool = False  # learn the int weight scales (torchao's range learning, LSQ-style); convert uses them
    embedding: str = "none"  # none | int8 | int4: weight-only fake quant of the token embedding (symmetric)
    embedding_group_size: int = 32  # 32 | 64 | 128 | 256 values per embedding scale (llama.cpp's and ExecuTorch's 32)
    gptq: GPTQConfig | dict | None = None  # GPTQ's calibration, wherever GPTQ runs (PTQ rows, qat.init: gptq, export)
    legacy: object | None = None  # the torchtune-form quantizer instance, if the config used `_component_`

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantizer scheme {self.scheme!r} is not supported; use one of {', '.join(SCHEMES)}")
        if isinstance(self.group_size, bool) or self.group_size not in GROUP_SIZES:
            raise ConfigError(f"quantizer group_size {self.group_size!r} is not supported; use one of {GROUP_SIZES}")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError(
                f"quantizer skip must be a list of module-name patterns, e.g. [lm_head], not {self.skip!r}"
            )
        self.skip = list(self.skip)
        n = self.fake_quant_after_n_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"quantizer fake_quant_after_n_steps must be an integer >= 0, not {n!r}")
        if not isinstance(self.fused, bool):
            raise ConfigError(f"quantizer fused must be true or false, not {self.fused!r}")
        if not isinstance(self.range_learning, bool):
            raise ConfigError(f"quantizer range_learning must be true or false, not {self.range_learning!r}")
        if self.range_learning and self.legacy is not None:
            raise ConfigError("quantizer range_learning needs the qatune form (scheme: ...), not _component_")
        if self.embedding not in EMBEDDING_TYPES:
            raise ConfigError(f"quantizer embedding {self.embedding!r} is not one of {', '.join(EMBEDDING_TYPES)}")
        g = self.embedding_group_size
        if isinstance(g, bool) or g not in GROUP_SIZES:
            raise ConfigError(f"quantizer embedding_group_size {g!r} is not supported; use one of {GROUP_SIZES}")
        self.gptq = gptq_config(self.gptq)

    def base_config(self) -> Int8DynamicActivationIntxWeightConfig | IntxWeightOnlyConfig:
        """The torchao PTQ config that prepare, convert and PTQ all derive from."""
        if self.scheme == "8da4w":
            return Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(self.group_size)
            )
        if self.scheme == "4w":
            return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size))
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))

    def embedding_config(self) -> IntxWeightOnlyConfig | None:
        """The torchao PTQ config of the token embedding (prepare, convert and PTQ derive from it), None for float."""
        if self.embedding == "none":
            return None
        weight_dtype = torch.int4 if self.embedding == "int4" else torch.int8
        return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=PerGroup(self.embedding_group_size))

    @property
    def needs_divisible_in_features(self) -> bool:
        return self.scheme != "8da8w"


def resolve_quantizer(section: Mapping | None) -> QuantScheme:
    """The YAML `quantizer:` section (qatune form or torchtune `_component_` form) -> a validated QuantScheme."""
    if section is None:
        return QuantScheme()
    if not isinstance(section, Mapping):
        raise ConfigError(f"quantizer must be a mapping like {{scheme: 8da4w, group_size: 32}}, not {section!r}")
    if hasattr(section, "_metadata"):  # an omegaconf DictConfig: plain containers, interpolations resolved
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    section = dict(section)
    if "_component_" not in section:
        unknown = sorted(set(section) - set(QATUNE_KEYS))
        if unknown:
            raise ConfigError(f"unknown quantizer key(s) {unknown}; accepted: {', '.join(QATUNE_KEYS)} or _component_")
        return QuantScheme(**section)

    path = section.pop("_component_")
    qatune_keys = [k for k in QATUNE_KEYS if k not in ("scheme", "group_size")]  # the legacy quantizer sets those
    qatune_kwargs = {k: section.pop(k) for k in qatune_keys if k in section}
    cls = _import_legacy_quantizer(path)
    try:
        legacy = cls(**section)
    except TypeError as e:
        raise ConfigError(f"bad arguments {sorted(section)} for quantizer {path}: {e}") from None
    # The int4 checkpoint is written by QATConfig's convert (see convert_to_int4), which holds exactly the legacy
    # numerics only with these defaults.
    for name, default in (
        ("padding_allowed", False),
        ("precision", torch.float32),
        ("scales_precision", torch.float32),
    ):
        if getattr(legacy, name) != default:
            raise ConfigError(
                f"quantizer {path} {name}={getattr(legacy, name)!r} is not supported; leave it at {default}"
            )
    return QuantScheme(scheme="8da4w", group_size=legacy.groupsize, legacy=legacy, **qatune_kwargs)


def _import_legacy_quantizer(path: object) -> type:
    accepted = ", ".join(LEGACY_QUANTIZERS)
    if not isinstance(path, str):
        raise ConfigError(f"quantizer _component_ must be a dotted class path, not {path!r}; accepted: {accepted}")
    if path in LEGACY_QUANTIZERS:
        return LEGACY_QUANTIZERS[path]
    cls = None
    if path.startswith("torchao."):  # import only torchao paths named in a config, never arbitrary modules
        module_name, _, attr = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, Int8DynActInt4WeightQATQuantizer):
        return cls
    raise ConfigError(
        f"quantizer _component_ {path!r} is not a supported torchao QAT quantizer; accepted: {accepted} "
        f"(or the qatune form: scheme: {' | '.join(SCHEMES)})"
    )


# ---------------------------------------------------------------------------------------------------------------
# Which layers get quantized


def _is_quantized_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def quantized_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers that are fake-quantized or hold quantized (torchao) weights."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantizedLinear) or (isinstance(m, nn.Linear) and _is_quantized_weight(m))
    ]


def float_linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers left in float (skipped, or in_features not divisible by the group size)."""
    quantized = set(quantized_linear_names(model))
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]


def _embeddings_to_quantize(model: nn.Module, q: QuantScheme) -> set[str]:
    """The nn.Embedding names `q` quantizes (none unless q.embedding; none matched by q.skip); one line if the group
    size does not divide their embedding_dim."""
    if q.embedding == "none":
        return set()
    chosen = {name: m for name, m in model.named_modules() if type(m) is nn.Embedding and not _skipped(name, q)}
    for name, m in chosen.items():
        if m.embedding_dim % q.embedding_group_size:
            raise ConfigError(
                f"quantizer embedding_group_size {q.embedding_group_size} does not divide {name}'s embedding_dim "
                f"{m.embedding_dim}; use one of {[g for g in GROUP_SIZES if m.embedding_dim % g == 0]}"
            )
    return set(chosen)


def check_quantizer_fits(q: QuantScheme, model_path: str | None) -> None:
    """`skip` patterns and embedding_group_size against the model's modules, built on the meta device from a local
    config.json (no weights read): before anything loads. A hub id not downloaded yet is checked at prepare."""
    from qatune.models import local_meta_model

    if (model := local_meta_model(model_path, "quantizer.skip and embedding_group_size against the model")) is not None:
        _check_skip_patterns(model, q)
        _embeddings_to_quantize(model, q)


def quantized_embedding_names(model: nn.Module) -> list[str]:
    """Names of the embeddings that are fake-quantized or hold quantized (torchao) weights."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantizedEmbedding) or (isinstance(m, nn.Embedding) and _is_quantized_weight(m))
    ]


def _check_skip_patterns(model: nn.Module, q: QuantScheme) -> None:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    embeddings = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    for pattern in q.skip:
        if not any(fnmatchcase(name, pattern) for name in [*linears, *embeddings]):
            raise ConfigError(
                f"quantizer skip pattern {pattern!r} matches no linear layer or embedding (names look like "
                f"{', '.join(linears[-3:])})"
            )


def _skipped(name: str, q: QuantScheme) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in q.skip)


def linears_to_quantize(model: nn.Module, q: QuantScheme) -> set[str]:
    """The nn.Linear names `q` quantizes; warns once about layers whose in_features the group size does not divide."""
    if quantized_linear_names(model):
        raise ConfigError("model is already fake-quantized or quantized; start from a float model")
    _check_skip_patterns(model, q)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = {name for name in linears if not _skipped(name, q)}
    if q.needs_divisible_in_features:
        odd = sorted(name for name in chosen if linears[name].in_features % q.group_size)
        if odd:
            # Warn, not fail: torchao's legacy quantizer skips these silently too, so both config forms build the same
            # model, and the report lists float layers. The count makes a mostly-float model hard to miss.
            warnings.warn(
                f"group_size {q.group_size} does not divide in_features of {len(odd)} of {len(chosen)} linear layers "
                f"(e.g. {odd[0]}: in_features={linears[odd[0]].in_features}); they stay float",
                stacklevel=3,
            )
            chosen -= set(odd)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# QAT prepare / enable / convert, and PTQ


def fake_quantize_(model: nn.Module, q: QuantScheme) -> nn.Module:
    """Insert fake quantization into every nn.Linear not matched by `q.skip` (lm_head included), in place.

    With `q.fused` (the default) the layers run qatune.fused_fake_quant's forward: the same numerics, bit for bit.
    """
    chosen = linears_to_quantize(model, q)
    if q.legacy is not None:
        q.legacy.prepare(model)
        for name, m in list(model.named_modules()):  # the legacy quantizer has no filter: undo the skipped layers
            if isinstance(m, FakeQuantizedLinear) and name not in chosen:
                model.set_submodule(name, m.to_linear())
    else:
        quantize_(model, _prepare_config(q), filter_fn=lambda m, name: name in chosen)
        if q.range_learning:
            _init_learned_scales(model)
    if q.fused:  # same modules and numerics, a faster forward/backward; torchao's own wherever it does not apply
        not_covered = fuse_fake_quant_(model)
        if not_covered:
            name, why = next(iter(not_covered.items()))
            logger.warning(
                "fused fake quant: %d of %d layers use torchao's own fake quant (e.g. %s: %s)",
                len(not_covered), len(chosen), name, why,
            )  # fmt: skip
        else:
            logger.info("fused fake quant: all %d fake-quantized layers", len(chosen))
    if embeddings := _embeddings_to_quantize(model, q):  # weight-only: torchao's own FakeQuantizedEmbedding
        prepare = QATConfig(q.embedding_config(), step="prepare")
        quantize_(model, prepare, filter_fn=lambda m, name: name in embeddings)
    if q.fake_quant_after_n_steps > 0:  # the model starts as float; the trainer switches fake quant on later
        enable_fake_quant(model, False)
    return model


def _prepare_config(q: QuantScheme) -> QATConfig:
    """QATConfig(base, "prepare"); with range learning, the same fake quant configs but static, learnable scales."""
    if not q.range_learning:
        return QATConfig(q.base_config(), step="prepare")
    from torchao.quantization.qat.fake_quantize_config import _infer_fake_quantize_configs

    activation, weight = _infer_fake_quantize_configs(q.base_config())
    weight.is_dynamic, weight.range_learning = False, True
    return QATConfig(activation_config=activation, weight_config=weight, step="prepare")


@torch.no_grad()
def _init_learned_scales(model: nn.Module) -> None:
    """Start each learned weight scale at the dynamic scale (what PTQ picks), as a Parameter the optimizer will see.

    torchao's initialize_fake_quantizers does this by running a forward on example inputs; the weight scales depend
    only on the weights, so calling each weight quantizer once is the same and needs no inputs.
    """
    for m in model.modules():
        if isinstance(m, FakeQuantizedLinear) and m.weight_fake_quantizer is not None:
            m.weight_fake_quantizer._initialized = True
            m.weight_fake_quantizer(m.weight)


def enable_fake_quant(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every fake quantizer (activations and weights) on or off, in place; off is exactly the float model."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear)]  # legacy QAT linears subclass it
    if not layers:
        raise ValueError("model has no fake-quantized layers; call fake_quantize_(model, q) first")
    for m in layers:
        enable_linear_fake_quant(m, enabled)
    for m in model.modules():
        if isinstance(m, FakeQuantizedEmbedding):  # torchao has no enable_embedding_fake_quant
            m.weight_fake_quantizer.enabled = enabled
    return model


def convert_to_int4(model: nn.Module, q: QuantScheme) -> nn.Module:
    """Fake-quantized model -> real quantized weights with exactly the trained numerics, in place (also for 8da8w).

    The legacy form converts through QATConfig too: its `.convert` swaps in Int8DynActInt4WeightLinear modules that
    no Hugging Face loader knows, while QATConfig(8da4w, group_size) gives the same logits bit for bit as torchao
    tensors that save_quantized can write and `from_pretrained` can read.
    """
    fake = [m for m in model.modules() if isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding)]
    if not fake:
        raise ValueError("model has no fake-quantized layers to convert; call fake_quantize_(model, q) first")
    if not all(m.weight_fake_quantizer is None or m.weight_fake_quantizer.enabled for m in fake):
        raise ValueError("fake quantization is switched off; call enable_fake_quant(model, True) before converting")
    embeddings = [m for m in fake if isinstance(m, FakeQuantizedEmbedding)]
    if embeddings and q.embedding_config() is None:
        raise ValueError("the embedding is fake-quantized but the scheme has embedding: none; pass the training scheme")
    quantize_(model, QATConfig(q.base_config(), step="convert"))
    if embeddings:  # quantize_'s default filter visits linears only
        convert = QATConfig(q.embedding_config(), step="convert")
        quantize_(model, convert, filter_fn=lambda m, name: isinstance(m, FakeQuantizedEmbedding))
    _mark_quantized(model, q)
    return model


def quantize_ptq_(model: nn.Module, q: QuantScheme) -> nn.Module:
    """Post-training quantization of a float model with the scheme's base config, honouring `q.skip`, in place."""
    chosen, embeddings = linears_to_quantize(model, q), _embeddings_to_quantize(model, q)
    quantize_(model, q.base_config(), filter_fn=lambda m, name: name in chosen)
    if embeddings:
        quantize_(model, q.embedding_config(), filter_fn=lambda m, name: name in embeddings)
    _mark_quantized(model, q)
    return model


# The PTQ grid of eval_perplexity, export and eleuther_eval when their config names none: qat_recipe's YAML's.
PTQ_QUANTIZER = {"scheme": "8da4w", "group_size": 32, "skip": ["lm_head"], "embedding": "none"}
PTQ_METHODS = ("rtn", "gptq")  # round to nearest (torchao's quantize_) | GPTQ (qatune.gptq), on the same grid


def check_ptq_method(method: object, key: str = "quantize") -> None:
    """null | rtn | gptq; a scheme name (the old spelling) is refused with the new one."""
    if method is None or method in PTQ_METHODS:
        return
    if method in SCHEMES:
        raise ConfigError(f"{key}={method}: the scheme is set by quantizer.scheme now; use {key}=rtn (or gptq) "
                          f"quantizer.scheme={method}")  # fmt: skip
    choices = " or ".join(PTQ_METHODS)
    raise ConfigError(f"{key}={method!r}: choose null (no PTQ) or {choices} (on the quantizer section's grid)")


def ptq_(model: nn.Module, q: QuantScheme, method: str = "rtn", calibration: torch.Tensor | None = None) -> nn.Module:
    """Post-training quantization by `method`, in place: the one PTQ rule of the recipe's rows, eval_perplexity and
    export (the quantizer section's scheme, group size, skip, embedding). GPTQ needs `calibration` ids."""
    if method == "rtn":
        return quantize_ptq_(model, q)
    if method == "gptq":
        from qatune.gptq import gptq_quantize_

        if calibration is None:
            raise ValueError("GPTQ needs calibration token ids (qatune.gptq.calibration_ids)")
        return gptq_quantize_(model, q, calibration.to(next(model.parameters()).device))
    raise ConfigError(f"PTQ method {method!r} is not one of {', '.join(PTQ_METHODS)}")


def _mark_quantized(model: nn.Module, q: QuantScheme) -> None:
    """Untie a quantized lm_head and record a TorchAoConfig, so the model describes itself to transformers."""
    config = getattr(model, "config", None)
    if config is None:  # a plain nn.Module: nothing to describe
        return
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = [m for m in (output, inputs) if m is not None]
    if getattr(config, "tie_word_embeddings", False) and any(_is_quantized_weight(m) for m in tables):
        # quantize_ gave the quantized one (lm_head, the embedding or both) its own int weight Parameter. Saying so
        # keeps transformers from re-tying them on save/load: that would drop an int lm_head, or, with an int
        # embedding and a float lm_head, fail in tie_weights (torchao's int tensors do not implement aten.equal).
        config.tie_word_embeddings = False
    # Name the float linears explicitly: with None transformers adds its default skips (lm_head) and would then
    # misread a quantized lm_head in the checkpoint.
    quant_type, embeddings = q.base_config(), quantized_embedding_names(model)
    if embeddings:  # the embedding's own config, so that config.json says what each table holds
        from torchao.quantization import FqnToConfig

        leaves = sorted({name.rsplit(".", 1)[-1] for name in quantized_linear_names(model)})
        linears = "re:(.*\\.)?(" + "|".join(leaves) + ")"  # torchao deprecates "_default"
        quant_type = FqnToConfig({**{name: q.embedding_config() for name in embeddings}, linears: quant_type})
    quantization_config = TorchAoConfig(
        quant_type=quant_type,
        modules_to_not_convert=float_linear_names(model),
        include_input_output_embeddings=bool(embeddings),
    )
    config.quantization_config = quantization_config
    model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)


def refuse_fake_quantized(model: nn.Module) -> None:
    if any(isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding) for m in model.modules()):
        raise ValueError("model is still fake-quantized (QAT prepare); convert it first: convert_to_int4(model, q)")


def quantized_scheme(model: nn.Module) -> str | None:
    """The torchao scheme of the model's linear weights ("8da4w", "4w", "8da8w", ...), or None for a float model."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    for m in model.modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, IntxUnpackedToInt8Tensor):
            bits = str(m.weight.target_dtype).removeprefix("torch.int")
            return f"8da{bits}w" if m.weight.activation_quantization is not None else f"{bits}w"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_quantized(model: nn.Module, tokenizer, output_dir: str | Path) -> Path:
    """Write a Hugging Face directory (config.json with a TorchAoConfig, model.safetensors, tokenizer), atomically.

    `AutoModelForCausalLM.from_pretrained(output_dir)` with only transformers + torchao installed loads it as the same
    quantized model: transformers 5.23 flattens torchao tensors into safetensors (torchao.prototype.safetensors).
    """
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    if any(isinstance(m, FakeQuantizedLinear | FakeQuantizedEmbedding) for m in model.modules()):
        raise ValueError("model is still fake-quantized; call convert_to_int4(model, q) before save_quantized")
    if getattr(getattr(model, "config", None), "quantization_config", None) is None or not quantized_linear_names(
        model
    ):
        raise ValueError("model is not quantized; call convert_to_int4 or quantize_ptq_ before save_quantized")
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(output_dir)
