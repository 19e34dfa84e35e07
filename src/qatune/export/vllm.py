"""vLLM: a compressed-tensors checkpoint holding the converted model's int4 codes and scales exactly.

vLLM cannot load torchao's tensors ("Not supported args for copy_ due to metadata mismatch: IntxUnpackedToInt8Tensor").
It does load compressed-tensors, the format its own quantization tooling writes, and runs it with its int4 kernels:

  w4a16  format pack-quantized. Per linear: `weight_packed` int32 [out, in / 8] (code + 8, eight per int32 along the
         input dim, packed by compressed-tensors' own `pack_to_int32`), `weight_scale` [out, in / group] and
         `weight_shape`. Kernels: Marlin (groups 32/64/128, any GPU from sm75), Machete (64/128, sm90), CPUWNA16 on
         CPUs. Both schemes: for 8da4w the weights are exact and the activations run in bf16, not int8.
  w4a8   8da4w only; format int-quantized: `weight` int8 [out, in] holding the int4 codes, `weight_scale`, and int8
         dynamic per-token activations in the config (vLLM's CompressedTensorsW4A8Int). On x86 and Arm CPUs vLLM
         picks Dynamic4bitLinearKernel, which quantizes activations to int8; on CUDA it picks a W4A16 kernel
         (Marlin/Machete), so activations stay bf16 there.

Nothing is re-quantized: the only change from the torchao model is rounding the scales (and the float layers) to the
serving dtype, as the GGUF export rounds its scales to fp16. The float layers (quantizer.skip, the embedding, a tied
lm_head) are written in that dtype and listed in `ignore`. A quantized embedding (quantizer.embedding) is written as
its values, code x scale, in that dtype: vLLM gives its embedding layers no quantization method (compressed-tensors'
integration quantizes Linear layers only), so the vLLM directory keeps a full-size embedding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from qatune.errors import ConfigError
from qatune.files import atomic_dir
from qatune.quantization import (
    quantized_embedding_names,
    quantized_linear_names,
    quantized_scheme,
    refuse_fake_quantized,
)

VLLM_SCHEMES = ("w4a16", "w4a8")
# vLLM's int4 kernels: Marlin takes groups of 32, 64 and 128, Machete 64 and 128; nothing runs 256.
VLLM_GROUP_SIZES = (32, 64, 128)
# vLLM fuses these projections into one layer, whose parts must share one quantization scheme.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def check_vllm_scheme(vllm_scheme: str) -> None:
    if vllm_scheme not in VLLM_SCHEMES:
        raise ConfigError(f"vllm_scheme={vllm_scheme!r}: choose one of {', '.join(VLLM_SCHEMES)}")


def check_vllm_export(scheme: str, group_size: int, vllm_scheme: str = "w4a16") -> None:
    """One-line errors, before any weights load, for what vLLM cannot serve."""
    check_vllm_scheme(vllm_scheme)
    if scheme not in ("8da4w", "4w"):
        raise ConfigError(f"export format vllm: quantizer scheme {scheme} is not exported to vLLM; use 8da4w or 4w")
    if vllm_scheme == "w4a8" and scheme != "8da4w":
        raise ConfigError(f"vllm_scheme=w4a8 needs int8 activations, quantizer scheme 8da4w (got {scheme}); use w4a16")
    if group_size not in VLLM_GROUP_SIZES:
        raise ConfigError(
            f"export format vllm: quantizer group_size {group_size} has no vLLM int4 kernel (Marlin takes 32, 64, 128; "
            f"Machete 64, 128); use group_size {', '.join(map(str, VLLM_GROUP_SIZES))}"
        )


def _int4_codes_and_scale(weight: torch.Tensor, name: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4 codes as int8 [n, k], group scales [n, k / group]) of a torchao int4 weight."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if not isinstance(weight, IntxUnpackedToInt8Tensor) or weight.target_dtype != torch.int4:
        raise ConfigError(f"{name}: {type(weight).__name__} is not a torchao int4 weight (schemes 8da4w and 4w)")
    if weight.qdata.ndim != 2 or tuple(weight.block_size) != (1, group):
        raise ConfigError(f"{name}: block size {tuple(weight.block_size)}; the export takes (1, {group}) throughout")
    if torch.any(weight.zero_point != 0):
        raise ConfigError(f"{name}: asymmetric int4 (non-zero zero points); vLLM's export takes symmetric weights")
    return weight.qdata, weight.scale


def _check_fused_layers(quantized: set[str], linears: list[str]) -> None:
    """vLLM loads q/k/v (and gate/up) into one fused layer with one scheme: they must be all int4 or all float."""
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for parts in FUSED_PROJECTIONS:
            siblings = [f"{parent}.{p}" for p in parts if f"{parent}.{p}" in linears] if leaf == parts[0] else []
            if len({s in quantized for s in siblings}) > 1:
                raise ConfigError(
                    f"{', '.join(siblings)}: vLLM runs these as one fused layer, so they must be all int4 or all "
                    "float; quantizer.skip keeps only some of them float"
                )


def quantization_config(group_size: int, vllm_scheme: str, ignore: list[str], targets: list[str]) -> dict:
    """The `quantization_config` entry of config.json, built from compressed-tensors' own models."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    activations = None
    if vllm_scheme == "w4a8":  # torchao's 8da4w: asymmetric int8 per token, computed at run time
        activations = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=targets, weights=weights, input_activations=activations)},
        format="pack-quantized" if vllm_scheme == "w4a16" else "int-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        **config.model_dump(exclude={"quant_method"}, exclude_none=True),
    }


