"""Data-parallel sharding over a 1-D device mesh: jit with NamedSharding, no pmap.

The same code runs on one CPU, a GPU, a TPU slice or several hosts: state replicated, batch split
on its leading axis; XLA inserts the collectives (BatchNorm statistics are global-batch).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over all (global) devices."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices, (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host arrays (this process's rows) -> global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
