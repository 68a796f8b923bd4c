"""Errors that name what is wrong and how to fix it."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incompatible with the config."""
