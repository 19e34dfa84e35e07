"""Atomic writes: a file or a directory appears whole or not at all (write to a temp name, then rename)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qatune.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside `path`; on success it becomes `path`, on error it is deleted.

    The file gets the permissions a plain open() would give (mkstemp's are owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path` (an old one is removed), on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's is owner-only
        for f in tmp.rglob("*"):  # and so are files some writers make (safetensors): a served dir must be readable
            if f.is_file():
                os.chmod(f, 0o666 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(path: str | Path) -> None:
    """One-line errors, before anything loads, for an output directory that cannot be made or written: a file, a
    path through a file, or a directory this user may not write."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(path)!r} is a file; give a directory (it is created if missing)")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output_dir {str(path)!r}: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {str(path)!r}: {str(existing)!r} is not writable by this user")


def previous_run(output_dir: str | Path, patterns: tuple[str, ...]) -> list[Path]:
    """What a previous run left in `output_dir`: the entries matching `patterns` (glob patterns, e.g. "int4")."""
    out = Path(output_dir).expanduser()
    if not out.is_dir():
        return []
    return sorted({p for pattern in patterns for p in out.glob(pattern)})


def check_previous_run(output_dir: str | Path, patterns: tuple[str, ...], overwrite: bool, resume: bool) -> None:
    """A run does not silently replace another's results: refused unless `overwrite` (start over) or `resume`."""
    if overwrite and resume:
        raise ConfigError("overwrite=true and resume=true contradict: overwrite starts over, resume continues")
    found = previous_run(output_dir, patterns)
    if found and not (overwrite or resume):
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ConfigError(
            f"output_dir {str(output_dir)!r} holds a previous run ({names}); pass overwrite=true to replace it, "
            "resume=true to continue its checkpoints, or choose another output_dir"
        )


def remove_previous_run(output_dir: str | Path, patterns: tuple[str, ...]) -> None:
    """overwrite=true: remove what a previous run wrote, so that nothing of it is left beside the new run's files."""
    for p in previous_run(output_dir, patterns):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
