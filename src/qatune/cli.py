"""The `tune` (alias `qatune`) command: ls | cp | validate | run | download | estimate.

    tune ls
    tune cp llama3_8b ./my.yaml
    tune validate ./my.yaml [key=value ...]
    tune run qat_recipe --config llama3_8b batch_size=4 optimizer.lr=1e-5
    tune download HuggingFaceTB/SmolLM2-135M-Instruct [--output-dir DIR]
    tune run --nproc_per_node 8 qat_recipe --config llama3_8b     # DDP/FSDP2 through torchrun + accelerate
    tune estimate --config llama3_8b --nproc_per_node 8          # memory plan, no weights loaded

User errors (the project's ConfigError / TrainingError) print one line `error: ...` and exit 2; `tune --debug ...` or
QATUNE_DEBUG=1 shows their traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig

from qatune import registry
from qatune.config import apply_overrides, load_yaml, validate
from qatune.errors import ConfigError, TrainingError
from qatune.models import NOT_CHECKED

USER_ERRORS = (ConfigError, TrainingError)  # raised with a message meant for the user; anything else is a bug


def load_recipe_config(recipe: str, config: str, overrides: list[str]) -> tuple[object, DictConfig]:
    """Recipe module and its validated config (overrides applied); loads no weights."""
    module = registry.load_recipe(recipe)
    schema = getattr(module, "Config", None)
    # Schema first, so that every key the recipe knows can be overridden, even one the YAML leaves out.
    cfg = validate(load_yaml(registry.find_config(config)), schema, resolve=False)
    cfg = validate(apply_overrides(cfg, overrides), schema)
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
    if args.name in registry.list_recipes() or args.name.endswith(".py"):
        src = registry.find_recipe(args.name)  # `tune cp qat_recipe ./my_recipe.py` copies a recipe
    else:
        src = registry.find_config(args.name)
    dest = Path(args.destination)
    if dest.is_dir():
        dest = dest / src.name
    elif dest.suffix == "":
        dest = dest.with_suffix(src.suffix)
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    print(f"copied {src} to {dest}")


def cmd_validate(args: argparse.Namespace) -> None:
    path = registry.find_config(args.config)
    NOT_CHECKED.clear()
    candidates = [args.recipe] if args.recipe else _recipes_for(args.config, path)
    errors = []
    for recipe in candidates:
        try:
            load_recipe_config(recipe, str(path), args.overrides)
        except ConfigError as e:
            errors.append((recipe, e))
            continue
        print(f"config is valid for recipe {recipe}: {path}")
        for checks in dict.fromkeys(NOT_CHECKED):  # tune run does them once the model is there
            print(f"not checked: {checks}; `tune download <model.path>` first, then validate checks it too")
        return
    recipe, err = errors[0]
    raise ConfigError(f"{path} is not a valid {recipe} config: {err}")


def _recipes_for(name: str, path: Path) -> list[str]:
    """Which recipes to validate against: the owner of a shipped config, else every recipe, the one whose
    schema shares the most top-level keys with the file first (its error is the one worth showing)."""
    owner = registry.config_recipe(name) or registry.config_recipe(path.stem)
    if owner:
        return [owner]
    keys = set(load_yaml(path).keys())

    def overlap(recipe: str) -> int:
        schema = getattr(registry.load_recipe(recipe), "Config", None)
        return len(keys & set(schema.__dataclass_fields__)) if schema else 0

    return sorted(registry.list_recipes(), key=overlap, reverse=True)


def check_launch(args: argparse.Namespace) -> None:
    for flag in ("nproc_per_node", "nnodes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: give a count >= 1")


def load_run_config(recipe: str, config: str, overrides: list[str]) -> tuple[object, DictConfig]:
    """load_recipe_config, and when the config is another recipe's, an error that names that recipe."""
    path = registry.find_config(config)
    owner = registry.config_recipe(config) or registry.config_recipe(path.stem)
    if owner and recipe in registry.list_recipes() and owner != recipe:
        raise ConfigError(f"config {config!r} is a {owner} config: tune run {owner} --config {config}")
    try:
        return load_recipe_config(recipe, config, overrides)
    except ConfigError as err:
        for other in registry.list_recipes():
            if other != recipe and owner is None and _valid_for(other, config, overrides):
                hint = f"{config} is a valid {other} config: tune run {other} --config {config}"
                raise ConfigError(f"{err} ({hint})") from None
        raise


