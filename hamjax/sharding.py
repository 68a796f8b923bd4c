"""Data-parallel sharding over a 1-D device mesh: jit with NamedSharding, no pmap.

The same code runs on one CPU, a GPU, a TPU slice or several hosts: state replicated, batch split
on its leading axis; XLA inserts the collectives (BatchNorm statistics are global-batch). Every
process feeds only its own rows (`process_rows`) and state is placed from host arrays
(`put_replicated`), so arrays line up with each process's devices as orbax needs to save them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
ROWS = PartitionSpec(DATA_AXIS)  # an array split on its leading (example) axis
STACKED_ROWS = PartitionSpec(None, DATA_AXIS)  # k stacked batches, each split on its rows


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, ROWS)


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """k batches stacked on a new leading axis (one per step of a multi-step dispatch), each
    split over the data axis on its own rows (axis 1)."""
    return NamedSharding(mesh, STACKED_ROWS)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_rows(mesh: Mesh, global_rows: int) -> slice:
    """The contiguous rows of a `global_rows`-row batch that this process's devices hold.

    Read from the sharding itself, so it is right whatever order the mesh lists the devices in.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    spans = sorted(index[0].indices(global_rows)[:2] for index in index_map.values())
    for (_, stop), (start, _) in zip(spans[:-1], spans[1:], strict=True):
        if stop != start:
            raise ValueError(f"this process's devices hold non-contiguous rows {spans}: order "
                             "the mesh devices by process (jax.devices() does)")
    return slice(spans[0][0], spans[-1][1])


def shard_batch(batch: dict, mesh: Mesh, stacked: bool = False) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the mesh; `stacked`:
    each array holds k batches on a leading axis and its rows on axis 1."""
    sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def _from_host(value: Any, sharding, dtype=None) -> jax.Array:
    """One array placed with `sharding` from its host value (the same on every process)."""
    host = np.asarray(jax.device_get(value), dtype=dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """A pytree of host (or single-device) arrays -> arrays replicated over every device of the
    mesh, on every process. Each process supplies the same values; nothing moves across hosts.
    (A `device_put` of a single-device array onto a cross-process sharding would give arrays
    orbax cannot save.)
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda leaf: _from_host(leaf, sharding), tree)


def place_like(new: Any, like: Any) -> Any:
    """`new` with each leaf's dtype and placement taken from `like` (host-side updates of state,
    e.g. FRL's multipliers, go back where the jitted step expects them: no recompiles)."""

    def place(value: Any, old: Any) -> Any:
        sharding = getattr(old, "sharding", None)
        if sharding is None:
            return jax.numpy.asarray(value, old.dtype)
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value if value.dtype == old.dtype else value.astype(old.dtype)
        return _from_host(value, sharding, old.dtype)

    return jax.tree.map(place, new, like)


def mesh_size(mesh: Mesh | None) -> int:
    """Devices a batch is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.devices.size)


def per_device(mesh: Mesh | None, fn: Callable, out_specs: Any = ROWS) -> Callable:
    """`fn` on each device's own rows of batch-sharded arguments (`shard_map` over the data
    axis): per-example compaction packs rows locally instead of gathering the global batch onto
    every device. `fn` itself without a mesh."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=ROWS, out_specs=out_specs)


def max_local_count(mesh: Mesh | None, selected: jax.Array) -> jax.Array:
    """The largest number of True rows any one device holds: one `pmax` on a scalar."""
    if mesh is None:
        return selected.sum()
    count = lambda rows: jax.lax.pmax(rows.sum(), DATA_AXIS)
    return per_device(mesh, count, out_specs=PartitionSpec())(selected)
