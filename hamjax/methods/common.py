"""Helpers shared by methods: model forward passes, the training attack, loss bookkeeping."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from hamjax.attacks import pgd
from hamjax.metrics import Ledger
from hamjax.models import apply_model

Array = jax.Array


def forward(ctx, params, batch_stats, x: Array, *, bn_mode: str, mask: Array | None = None):
    """Model logits and (possibly updated) BatchNorm statistics."""
    variables = {"params": params, "batch_stats": batch_stats}
    return apply_model(ctx.model, variables, x, bn_mode=bn_mode, mask=mask)


def attack_logits_fn(ctx, params, batch_stats) -> Callable[[Array], Array]:
    """The logits_fn attacks see: frozen weights, BN mode from `config.attack.bn_mode`.

    Gradients never flow from the attack into the weights (the adversarial example is treated
    as data, as in every reference implementation).
    """
    frozen_params = jax.lax.stop_gradient(params)
    frozen_stats = jax.lax.stop_gradient(batch_stats)
    bn_mode = ctx.config.attack.bn_mode

    def logits_fn(x):
        return forward(ctx, frozen_params, frozen_stats, x, bn_mode=bn_mode)[0]

    return logits_fn


def train_attack(ctx, params, batch_stats, x, y, rng, **overrides):
    """PGD with the config's training-attack settings (`config.attack`), overridable per call."""
    attack = ctx.config.attack
    kwargs = dict(
        eps=attack.eps,
        step_size=attack.step_size,
        steps=attack.steps,
        random_start=attack.random_start,
        final_eval=False,
    )
    kwargs.update(overrides)
    return pgd(attack_logits_fn(ctx, params, batch_stats), x, y, rng, **kwargs)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def accuracy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
    """Fraction correct over the (masked) batch."""
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if mask is None:
        return jnp.mean(correct)
    return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def attack_ledger(batch: int, steps: int, final_eval: bool = False) -> Ledger:
    """Example passes of a `steps`-step gradient attack on `batch` rows."""
    forwards = steps + (1 if final_eval else 0)
    return Ledger(forward=jnp.float32(forwards * batch), backward=jnp.float32(steps * batch))


def training_ledger(batch: int, forwards: int = 1) -> Ledger:
    """Example passes of the weight update: `forwards` forward passes and their backward."""
    return Ledger(forward=jnp.float32(forwards * batch), backward=jnp.float32(forwards * batch))


def step_aux(batch_stats, ledger: Ledger, apply_update=True, **metrics) -> dict:
    """The aux dict every loss_fn returns (see `hamjax.methods.Method`)."""
    return {
        "batch_stats": batch_stats,
        "ledger": ledger,
        "apply_update": jnp.asarray(apply_update, bool),
        "metrics": {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
    }