def _valid_for(recipe: str, config: str, overrides: list[str]) -> bool:
    try:
        load_recipe_config(recipe, config, overrides)
    except ConfigError:
        return False
    return True


def cmd_run(args: argparse.Namespace) -> None:
    check_launch(args)
    module, cfg = load_run_config(args.recipe, args.config, args.overrides)  # fail fast, before any launch
    if args.dry_run:
        return cmd_estimate(args, cfg)
    launched = "LOCAL_RANK" in os.environ  # already a worker of torchrun / accelerate launch
    if (args.nproc_per_node > 1 or args.nnodes > 1) and not launched:
        return launch(args)
    module.main(cfg)


def launch(args: argparse.Namespace) -> None:
    """Start nproc_per_node x nnodes workers with torchrun; each runs this same `tune run` (accelerate inside)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    flags = ["--nproc_per_node", str(args.nproc_per_node), "--nnodes", str(args.nnodes)]
    if args.rdzv_endpoint:
        flags += ["--rdzv_backend", "c10d", "--rdzv_endpoint", args.rdzv_endpoint]
    elif args.nnodes == 1:
        flags += ["--standalone"]
    else:
        raise ConfigError(f"--nnodes {args.nnodes} needs --rdzv_endpoint host:port (the rank-0 node's address)")
    print(f"launching world size {args.nproc_per_node * args.nnodes} ({args.nnodes} node(s) x {args.nproc_per_node})")
    try:
        torchrun([*flags, "-m", "qatune.cli", "run", args.recipe, "--config", args.config, *args.overrides])
    except ChildFailedError as e:  # each worker printed its own one-line error above; torchrun's summary is a page
        codes = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(e.failures.items()))
        raise SystemExit(f"error: workers failed ({codes}); each worker's error is above") from None


def cmd_estimate(args: argparse.Namespace, cfg: DictConfig | None = None) -> None:
    from qatune.planner import estimate_from_config, format_plan

    check_launch(args)
    if cfg is None:
        _, cfg = load_recipe_config(args.recipe, args.config, args.overrides)
    gpus = args.nproc_per_node * args.nnodes
    print(format_plan(estimate_from_config(cfg, num_gpus=gpus)))


def cmd_download(args: argparse.Namespace) -> None:
    from qatune.models import download

    path = download(args.repo_id, args.output_dir, revision=args.revision)
    print(f"downloaded {args.repo_id} to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tune", description="qatune: quantization-aware fine-tuning to int4")
    parser.add_argument("--debug", action="store_true", help="show the traceback of one-line errors too")
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
    _launcher_flags(p)
    p.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="print the memory plan (tune estimate) instead of running; loads no weights",
    )
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("estimate", help="memory plan of a recipe config on N GPUs, without loading weights")
    p.add_argument("--recipe", default="qat_recipe")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value, +key=value, ~key")
    _launcher_flags(p)
    p.set_defaults(fn=cmd_estimate)

    p = sub.add_parser("download", help="download a Hugging Face checkpoint to a local directory")
    p.add_argument("repo_id")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir")
    p.add_argument("--revision", help="branch, tag or commit on the hub")
    p.set_defaults(fn=cmd_download)
    return parser


def _launcher_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--rdzv_endpoint", "--rdzv-endpoint", help="host:port of the rank-0 node (multi-node)")


def quiet_library_noise() -> None:
    """torchao logs that its CUDA-only kernels are missing (expected on CPU) and torch warns about torchao's enums
    on every import: noise a user can do nothing about. Real warnings stay on."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is an Enum subclass and is now natively supported.*")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_library_noise()
    parser = build_parser()
    # Overrides may come before or after --config; argparse leaves the later ones over, so collect them here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") and not a.startswith("~")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        args.fn(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("QATUNE_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
