"""The project's own error types. Their messages are one line meant for the user: the CLI prints `error: <message>`
and exits 2, without a traceback (`tune --debug` or QATUNE_DEBUG=1 shows it)."""


class ConfigError(ValueError):
    """A user error in a config or an override."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss became NaN/inf, replicas diverged)."""


def check_at_least(key: str, value: object, least: int, note: str = "") -> None:
    """An integer setting `key` must be >= `least` (bools are not integers here); `note` tells what else is accepted."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{key}={value!r}: give an integer >= {least}{note}")
