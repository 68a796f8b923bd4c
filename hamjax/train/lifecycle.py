"""A run's lifecycle around the epoch loop: stopping on SIGTERM/SIGINT (the processes of a
multi-host run agreeing on one step) and refusing a diverged step, each ending in one message.

The workdir lock (`hamjax.workdir_lock`) is taken by the Trainer before anything touches the
workdir; what is here decides when a run ends early and says why and how to go on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from hamjax.errors import TrainingDivergedError, TrainingInterrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM/SIGINT as a flag the loop reads after each step, and the stop all processes
    agree on. received: the signal this process got; agreed: the one every process stops for."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.agreed: int | None = None

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """SIGTERM/SIGINT only set a flag, read after each step (a handler interrupting a step
        or a checkpoint write could leave either half done); a second one acts at once, as the
        previous handler would. Previous handlers come back on exit. Signals that were ignored
        stay ignored; off the main thread (where Python allows no handlers) nothing is caught."""
        self.received = self.agreed = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def handler(signum, frame):
            if self.received is None:
                self.received = signum
                return
            before = previous[signum]
            if callable(before):
                before(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        for s, before in previous.items():
            if before is not signal.SIG_IGN:
                signal.signal(s, handler)
        try:
            yield
        finally:
            for s, before in previous.items():
                signal.signal(s, before if before is not None else signal.SIG_DFL)

    def should_stop(self) -> bool:
        """Whether the run stops here. One process: whether it got a signal. Several: whether
        any of them did, gathered from all (a collective, so it is asked at the same steps on
        every process): a signal that reached one host, or reached the hosts at different
        steps, stops them all at one step, with one checkpoint. Each deciding alone, one host
        would save and leave while the others wait in its collectives."""
        if self.agreed is not None:
            return True
        if jax.process_count() == 1:
            self.agreed = self.received
        else:
            from jax.experimental import multihost_utils

            signums = multihost_utils.process_allgather(np.int32(self.received or 0))
            self.agreed = int(np.max(signums)) or None
        return self.agreed is not None

    def name(self) -> str:
        """The agreed signal's name, saying so when another process received it."""
        name = signal.Signals(self.agreed).name
        if self.agreed != self.received:
            name += " (sent to another process of this run)"
        return name


def interrupted(signals: StopSignals, step: int, saved: int | None,
                checkpoints: Any) -> TrainingInterrupted:
    """The error ending a stopped run once its state is saved: one line saying how to resume.
    saved: the latest saved step (None: nothing saved); checkpoints: where they are."""
    name = signals.name()
    if saved is None:
        message = (f"stopped by {name} before the first step; nothing to save; rerun the same "
                   "command to start")
    else:
        message = (f"stopped by {name} at step {step}; checkpoint saved in {checkpoints}; rerun "
                   "the same command to resume")
    return TrainingInterrupted(message, signals.agreed)


def first_nonfinite(pending: list[tuple[int, Any, Any]]) -> tuple[int, float] | None:
    """(step, loss) of the first non-finite step in `pending`, else None. Each entry is (step,
    finite flag, loss) of one dispatch: scalars for one step, or (k,) arrays for the k steps
    step, step + 1, ... of a multi-step dispatch. One device_get for the whole list, so
    checking costs no sync per step."""
    flags = jax.device_get([flag for _, flag, _ in pending])
    for (step, _, loss), ok in zip(pending, flags, strict=True):
        bad = np.flatnonzero(np.atleast_1d(ok) == 0)
        if bad.size:
            at = int(bad[0])
            return step + at, float(np.atleast_1d(jax.device_get(loss))[at])
    return None


def diverged(step: int, loss: float, lr: float, saved: int | None,
             checkpoints: Any) -> TrainingDivergedError:
    """The error of a non-finite step: what was kept, the likely cause and the fix."""
    kept = ("no checkpoint was written yet" if saved is None else
            f"the last good checkpoint (step {saved}) in {checkpoints} is kept")
    return TrainingDivergedError(
        f"training diverged at step {step}: the loss ({loss}), a gradient or a weight is not "
        f"finite; nothing of that step was saved and {kept}. Likely cause: the learning rate "
        f"is too high (config.train.lr={lr}); lower it, e.g. --config.train.lr={lr / 10:g}, "
        "and rerun the same command")
