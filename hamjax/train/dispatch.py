"""Dispatching train steps: several per jitted call, and a bounded run-ahead.

`config.train.steps_per_dispatch` = k runs k steps in one call (a `lax.scan` of the train step,
`hamjax.train.step.make_multi_step`): a small model whose step is bound by kernel launches and
Python dispatch (a GPU or TPU) then pays them once per k steps. The dispatches of an epoch end
at multiples of k within it and at its end (`dispatch_spans`), so a resumed epoch is dispatched
as an uninterrupted one; logs and checkpoints fall on the first dispatch boundary at or after
each multiple of their interval (`passes_multiple`).

JAX returns from a jitted call before the devices finish, so a loop that never reads a result
runs ahead of them. With several XLA:CPU host devices that deadlocks: each device takes at most
32 programs in flight, a dispatch beyond that blocks one of the client's worker threads (one
per core), and a multi-device step then waits at its all-reduce for a device part that has no
thread left to run on ("Termination timeout for all reduce ... only 1 of 2 arrived"). Keeping
one step in flight behind the one being dispatched avoids it on every backend at no cost: the
devices always have the next step queued.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from typing import Any

import jax


class RunAhead:
    """Waits for step i - depth to finish once step i is dispatched."""

    def __init__(self, depth: int = 1):
        if depth < 0:
            raise ValueError(f"depth={depth}: must be >= 0")
        self.depth = depth
        self._in_flight: collections.deque = collections.deque()

    def dispatched(self, marker: Any) -> None:
        """Records a just-dispatched step by one of its outputs (a small array)."""
        self._in_flight.append(marker)
        while len(self._in_flight) > self.depth:
            jax.block_until_ready(self._in_flight.popleft())

    def drain(self) -> None:
        while self._in_flight:
            jax.block_until_ready(self._in_flight.popleft())


def dispatch_spans(start: int, steps_per_epoch: int, per_dispatch: int
                   ) -> list[tuple[int, int]]:
    """The (first, end) step positions of each dispatch from epoch position `start` to the
    epoch's end: each ends at the next multiple of `per_dispatch` or at the epoch's end, so
    no dispatch crosses an epoch and a run resumed at a boundary dispatches as before."""
    if per_dispatch < 1:
        raise ValueError(f"per_dispatch={per_dispatch}: must be >= 1")
    spans, first = [], start
    while first < steps_per_epoch:
        end = min((first // per_dispatch + 1) * per_dispatch, steps_per_epoch)
        spans.append((first, end))
        first = end
    return spans


def passes_multiple(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]: a dispatch taking the step count
    from `before` to `after` passed a log or checkpoint step (one step: `after % every == 0`)."""
    return after // every > before // every


def with_step_axis(train_step: Callable[[Any, dict], tuple]) -> Callable[[Any, dict], tuple]:
    """`train_step` with its metrics given a leading axis of length 1: a one-step dispatch
    returns what a k-step one does, (k, ...) per metric."""

    def one_step(state, batch):
        state, metrics = train_step(state, batch)
        return state, jax.tree.map(lambda m: m[None], metrics)

    return one_step


@jax.jit
def add_steps(sums: Any, stacked: Any) -> Any:
    """`sums` plus each step of `stacked` ((k, ...) leaves) in step order, one add per step as
    k one-step dispatches would add them (the same float32 sums); None starts at step 0."""
    for j in range(jax.tree.leaves(stacked)[0].shape[0]):
        step = jax.tree.map(lambda m, j=j: m[j], stacked)
        sums = step if sums is None else jax.tree.map(operator.add, sums, step)
    return sums


@jax.jit
def add_trees(a: Any, b: Any) -> Any:
    """Element-wise sum of two pytrees as one program (a tree.map of `+` would dispatch one
    multi-device program per leaf and step)."""
    return jax.tree.map(operator.add, a, b)
