"""CAAT's objective: the adversary and anti-adversary of every example, the three forwards and
the composite loss they enter (shared by the real step and the meta objective)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hamjax.attacks.losses import kl_divergence
from hamjax.methods.baselines import trades_adversary
from hamjax.methods.common import cross_entropy, forward, train_attack

Array = jax.Array


class Branches(NamedTuple):
    """Per-example terms of one composite-loss evaluation."""

    ce: Array
    kl: Array
    ce_anti: Array
    clean_logits: Array
    adv_logits: Array
    anti_logits: Array


def perturbations(ctx, params, batch_stats, x, y, eps, rng) -> tuple[Array, Array]:
    """Adversary (KL ascent) and anti-adversary (CE descent), both from x + 0.001 N, in eps_i.

    The model is frozen and in `config.attack.bn_mode` (eval) for both, as in the official
    code; the key split matches `frl_loss` so that the adversaries agree.
    """
    adv_key, anti_key = jax.random.split(rng)
    x_adv, _ = trades_adversary(ctx, params, batch_stats, x, y, adv_key, eps=eps)
    x_anti, _ = train_attack(ctx, params, batch_stats, x, y, anti_key, eps=eps, loss="ce",
                             descend=True, init="normal")
    return x_adv, x_anti


def branch_terms(ctx, params, batch_stats, x, y, x_adv, x_anti, *, bn_mode: str):
    """Clean, adversarial and anti-adversarial forwards (in this order, BN stats chained)."""
    clean_logits, stats = forward(ctx, params, batch_stats, x, bn_mode=bn_mode)
    adv_logits, stats = forward(ctx, params, stats, x_adv, bn_mode=bn_mode)
    anti_logits, stats = forward(ctx, params, stats, x_anti, bn_mode=bn_mode)
    terms = Branches(
        ce=cross_entropy(clean_logits, y),
        kl=kl_divergence(adv_logits, y, clean_logits=clean_logits),
        ce_anti=cross_entropy(anti_logits, y),
        clean_logits=clean_logits,
        adv_logits=adv_logits,
        anti_logits=anti_logits,
    )
    return terms, stats


def gates(weights: Array, adv_weight_floor: float) -> tuple[Array, Array]:
    """(alpha, beta) per example; the optional floor lifts alpha (see `adv_weight_floor`)."""
    alpha, beta = weights[:, 0], weights[:, 1]
    if adv_weight_floor:
        alpha = adv_weight_floor + (1.0 - adv_weight_floor) * alpha
    return alpha, beta


def composite_loss(terms: Branches, w0: Array, w1: Array, alpha: Array, beta: Array,
                   beta_trades: float) -> tuple[Array, Array, Array]:
    """(loss, adversarial part, anti-adversarial part) of CAAT's objective.

    The adversarial part is FRL's separately normalised TRADES loss gated by alpha; the
    anti part is the batch mean of beta * CE on the anti-adversaries.
    """
    norm0, norm1 = jnp.sum(w0), jnp.sum(w1)
    adv = (jnp.sum(alpha * w0 * terms.ce) / norm0
           + beta_trades * jnp.sum(alpha * w1 * terms.kl) / norm1)
    anti = jnp.mean(beta * terms.ce_anti)
    return adv + anti, adv, anti
