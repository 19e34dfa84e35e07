"""YAML configs: load, override (`key=value`, `+key=value`, `~key`), validate against a recipe's schema, instantiate.

A config is OmegaConf YAML. Sections with a `_component_` key name a Python callable (dotted path) and its keyword
arguments, as in torchtune. Every recipe declares its keys as a dataclass (`Config`); a config is valid when it merges
into that dataclass (no unknown key, no bad type), every `_component_` imports, and every component keyword is one of
the callable's parameters. All of this runs before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qatune.errors import ConfigError

COMPONENT = "_component_"


def _closest(name: str, candidates: Iterable[str], fallback: Iterable[str] | None = None) -> str:
    """' (did you mean a, b?)', else the valid names (`fallback`, e.g. the keys at that level, when given)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    valid = sorted(candidates if fallback is None else fallback)
    return f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(valid)})"


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        empty = yaml.safe_load(path.read_text(errors="replace")) is None
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if empty:
        hint = f"start from a shipped one: tune cp smollm2_135m {path}"
        raise ConfigError(f"{path}: the config is empty (no keys); {hint}")
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got a {type(cfg).__name__}")
    return cfg


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string; users mean a float
        try:
            return float(value)
        except ValueError:
            pass
    return value


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply command-line overrides in place.

    `a.b=v` sets an existing key (or a keyword of a `_component_` section that its callable accepts);
    `+a.b=v` adds a new key; `~a.b` deletes one. Values are parsed as YAML (`1e-5`, `[a, b]`, `null`, `true`).
    """
    for item in overrides:
        if item.startswith("~"):
            key = item[1:]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node:
                top = [str(k) for k in cfg.keys()]
                raise ConfigError(f"cannot delete {key!r}: no such key{_closest(key, _all_keys(cfg), fallback=top)}")
            try:
                del node[leaf]
            except OmegaConfBaseException:  # a key of the recipe's schema: it always exists, with a default
                raise ConfigError(
                    f"cannot delete {key!r}: the recipe always has this key; set it instead ({key}=...)"
                ) from None
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value, +key=value or ~key")
        key, _, raw = item.partition("=")
        add = key.startswith("+")
        key = key.lstrip("+")
        if not key or any(not part.isidentifier() for part in key.split(".")):
            raise ConfigError(f"override {item!r}: {key!r} is not a valid dotted key")
        if not add and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not (isinstance(node, DictConfig) and COMPONENT in node and _accepts(node[COMPONENT], leaf)):
                level = (
                    [f"{parent}.{k}" if parent else str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
                )
                hint = _closest(key, _all_keys(cfg), fallback=level)
                raise ConfigError(f"unknown config key {key!r}{hint}; use +{key}=... to add a new key")
        parent = key.rpartition(".")[0]
        if parent and OmegaConf.select(cfg, parent, default=_MISSING) is None:
            raise ConfigError(f"override {item!r}: {parent} is null in this config; a config that sets the section "
                              f"is needed (e.g. a *_lora config for lora)")  # fmt: skip
        try:
            value = _parse_value(raw)
            # Lists replace the old list; merge=True lets a typed list (of dataclasses) convert its items.
            OmegaConf.update(cfg, key, value, merge=isinstance(value, list), force_add=True)
        except OmegaConfBaseException as e:  # a structured (schema-typed) config checks the value's type here
            raise ConfigError(f"override {item!r}: {_one_line(e)}") from None
    return cfg


_MISSING = object()


def _all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys += _all_keys(cfg._get_node(k), f"{full}.")
    return keys


def import_component(path: str) -> Any:
    """Import `package.module.attr` (attr may be nested: `module.Class.method`)."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"_component_ {path!r} is not a dotted path like torch.optim.AdamW")
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(f"_component_ {path!r}: {attr!r} not found{_closest(attr, names)}") from None
        return obj
    raise ConfigError(f"_component_ {path!r}: no importable module in it")


def _accepts(component: str, name: str) -> bool:
    params = _parameters(import_component(component))
    return params is None or name in params


def _parameters(fn: Any) -> set[str] | None:
    """Keyword names `fn` accepts, or None when it takes **kwargs (anything goes)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_components(cfg: Any, where: str = "") -> None:
    """Every `_component_` imports and every keyword beside it is a parameter of the callable."""
    if isinstance(cfg, DictConfig) and cfg._is_none():  # a section set to null (e.g. lr_scheduler: null)
        return
    if isinstance(cfg, DictConfig):
        if COMPONENT in cfg:
            params = _parameters(import_component(cfg[COMPONENT]))
            for k in cfg.keys():
                if k != COMPONENT and params is not None and k not in params:
                    raise ConfigError(f"{where}{k}: not a parameter of {cfg[COMPONENT]}{_closest(str(k), params)}")
        for k in cfg.keys():
            check_components(cfg._get_node(k), f"{where}{k}.")
    elif isinstance(cfg, ListConfig):
        for i, v in enumerate(cfg):
            check_components(v, f"{where}{i}.")


def validate(cfg: DictConfig, schema: type | None, resolve: bool = True) -> DictConfig:
    """Merge `cfg` into the recipe's dataclass `schema`; resolve interpolations; check components.

    Returns the merged config (schema defaults filled in). Raises ConfigError with one line. With resolve=False,
    interpolations stay as they are (overrides applied afterwards still reach the keys that refer to them).
    """
    if schema is not None:
        base = OmegaConf.structured(schema)
        try:
            cfg = OmegaConf.merge(base, cfg)
        except OmegaConfBaseException as e:
            raise ConfigError(_describe_merge_error(e, base)) from None
    if not resolve:
        return cfg
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad interpolation: {_one_line(e)}") from None
    check_components(cfg)
    return cfg


def _one_line(e: Exception) -> str:
    # OmegaConf messages carry a multi-line "full_key: ... object_type=..." trailer: keep the first line.
    return str(e).strip().splitlines()[0]


def _describe_merge_error(e: OmegaConfBaseException, base: DictConfig) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = _one_line(e)
    if "Key" in msg and "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(base, parent) if parent else base
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        return f"unknown config key {key!r}{_closest(leaf, known)}"
    return f"config key {key!r}: {msg}" if key else msg


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def instantiate(node: Mapping | DictConfig, *args: Any, **kwargs: Any) -> Any:
    """Call `node._component_` with the node's other keys (nested components instantiated first) and `kwargs`."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping) or COMPONENT not in node:
        raise ConfigError(f"cannot instantiate {node!r}: it has no {COMPONENT}")
    fn = import_component(node[COMPONENT])
    params = {k: _instantiate_nested(v) for k, v in node.items() if k != COMPONENT}
    params.update(kwargs)
    return fn(*args, **params)


def _instantiate_nested(value: Any) -> Any:
    if isinstance(value, Mapping) and COMPONENT in value:
        return instantiate(value)
    if isinstance(value, list):
        return [_instantiate_nested(v) for v in value]
    return value


def schema_keys(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]
