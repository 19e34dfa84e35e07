"""The project's own error types. Their messages are one line meant for the user: the CLI prints `error: <message>`
and exits 2, without a traceback (QATUNE_DEBUG=1 shows it)."""


class ConfigError(ValueError):
    """A user error in a config or an override."""


class TrainingError(RuntimeError):
    """Training cannot go on (the loss became NaN/inf, replicas diverged)."""
