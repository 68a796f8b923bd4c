"""The one host driver of every evaluation: chunks of examples in, per-example results out.

A stage is a jittable per-chunk function `fn(params, batch, key) -> {name: per-example array}`.
`Driver.run` walks a population of example positions in chunks of `batch_size`, the tail split
into pieces of batch_size / 2, / 4 or / 8 and the last piece padded to the smallest of those
sizes that holds it, so padding stays under batch_size / 8 (`Driver.chunk_plan`). It feeds
each process only its rows of every chunk (`hamjax.sharding.process_rows`) as arrays sharded
over the mesh, runs the function compiled once per size with replicated outputs (so every
process reads every example's result), unpads, and writes each example's outputs at its
position. The batch carries "index", the example's position, from
which attacks fold their per-example keys (`hamjax.attacks.rng.example_keys`), so a result
depends on its example alone, never on the batch size or the chunking; and "mask" (False on
padding rows) for functions that sum over the batch.

A `StageRecord` holds what is done so far. Saved after every chunk (`on_chunk`), it makes a
stage resumable; since results are per example, a resumed stage re-chunks whatever is left.
The trainer's validation and test report (`hamjax.evaluation.pgd`), the evaluation CLI
(`hamjax.evaluation.runner`) and `run_autoattack` are configurations of this driver.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from hamjax.backends.cpu.compile_options import jit
from hamjax.errors import ConfigError
from hamjax.metrics import PerClassCounts
from hamjax.sharding import process_rows, put_replicated, replicated, shard_batch

# fn(params, batch, key) -> {output name: array with the batch on its leading axis}
ChunkFn = Callable[[Any, dict[str, jax.Array], jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass
class StageRecord:
    """One stage's per-example outputs so far (what a resume file stores) and its timings.

    done: bool[N], the examples computed. outputs: name -> [N, ...], valid where done.
    seconds / compile_seconds exclude each other; images counts real (unpadded) rows.
    """

    done: np.ndarray
    outputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    compile_seconds: float = 0.0
    images: int = 0
    computed_chunks: int = 0

    @classmethod
    def empty(cls, n: int) -> StageRecord:
        """Nothing done yet for N examples."""
        return cls(done=np.zeros(n, bool))

    def output(self, name: str, fill: Any = False) -> np.ndarray:
        """outputs[name], or `fill` everywhere when no chunk produced it (an empty population)."""
        if name in self.outputs:
            return self.outputs[name]
        return np.full(len(self.done), fill)


@dataclasses.dataclass(frozen=True)
class ChunkReport:
    """What `on_chunk` hears after each chunk: its real positions and unpadded outputs."""

    stage: str
    chunk: int  # 0-based among the chunks this call computes
    chunks: int
    positions: np.ndarray
    outputs: dict[str, np.ndarray]
    seconds: float
    record: StageRecord


def class_counts(selected: np.ndarray, labels: np.ndarray, num_classes: int) -> PerClassCounts:
    """Per-class (sum, count) of a per-example bool on the host; exact for integer counts."""
    labels = np.asarray(labels)
    weights = np.asarray(selected, np.float64)
    return PerClassCounts(
        correct=np.bincount(labels, weights=weights, minlength=num_classes).astype(np.float32),
        total=np.bincount(labels, minlength=num_classes).astype(np.float32))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` replicated over the mesh; leaves already placed so are kept (no host copy)."""
    target = replicated(mesh)

    def place(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(target, leaf.ndim):
            return leaf
        return put_replicated(leaf, mesh)

    return jax.tree.map(place, tree)


def _raw_key(key: jax.Array) -> jax.Array:
    """uint32 key data: typed keys cannot go through the host copy of `replicate`."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _signature(batch: Mapping[str, Any]) -> tuple:
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


class Driver:
    """Runs per-chunk functions over populations of examples on one mesh, each compiled once
    per function (keep the function objects to reuse their compilation)."""

    def __init__(self, mesh: Mesh, batch_size: int):
        n_dev = int(mesh.devices.size)
        if batch_size < 1 or batch_size % n_dev:
            raise ConfigError(f"batch_size={batch_size} must be a positive multiple of the "
                              f"{n_dev} devices of the mesh")
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self._compiled: dict[tuple, Any] = {}

    def _sizes(self) -> list[int]:
        """The row counts a chunk may run on, largest first: batch_size and batch_size / 2, / 4,
        / 8, each rounded up to a multiple of the device count. Each compiles once per function."""
        n_dev = int(self.mesh.devices.size)
        sizes = {self.batch_size}
        for divisor in (2, 4, 8):
            sizes.add(min(self.batch_size, -(-(self.batch_size // divisor) // n_dev) * n_dev))
        return sorted(sizes, reverse=True)

    def chunk_size(self, count: int) -> int:
        """Rows a chunk of `count` (<= batch_size) real examples runs on: the smallest size
        that holds them."""
        return min(s for s in self._sizes() if s >= count)

    def chunk_plan(self, count: int) -> list[int]:
        """Real examples per chunk for `count` examples: whole batches, then the tail in pieces
        of the smaller sizes, so that padding stays under the smallest size (batch_size / 8).
        AutoAttack's later attacks see only the survivors of the earlier ones: 132 of a 256
        batch run as 128 + 4 (on 160 rows), not padded to 256."""
        sizes, plan = self._sizes(), []
        while count > 0:
            snug = self.chunk_size(min(count, self.batch_size))
            if count <= self.batch_size and snug - count < sizes[-1]:
                plan.append(count)
                break
            take = max(s for s in sizes if s <= count)
            plan.append(take)
            count -= take
        return plan

    def _batch(self, arrays: Mapping[str, np.ndarray], real: np.ndarray) -> dict[str, jax.Array]:
        """This process's rows of the chunk of `real` positions, padded (as `padded_chunks`
        pads: by wrapping its own positions) to `chunk_size` rows."""
        size = self.chunk_size(len(real))
        rows = process_rows(self.mesh, size)
        local = np.resize(real, size)[rows]
        batch = {k: np.asarray(v)[local] for k, v in arrays.items()}
        batch["index"] = local.astype(np.int32)
        batch["mask"] = (np.arange(size) < len(real))[rows]
        return shard_batch(batch, self.mesh)

    def _compile(self, fn: ChunkFn, args: tuple, record: StageRecord) -> Any:
        key = (fn, _signature(args[1]))
        if key not in self._compiled:
            t0 = time.perf_counter()
            rep = replicated(self.mesh)
            jitted = jit(fn, in_shardings=(rep, None, rep), out_shardings=rep)
            self._compiled[key] = jitted.lower(*args).compile()
            record.compile_seconds += time.perf_counter() - t0
        return self._compiled[key]

    def run(
        self,
        fn: ChunkFn,
        params: Any,
        arrays: Mapping[str, np.ndarray],
        population: np.ndarray,
        key: jax.Array,
        *,
        record: StageRecord | None = None,
        name: str = "",
        on_chunk: Callable[[ChunkReport], None] | None = None,
        progress: bool = False,
        desc: str = "",
    ) -> StageRecord:
        """`fn` on every example of `population` (positions into `arrays`) not yet done in
        `record`; returns the record, updated after every chunk (then `on_chunk` is called).

        arrays: name -> host array with the examples on the leading axis (every process passes
        all of them; each feeds its rows). progress: a tqdm bar over the examples with ETA, on
        a terminal or in a notebook only (a pipe or log file would fill with redraws), labelled
        `desc` (default: `name`).
        """
        n = len(next(iter(arrays.values())))
        record = StageRecord.empty(n) if record is None else record
        population = np.asarray(population, np.int64)
        todo = population[~record.done[population]]
        if not len(todo):
            return record
        chunks = np.split(todo, np.cumsum(self.chunk_plan(len(todo)))[:-1])
        params, key = replicate(params, self.mesh), replicate(_raw_key(key), self.mesh)
        with tqdm(total=len(todo), desc=desc or name, unit="img",
                  disable=None if progress else True, leave=False, dynamic_ncols=True) as bar:
            for c, real in enumerate(chunks):
                args = (params, self._batch(arrays, real), key)
                compiled = self._compile(fn, args, record)
                t0 = time.perf_counter()
                out = jax.device_get(compiled(*args))
                seconds = time.perf_counter() - t0
                out = {k: np.asarray(v)[: len(real)] for k, v in out.items()}
                _store(record, real, out)
                record.seconds += seconds
                record.images += len(real)
                record.computed_chunks += 1
                bar.update(len(real))
                if on_chunk is not None:
                    on_chunk(ChunkReport(name, c, len(chunks), real, out, seconds, record))
        return record


def map_examples(driver: Driver, fn: ChunkFn, variables: Any, images: np.ndarray,
                 labels: np.ndarray, key: jax.Array) -> dict[str, np.ndarray]:
    """Per-example outputs of `fn(variables, batch, key)` over every example (images, labels),
    each counted once whatever the mesh: a method's own pass over a split (WAT's costs)."""
    labels = np.asarray(labels, np.int32)
    record = driver.run(fn, variables, {"image": images, "label": labels},
                        np.arange(len(labels)), key)
    return {name: record.output(name, 0.0) for name in record.outputs}


def console(line: str) -> None:
    """Prints a line on stdout without breaking a progress bar being drawn."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _store(record: StageRecord, positions: np.ndarray, outputs: Mapping[str, np.ndarray]) -> None:
    n = len(record.done)
    for k, v in outputs.items():
        if k not in record.outputs:
            record.outputs[k] = np.zeros((n,) + v.shape[1:], v.dtype)
        record.outputs[k][positions] = v
    record.done[positions] = True
