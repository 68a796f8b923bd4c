"""Projected gradient descent with per-example bounds, step masks and crossing counts.

One loop serves PGD-AT, TRADES (KL loss), CAAT's anti-adversary (descent), FAT (early stop),
GAIRAT (kappa) and HAM (continue an attack from `x_init` on the hard examples only).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from hamjax.attacks import rng
from hamjax.attacks.losses import per_example_loss

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
INITS = ("uniform", "normal")


@flax.struct.dataclass
class PGDInfo:
    """What happened to each example during the attack.

    kappa: steps at which the iterate was still classified correctly (GAIRAT's count), over the
      iterates x_0 .. x_{steps-1} that the gradient steps see (plus x_steps when final_eval).
    cross_step: first k with x_k misclassified (0 is the start point); steps + 1 if never seen.
    success: misclassified at the returned point (needs final_eval, else at x_{steps-1}).
    loss: attack loss at the returned point (same caveat).
    active: still moving at the end (False for masked or early-stopped examples).
    """

    kappa: Array
    cross_step: Array
    success: Array
    loss: Array
    active: Array


def _per_example(v, batch: int, ndim: int) -> Array:
    """Broadcasts a scalar or [B] vector against [B, ...] images."""
    v = jnp.asarray(v, jnp.float32)
    v = jnp.broadcast_to(v, (batch,)) if v.ndim == 0 else v
    return v.reshape((batch,) + (1,) * (ndim - 1))


def _l2_norm(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def project(x: Array, x_adv: Array, eps: Array, norm: str) -> Array:
    """Projects x_adv onto the eps ball around x (per example), then onto [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = jnp.clip(delta, -eps, eps)
    else:
        delta = delta * jnp.minimum(1.0, eps / (_l2_norm(delta) + 1e-12))
    return jnp.clip(x + delta, 0.0, 1.0)


def random_init(key: Array, x: Array, eps: Array, norm: str, init: str) -> Array:
    """Random start: uniform in the ball (Madry) or x + 0.001 N(0, 1) (TRADES). `key`: one key,
    or one per example (`hamjax.attacks.rng`)."""
    if init == "normal":
        # Projected too: for eps below the noise scale the start must still lie in the ball.
        noise = rng.batch_draw(jax.random.normal, key, x.shape, x.dtype)
        return project(x, x + 0.001 * noise, eps, norm)
    if norm == "linf":
        noise = rng.batch_draw(jax.random.uniform, key, x.shape, x.dtype, minval=-1.0,
                               maxval=1.0) * eps
    else:
        k1, k2 = rng.split(key)
        direction = rng.batch_draw(jax.random.normal, k1, x.shape, x.dtype)
        direction = direction / (_l2_norm(direction) + 1e-12)
        radius = rng.batch_draw(jax.random.uniform, k2, (x.shape[0],) + (1,) * (x.ndim - 1),
                                x.dtype)
        noise = direction * radius * eps
    return project(x, x + noise, eps, norm)


def _ascent_direction(grad: Array, norm: str) -> Array:
    if norm == "linf":
        return jnp.sign(grad)
    return grad / (_l2_norm(grad) + 1e-12)


def _check(norm: str, init: str, steps: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: choose one of {NORMS}")
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {INITS}")
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0")


def pgd(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    step_size,
    steps: int,
    norm: str = "linf",
    loss: str = "ce",
    random_start: bool = True,
    init: str = "uniform",
    descend: bool = False,
    step_mask: Array | None = None,
    early_stop_tau: int | None = None,
    x_init: Array | None = None,
    clean_logits: Array | None = None,
    target: Array | None = None,
    final_eval: bool = True,
) -> tuple[Array, PGDInfo]:
    """Runs `steps` PGD steps on a batch; every argument may differ per example, the key too
    (one per example: the random start then depends on the example alone).

    eps, step_size: scalar or f32[B]. step_mask: bool[B]; masked rows keep their start point.
    descend: minimise the loss instead (anti-adversary). early_stop_tau: FAT; an example stops
    moving once it has been misclassified at `tau + 1` iterates (tau extra steps after crossing).
    x_init: continue an earlier attack from here (no random start). final_eval: one more forward
    pass at the returned point so that `success`/`loss`/`cross_step` describe it; training
    attacks that do not need it save that pass.
    """
    _check(norm, init, steps)
    batch, ndim = x.shape[0], x.ndim
    eps_b = _per_example(eps, batch, ndim)
    step_b = _per_example(step_size, batch, ndim)
    mask = jnp.ones((batch,), bool) if step_mask is None else step_mask.astype(bool)
    mask_b = mask.reshape((batch,) + (1,) * (ndim - 1))
    if loss == "kl" and clean_logits is None:
        clean_logits = jax.lax.stop_gradient(logits_fn(x))

    if x_init is not None:
        start = x_init
    elif random_start:
        start = random_init(key, x, eps_b, norm, init)
    else:
        start = x
    x_adv = jnp.where(mask_b, start, x if x_init is None else x_init)

    def objective(xa):
        logits = logits_fn(xa)
        per_ex = per_example_loss(loss, logits, y, clean_logits=clean_logits, target=target)
        return jnp.sum(per_ex), (logits, per_ex)

    grad_fn = jax.grad(objective, has_aux=True)
    never = jnp.int32(steps + 1)
    tau_left = jnp.full((batch,), -1 if early_stop_tau is None else early_stop_tau, jnp.int32)

    def body(k, carry):
        x_adv, kappa, cross, active, tau_left, _, _ = carry
        grad, (logits, per_ex) = grad_fn(x_adv)
        correct = jnp.argmax(logits, axis=-1) == y
        kappa = kappa + correct.astype(jnp.int32)
        cross = jnp.where((~correct) & (cross == never), k, cross)
        if early_stop_tau is not None:
            stop_now = (~correct) & (tau_left <= 0)
            tau_left = jnp.where(~correct & ~stop_now, tau_left - 1, tau_left)
            active = active & ~stop_now
        direction = _ascent_direction(grad, norm)
        sign = -1.0 if descend else 1.0
        moved = project(x, x_adv + sign * step_b * direction, eps_b, norm)
        active_b = active.reshape(mask_b.shape)
        x_adv = jnp.where(active_b, moved, x_adv)
        return x_adv, kappa, cross, active, tau_left, ~correct, per_ex

    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (x_adv, zeros, jnp.full((batch,), never), mask, tau_left,
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32))
    x_adv, kappa, cross, active, _, wrong, per_ex = jax.lax.fori_loop(0, steps, body, carry)

    if final_eval:
        logits = logits_fn(x_adv)
        per_ex = per_example_loss(loss, logits, y, clean_logits=clean_logits, target=target)
        wrong = jnp.argmax(logits, axis=-1) != y
        cross = jnp.where(wrong & (cross == never), steps, cross)
    info = PGDInfo(kappa=kappa, cross_step=cross, success=wrong, loss=per_ex, active=active)
    return jax.lax.stop_gradient(x_adv), info


def fgsm(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    step_size=None,
    random_start: bool = False,
    loss: str = "ce",
    norm: str = "linf",
) -> tuple[Array, PGDInfo]:
    """One signed-gradient step; with random_start and step 1.25 eps it is Fast-AT's attack."""
    step = eps if step_size is None else step_size
    return pgd(logits_fn, x, y, key, eps=eps, step_size=step, steps=1, norm=norm, loss=loss,
               random_start=random_start)
