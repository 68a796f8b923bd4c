"""Square Attack, L_inf (Andriushchenko et al., ECCV 2020), as run inside AutoAttack.

A score-based random search that needs logits only, no gradients, so it catches models whose
gradients are masked or obfuscated. Start from vertical stripes of +-eps; at each query flip a
random square window (one sign per channel, shared by the window) by 2 eps, clip back to the eps
ball and [0, 1], and keep the change where the margin loss improved or the example is already
misclassified. The window side shrinks on the reference's piecewise `p_selection` schedule.

Follows `fra31/auto-attack` square.py (L_inf, untargeted): the window position and channel
signs are drawn once per query and shared by the batch, exactly as there. Under jit, examples
already fooled are masked rather than dropped, and the query loop is a lax.while_loop that ends
early once every example is fooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hamjax.attacks import rng

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf",)
LOSSES = ("margin", "ce")
_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(it: int, n_queries: int, p_init: float) -> float:
    """Fraction of pixels the square covers at query `it` (reference, rescale_schedule=True).

    The schedule is written for 10000 queries and rescaled to `n_queries` by truncating a
    float64 quotient, exactly as the reference does.
    """
    it = int(it / n_queries * 10000)
    halvings = sum(it > b for b in _BREAKS)
    return p_init / 2**halvings


def window_sizes(n_queries: int, p_init: float, height: int, width: int, channels: int):
    """Square side at every query, int32[n_queries], computed host-side like the reference.

    s = max(round(sqrt(p * n_features / c)), 1), with Python's round and float64, capped at the
    image side. A static table keeps the traced loop free of float rounding questions.
    """
    n_features = channels * height * width
    sizes = [
        max(int(round(math.sqrt(p_selection(i, n_queries, p_init) * n_features / channels))), 1)
        for i in range(n_queries)
    ]
    return np.minimum(np.asarray(sizes, np.int32), min(height, width))


def _margin_and_loss(logits: Array, y: Array, loss: str) -> tuple[Array, Array]:
    """Margin z_y - max_{j != y} z_j (> 0 while correct) and the loss the search minimises."""
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    margin = true - other
    if loss == "margin":
        return margin, margin
    return margin, -optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _corner(key: Array, room: Array) -> Array:
    """A window's first row (or column): floor(U[0, 1) * room), as (1 or B, 1, 1)."""
    u = rng.row_draw(jax.random.uniform, key, ())
    return jnp.floor(u * room).astype(jnp.int32).reshape(-1, 1, 1)


def square(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    n_queries: int = 5000,
    p_init: float = 0.8,
    norm: str = "linf",
    loss: str = "margin",
    n_restarts: int = 1,
) -> tuple[Array, Array]:
    """Untargeted Square Attack on a batch of NHWC images in [0, 1].

    eps: scalar or f32[B]. Only examples classified correctly when clean are attacked, and each
    stops being queried once fooled. Returns (x_adv, robust: bool[B]); x_adv differs from x only
    where the example was fooled, as in the reference. n_restarts re-runs the search, with fresh
    randomness, on the examples still robust.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: Square supports {NORMS}")
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose one of {LOSSES}")
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC, got shape {x.shape}")
    if n_queries < 0 or n_restarts < 1:
        raise ValueError(f"n_queries={n_queries}, n_restarts={n_restarts}: need >= 0 and >= 1")
    batch, height, width, channels = x.shape
    y = y.astype(jnp.int32)
    eps_b = jnp.asarray(eps, jnp.float32)
    eps_b = jnp.broadcast_to(eps_b, (batch,)) if eps_b.ndim == 0 else eps_b
    eps_b = eps_b.reshape(batch, 1, 1, 1).astype(x.dtype)
    lo, hi = x - eps_b, x + eps_b
    sizes = jnp.asarray(window_sizes(max(n_queries, 1), p_init, height, width, channels))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]

    def margin_and_loss(z):
        return _margin_and_loss(logits_fn(z), y, loss)

    correct = jnp.argmax(logits_fn(x), axis=-1) == y

    def query(todo, k_loop, state):
        i, x_best, margin_min, loss_min = state
        active = todo & (margin_min > 0)
        s = sizes[i]
        k_h, k_w, k_sign = rng.split(rng.fold_in(k_loop, i), 3)
        # torch: (low + (high - low) * rand).long() with high = side - s, shared by the batch
        # for one key; with a key per example each example draws its own window and signs
        v_h, v_w = _corner(k_h, height - s), _corner(k_w, width - s)
        window = (rows >= v_h) & (rows < v_h + s) & (cols >= v_w) & (cols < v_w + s)
        signs = rng.row_draw(jax.random.rademacher, k_sign, (channels,), x.dtype)
        delta = jnp.where(window[..., None], 2.0 * eps_b * signs.reshape(-1, 1, 1, channels), 0.0)
        x_new = jnp.clip(jnp.clip(x_best + delta, lo, hi), 0.0, 1.0)
        margin, new_loss = margin_and_loss(x_new)
        improved = new_loss < loss_min
        loss_min = jnp.where(active & improved, new_loss, loss_min)
        keep = active & (improved | (margin <= 0))
        margin_min = jnp.where(keep, margin, margin_min)
        x_best = jnp.where(keep[:, None, None, None], x_new, x_best)
        return i + 1, x_best, margin_min, loss_min

    def restart(r, carry):
        x_adv, broken = carry
        todo = correct & ~broken

        def attack(carry):
            x_adv, broken = carry
            k_init, k_loop = rng.split(rng.fold_in(key, r))
            stripes = rng.batch_draw(jax.random.rademacher, k_init, (batch, 1, width, channels),
                                     x.dtype)
            x_best = jnp.clip(x + eps_b * stripes, 0.0, 1.0)
            margin_min, loss_min = margin_and_loss(x_best)

            def more(state):
                i, _, margin_min, _ = state
                return (i < n_queries) & jnp.any(todo & (margin_min > 0))

            state = (jnp.int32(0), x_best, margin_min, loss_min)
            _, x_best, margin_min, _ = jax.lax.while_loop(
                more, lambda st: query(todo, k_loop, st), state)
            fooled = todo & (margin_min <= 0)
            x_adv = jnp.where(fooled[:, None, None, None], x_best, x_adv)
            return x_adv, broken | fooled

        return jax.lax.cond(jnp.any(todo), attack, lambda c: c, carry)

    carry = (x, jnp.zeros((batch,), bool))
    x_adv, broken = jax.lax.fori_loop(0, n_restarts, restart, carry)
    return jax.lax.stop_gradient(x_adv), correct & ~broken
