"""Random draws for attacks from one key for the batch or one key per example.

Every attack takes `key` as either. With one key per example (`example_keys`: the example's
index folded into a root key) an example's random start and noise depend on that example
alone, so results do not change with the batch size or with which examples share a chunk;
evaluation uses this. With one key the batch shares it, as training does (cheaper, and the
batch is fixed there anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
# draw(key, shape, dtype) -> array of `shape`, e.g. jax.random.uniform
Draw = Callable[..., Array]


def is_per_example(key: Array) -> bool:
    """True for a batch of keys (typed [B] or raw uint32[B, 2]), False for a single key."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim >= 1
    return key.ndim >= 2


def example_keys(key: Array, index: Array) -> Array:
    """fold_in(key, index[i]) for each example: its randomness is a function of its index."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(index, jnp.uint32))


def split(key: Array, num: int = 2) -> Array:
    """`num` keys along a new leading axis; per-example keys are split example by example."""
    if not is_per_example(key):
        return jax.random.split(key, num)
    return jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)


def fold_in(key: Array, data) -> Array:
    """jax.random.fold_in on one key or on each per-example key."""
    if not is_per_example(key):
        return jax.random.fold_in(key, data)
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)


def batch_draw(draw: Draw, key: Array, shape: Sequence[int], dtype=jnp.float32,
               **kwargs) -> Array:
    """An array of `shape` (batch first): one draw for a single key, else row i from key i."""
    if not is_per_example(key):
        return draw(key, tuple(shape), dtype, **kwargs)
    return jax.vmap(lambda k: draw(k, tuple(shape[1:]), dtype, **kwargs))(key)


def row_draw(draw: Draw, key: Array, row_shape: Sequence[int], dtype=jnp.float32,
             **kwargs) -> Array:
    """A value the batch shares for a single key ([*row_shape]); one per example otherwise
    ([B, *row_shape]). Broadcast it with `reshape((-1, ...))`."""
    if not is_per_example(key):
        return draw(key, tuple(row_shape), dtype, **kwargs)
    return jax.vmap(lambda k: draw(k, tuple(row_shape), dtype, **kwargs))(key)
