"""Errors that name what is wrong and how to fix it.

Every project error derives from `HamjaxError`, so a launcher can print it as one clear message
instead of a traceback: the message already says what to do.
"""

from __future__ import annotations


class HamjaxError(Exception):
    """Base of the errors a user fixes (config, data, checkpoints, the workdir, the run)."""


class ConfigError(HamjaxError, ValueError):
    """A config value is invalid; the message names the field and the fix."""


class CheckpointError(HamjaxError, RuntimeError):
    """A checkpoint is missing, corrupt or incompatible with the config."""


class TrainingDivergedError(HamjaxError, RuntimeError):
    """A step gave a non-finite loss, gradient or weights; nothing from it was saved."""


class WorkdirLockedError(HamjaxError, RuntimeError):
    """Another live run holds the workdir; two runs writing one workdir would corrupt it."""


class TrainingInterrupted(HamjaxError):
    """SIGTERM or SIGINT stopped the run after a step and a checkpoint; rerunning resumes.

    `exit_code` is the shell's convention for death by that signal (143 SIGTERM, 130 SIGINT),
    so schedulers and scripts still see an interrupted run, not a failure or a success.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)
