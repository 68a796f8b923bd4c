"""Errors that name what is wrong and how to fix it.

Every project error derives from `HamjaxError`, so a launcher can print it as one clear message
instead of a traceback: the message already says what to do.
"""

from __future__ import annotations

import errno
import os


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


class DiskFullError(HamjaxError, OSError):
    """A write into the workdir failed for lack of space or quota; the message names the path."""


_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXTS = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is ENOSPC/EDQUOT: as an OSError's errno,
    or only as text (tensorstore and orbax's background writers re-raise it as other types)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    """The one-line error for a full disk while writing `path`: what failed and what to do."""
    return DiskFullError(
        f"no space left writing {os.fspath(path)} ({err}); free space on that disk (or use a "
        "--workdir on another one) and rerun the same command: it resumes from the last "
        "complete checkpoint, if one was written"
    )