def export_vllm(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    *,
    vllm_scheme: str = "w4a16",
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a converted (torchao int4) model as a compressed-tensors directory that `vllm serve <dir>` loads.

    The int4 codes are copied as they are; scales and float tensors are cast to `dtype` (vLLM's serving dtype).
    Writes atomically (a temp directory, then rename); returns the directory.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    refuse_fake_quantized(model)
    scheme = quantized_scheme(model)
    if scheme is None:
        raise ConfigError("model has no int4 weights: convert it first (convert_to_int4 after QAT, or quantize_ptq_)")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized, embeddings = set(quantized_linear_names(model)), set(quantized_embedding_names(model))
    _check_fused_layers(quantized, linears)
    first = model.get_submodule(sorted(quantized)[0]).weight
    group = first.block_size[-1] if first.qdata.ndim == 2 else 0
    check_vllm_export(scheme, group, vllm_scheme)
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        if tied and name == "lm_head.weight":
            continue  # vLLM ties it to the embedding, as config.json says
        if module_name in quantized and leaf == "weight":
            codes, scale = _int4_codes_and_scale(tensor, module_name, group)
            if vllm_scheme == "w4a16":
                tensors[f"{module_name}.weight_packed"] = pack_to_int32(codes.contiguous(), 4)
                tensors[f"{module_name}.weight_shape"] = torch.tensor(codes.shape)
            else:
                tensors[f"{module_name}.weight"] = codes.contiguous()
            tensors[f"{module_name}.weight_scale"] = scale.to(dtype).contiguous()
        else:  # a quantized embedding too, as code x scale: vLLM's embedding layers take no quantization method
            tensors[name] = (
                (tensor.dequantize() if module_name in embeddings else tensor).detach().to(dtype).contiguous()
            )

    ignore = [name for name in linears if name not in quantized]
    targets = ["Linear"] + (["lm_head"] if "lm_head" in quantized else [])  # vLLM's LM head is no Linear subclass
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config_dict["quantization_config"] = quantization_config(group, vllm_scheme, ignore, targets)
    with atomic_dir(output_dir) as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)  # chat template included
    return Path(output_dir)


def decompressed_weights(vllm_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The directory's tensors with every int4 layer turned back into `code × scale` by compressed-tensors' own
    decompressor (in the scale dtype): what a vLLM checkpoint means, read by the library vLLM uses."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from safetensors.torch import load_file

    vllm_dir = Path(vllm_dir)
    qconfig = json.loads((vllm_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig)
    (scheme,) = parsed.config_groups.values()
    tensors = load_file(str(vllm_dir / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":
            local = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == module_name}
            out[f"{module_name}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        elif leaf == "weight" and tensor.dtype == torch.int8:  # int-quantized (w4a8): int8 codes beside the scale
            scale = tensors[f"{module_name}.weight_scale"]
            out[name] = dequantize(x_q=tensor, scale=scale, args=scheme.weights)
        elif leaf not in ("weight_scale", "weight_shape"):
            out[name] = tensor
    return out


def dequantized_model(vllm_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain float transformers model holding `decompressed_weights(vllm_dir)` in `dtype`: the export's float twin,
    to compare vLLM with eager PyTorch on the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(vllm_dir)
    del config.quantization_config  # a plain float model of the same shape
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(decompressed_weights(vllm_dir), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{vllm_dir}: tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
