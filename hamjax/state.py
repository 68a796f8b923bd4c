"""The whole training state: everything a resumed run needs lives here and is checkpointed."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hamjax.averaging import init_averaged
from hamjax.metrics import Ledger
from hamjax.models import init_variables


@flax.struct.dataclass
class TrainState:
    """step, weights, BN statistics, optimiser, RNG, method state, the compute ledger and the
    averaged weights (`hamjax.averaging`: {} when averaging is off)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key data: checkpoints portably
    method_state: Any
    ledger: Ledger
    averaged: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Static things a step needs, closed over before jit (never traced, never checkpointed)."""

    model: Any
    tx: optax.GradientTransformation
    lr_fn: Any
    config: Any  # ml_collections.FrozenConfigDict
    num_classes: int
    class_counts: np.ndarray
    steps_per_epoch: int
    image_shape: tuple[int, ...]
    # The device mesh the step is jitted over; per-example compaction (HAM's buckets) packs
    # rows per device on it. None: one device, or plain GSPMD with global packing.
    mesh: Any = None


def create_train_state(ctx: StepContext, method, seed: int) -> TrainState:
    """Initialises weights, optimiser and method state from one seed."""
    root = jax.random.PRNGKey(seed)
    init_rng, method_rng, step_rng = jax.random.split(root, 3)
    variables = init_variables(ctx.model, init_rng, ctx.image_shape)
    params = variables["params"]
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=ctx.tx.init(params),
        rng=step_rng,
        method_state=method.init_state(ctx, method_rng),
        ledger=Ledger.zeros(),
        averaged=init_averaged(params, ctx.config.train),
    )
    # One buffer per leaf: the jitted step donates the state, and a leaf shared by two fields
    # (e.g. one zeros array reused) cannot be donated twice.
    return jax.tree.map(jnp.copy, state)
