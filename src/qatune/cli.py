"""The `tune` (alias `qatune`) command: ls | cp | validate | run | download.

    tune ls
    tune cp llama3_8b ./my.yaml
    tune validate ./my.yaml [key=value ...]
    tune run qat_recipe --config llama3_8b batch_size=4 optimizer.lr=1e-5
    tune download HuggingFaceTB/SmolLM2-135M-Instruct [--output-dir DIR]

User errors print one line `error: ...` and exit 2; set QATUNE_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from qatune import registry
from qatune.config import ConfigError, apply_overrides, load_yaml, validate

USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)


def load_recipe_config(recipe: str, config: str, overrides: list[str]) -> tuple[object, DictConfig]:
    """Recipe module and its validated config (overrides applied); loads no weights."""
    module = registry.load_recipe(recipe)
    cfg = apply_overrides(load_yaml(registry.find_config(config)), overrides)
    cfg = validate(cfg, getattr(module, "Config", None))
    if hasattr(module, "check_config"):  # recipe-specific checks, e.g. the quantizer section
        module.check_config(cfg)
    return module, cfg


def cmd_ls(args: argparse.Namespace) -> None:
    table = registry.list_recipes()
    width = max(len("RECIPE"), *(len(r) for r in table))
    print(f"{'RECIPE':<{width}}  CONFIG")
    for recipe, configs in table.items():
        for i, name in enumerate(configs or ["-"]):
            print(f"{recipe if i == 0 else '':<{width}}  {name}")


def cmd_cp(args: argparse.Namespace) -> None:
    try:
        src = registry.find_config(args.name)
    except ConfigError:
        src = registry.find_recipe(args.name)  # `tune cp qat_recipe ./my_recipe.py` copies a recipe
    dest = Path(args.destination)
    if dest.is_dir():
        dest = dest / src.name
    elif dest.suffix == "":
        dest = dest.with_suffix(src.suffix)
    if dest.exists() and not args.force:
        raise FileExistsError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    print(f"copied {src} to {dest}")


def cmd_validate(args: argparse.Namespace) -> None:
    path = registry.find_config(args.config)
    candidates = [args.recipe] if args.recipe else _recipes_for(args.config, path)
    errors = []
    for recipe in candidates:
        try:
            load_recipe_config(recipe, str(path), args.overrides)
        except ConfigError as e:
            errors.append((recipe, e))
            continue
        print(f"config is valid for recipe {recipe}: {path}")
        return
    recipe, err = errors[0]
    raise ConfigError(f"{path} is not a valid {recipe} config: {err}")


def _recipes_for(name: str, path: Path) -> list[str]:
    """Which recipe to validate against: the owner of a shipped config, else every recipe in turn."""
    owner = registry.config_recipe(name) or registry.config_recipe(path.stem)
    others = [r for r in registry.list_recipes() if r != owner]
    return [owner, *others] if owner else others


def cmd_run(args: argparse.Namespace) -> None:
    module, cfg = load_recipe_config(args.recipe, args.config, args.overrides)
    module.main(cfg)


def cmd_download(args: argparse.Namespace) -> None:
    from qatune.models import download

    path = download(args.repo_id, args.output_dir)
    print(f"downloaded {args.repo_id} to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune", description="qatune: quantization-aware fine-tuning to int4")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("ls", help="list recipes and the configs each ships with").set_defaults(fn=cmd_ls)

    p = sub.add_parser("cp", help="copy a shipped config (or recipe) to customise it")
    p.add_argument("name")
    p.add_argument("destination")
    p.add_argument("--force", action="store_true", help="overwrite the destination")
    p.set_defaults(fn=cmd_cp)

    p = sub.add_parser("validate", help="check a config without loading weights")
    p.add_argument("config", help="config name or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value, ~key")
    p.add_argument("--recipe", help="recipe to validate against (default: the config's own, else any)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("run", help="run a recipe with a config")
    p.add_argument("recipe", help="recipe name or path/to/recipe.py")
    p.add_argument("--config", required=True, help="config name or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="key=value, +key=value, ~key")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("download", help="download a Hugging Face checkpoint to a local directory")
    p.add_argument("repo_id")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir")
    p.set_defaults(fn=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        if os.environ.get("QATUNE_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
