"""Pieces shared by the class-wise robust-fairness methods (CFA, DAFA, WAT, FAAL).

Per-class sums of per-example values (computed inside the jitted step, so a sharded batch sums
over every device), per-example attack radii from class multipliers, the epoch bookkeeping
their host-side `epoch_end` needs, and config validation that names `config.method.<field>`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.validation import (
    method_bool,
    method_choice,
    method_field,
    method_int,
    method_number,
)

Array = jax.Array


# ------------------------------------------------------------------------------ in the step
def class_sums(values: Array, labels: Array, num_classes: int) -> Array:
    """sum_{i: y_i = c} values[i] for every class c: f32[K] for values [B], f32[K, D] for
    values [B, D]."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return jnp.tensordot(onehot, jnp.asarray(values, jnp.float32), axes=((0,), (0,)))


def class_counts(labels: Array, num_classes: int) -> Array:
    """Examples of each class in the batch, f32[K]."""
    return jnp.sum(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), axis=0)


def per_example(class_values: Array, labels: Array) -> Array:
    """class_values[y_i] for each example."""
    return jnp.asarray(class_values, jnp.float32)[labels]


def epoch_of_step(step: Array, steps_per_epoch: int) -> Array:
    """The 0-based epoch a (pre-increment) global step belongs to, traced."""
    return step // max(int(steps_per_epoch), 1)


def ratio(num: Array, den: Array) -> Array:
    """num / den where den > 0, else 0 (a class absent from what was counted)."""
    den = jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, jnp.asarray(num, jnp.float32) / jnp.maximum(den, 1.0e-12), 0.0)


# ------------------------------------------------------------------------------ on the host
def completed_epochs(state, ctx) -> int:
    """Epochs finished when `epoch_end` runs (0 for the pre-training call of a fine-tune)."""
    return int(jax.device_get(state.step)) // max(int(ctx.steps_per_epoch), 1)


def rounded(value, digits: int = 6) -> Any:
    """A device or host array (or scalar) as JSON-able, rounded Python numbers."""
    return np.round(np.asarray(jax.device_get(value), np.float64), digits).tolist()


# ------------------------------------------------------------------------------ validation
# The method-field checks are hamjax.validation's (one set for every validator).
field, number, integer = method_field, method_number, method_int
choice, flag = method_choice, method_bool


def epoch_count(config, name: str, what: str) -> int:
    """An epoch-count field: an int >= 1. (Not checked against train.epochs: a run shorter
    than it, e.g. a smoke test, is simply the method's baseline throughout.)"""
    return integer(config, name, lambda v: v >= 1, f"an int >= 1 (epochs before {what})")
