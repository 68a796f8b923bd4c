"""Bounded asynchronous dispatch for the training loop.

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


@jax.jit
def add_trees(a: Any, b: Any) -> Any:
    """Element-wise sum of two pytrees as one program (a tree.map of `+` would dispatch one
    multi-device program per leaf and step)."""
    return jax.tree.map(operator.add, a, b)
