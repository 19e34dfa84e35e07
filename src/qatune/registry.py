"""Where recipes and configs live: `recipes/NAME.py` and `configs/NAME/CONFIG.yaml`.

Both folders sit at the top of the repository and ship inside the wheel as the packages `qatune.recipes` and
`qatune.configs`, so the same lookup works from a source checkout, an editable install and a wheel.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.resources import files
from pathlib import Path
from types import ModuleType

from qatune.config import ConfigError, _closest


def recipes_dir() -> Path:
    return Path(str(files("qatune.recipes")))


def configs_dir() -> Path:
    return Path(str(files("qatune.configs")))


def list_recipes() -> dict[str, list[str]]:
    """recipe name -> names of the configs it ships with."""
    table = {}
    for path in sorted(recipes_dir().glob("*.py")):
        if path.stem.startswith("_"):
            continue
        cfg_dir = configs_dir() / path.stem
        table[path.stem] = sorted(p.stem for p in cfg_dir.glob("*.yaml")) if cfg_dir.is_dir() else []
    return table


def config_recipe(name: str) -> str | None:
    """The recipe a shipped config belongs to."""
    for recipe, configs in list_recipes().items():
        if name in configs:
            return recipe
    return None


def find_config(name_or_path: str) -> Path:
    """A shipped config by name (`llama3_8b`, or `qat_recipe/llama3_8b`), or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    if "/" in name_or_path:
        candidate = configs_dir() / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    recipe = config_recipe(name_or_path)
    if recipe is None:
        names = [c for cs in list_recipes().values() for c in cs]
        raise ConfigError(f"no config named {name_or_path!r}{_closest(name_or_path, names)}; see `tune ls`")
    return configs_dir() / recipe / f"{name_or_path}.yaml"


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path!r} does not exist")
        return path
    candidate = recipes_dir() / f"{name_or_path}.py"
    if not candidate.is_file():
        raise ConfigError(f"no recipe named {name_or_path!r}{_closest(name_or_path, list_recipes())}; see `tune ls`")
    return candidate


def load_recipe(name_or_path: str) -> ModuleType:
    """Import a recipe file as a module; it must define `main(cfg)` (and `Config`, its schema)."""
    path = find_recipe(name_or_path)
    module_name = f"qatune_recipe_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses need their module registered
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise ConfigError(f"recipe {str(path)!r} has no main(cfg) function")
    return module
