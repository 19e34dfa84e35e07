"""The project's own error types. Their messages are one line meant for the user: the CLI prints `error: <message>`
and exits 2, without a traceback (`tune --debug` or QATUNE_DEBUG=1 shows it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user error in a config or an override."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss became NaN/inf, replicas diverged)."""


def check_at_least(key: str, value: object, least: int, note: str = "") -> None:
    """An integer setting `key` must be >= `least` (bools are not integers here); `note` tells what else is accepted."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key}={value!r}: give an integer >= {least}{note}")


def is_positive_number(x: Any) -> bool:
    """A finite number > 0 (bools are not numbers here)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def on_rank0(fn: Callable[[], T]) -> T | None:
    """fn() on rank 0, None on the other ranks (fn() itself when not distributed). If fn fails on rank 0 its error is
    raised there and every other rank raises a one-line TrainingError, instead of waiting at the next collective
    until its timeout."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    result, failed = None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:
            failed = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
            dist.broadcast_object_list(failed, src=0)
            raise
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise TrainingError(f"rank 0 failed ({failed[0]}); every rank stops")
    return result
