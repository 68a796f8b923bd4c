"""MART: misclassification-aware adversarial training (Wang et al., ICLR 2020).

As the official code computes it (YisenWang/MART, `mart.py: mart_loss`):
  x' = CE-PGD from x + 0.001 N(0, 1) with BN in eval mode (`config.attack.bn_mode`);
  p = softmax f(x), p' = softmax f(x'), both forwards with BN in train mode, clean first;
  y_hat = argmax_{k != y} p'_k;
  L = mean_i[CE(f(x'_i), y_i)] + mean_i[-log(1.0001 - p'_{i,y_hat} + 1e-12)]
      + beta (1/B) sum_i KL(p_i || p'_i) (1.0000001 - p_{i,y_i}),
  KL(p || p') = sum_k p_k (log p_k - log(p'_k + 1e-12)); nothing detached.
The official start point is not clipped to [0, 1] before the first step; ours is projected into
the eps-ball and [0, 1] (it differs only at the first gradient, by at most 0.001 N(0, 1) noise).
Defaults from the official code: beta = 6 (WRN-34-10; its ResNet-18 run uses 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.common import (
    accuracy,
    attack_ledger,
    cross_entropy,
    forward,
    step_aux,
    train_attack,
    training_ledger,
)

Array = jax.Array

MARGIN_EPS = 1.0001  # log(1.0001 - p'_yhat + 1e-12): the official constants
LOG_EPS = 1e-12
WEIGHT_EPS = 1.0000001  # (1.0000001 - p_y): the KL weight


def best_other_class(probs: Array, labels: Array) -> Array:
    """argmax over k != y of probs (the official top-2 argsort rule)."""
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=bool)
    return jnp.argmax(jnp.where(onehot, -jnp.inf, probs), axis=-1)


def mart_terms(clean_logits: Array, adv_logits: Array, labels: Array) -> dict[str, Array]:
    """MART's per-example terms: `bce` (adversarial CE + margin term), `kl` and the KL weight
    `weight` = 1.0000001 - p_y(x); the loss is mean(bce) + beta * mean(kl * weight)."""
    adv_logits = adv_logits.astype(jnp.float32)
    adv_probs = jax.nn.softmax(adv_logits)
    nat_probs = jax.nn.softmax(clean_logits.astype(jnp.float32))
    other = best_other_class(adv_probs, labels)
    p_other = jnp.take_along_axis(adv_probs, other[:, None], axis=-1)[:, 0]
    margin = -jnp.log(MARGIN_EPS - p_other + LOG_EPS)
    bce = cross_entropy(adv_logits, labels) + margin
    # torch KLDivLoss(log q, p) = xlogy(p, p) - p log q, summed over classes.
    kl = jnp.sum(xlogy(nat_probs, nat_probs) - nat_probs * jnp.log(adv_probs + LOG_EPS), axis=-1)
    true_prob = jnp.take_along_axis(nat_probs, labels[:, None], axis=-1)[:, 0]
    return {"bce": bce, "kl": kl, "weight": WEIGHT_EPS - true_prob}


def mart_objective(clean_logits: Array, adv_logits: Array, labels: Array, beta: float) -> Array:
    """The scalar MART loss of a batch."""
    t = mart_terms(clean_logits, adv_logits, labels)
    return jnp.mean(t["bce"]) + beta * jnp.sum(t["kl"] * t["weight"]) / labels.shape[0]


def mart_loss(params, state, batch, rng, ctx):
    """The Method loss_fn: CE-PGD from a 0.001-Gaussian start, then MART's loss (train-BN)."""
    x, y = batch["image"], batch["label"]
    x_adv, _ = train_attack(ctx, params, state.batch_stats, x, y, rng, loss="ce", init="normal")
    clean_logits, stats = forward(ctx, params, state.batch_stats, x, bn_mode="train")
    adv_logits, stats = forward(ctx, params, stats, x_adv, bn_mode="train")
    loss = mart_objective(clean_logits, adv_logits, y, float(ctx.config.method.beta))
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps) + training_ledger(x.shape[0], 2)
    return loss, step_aux(stats, ledger, train_acc=accuracy(clean_logits, y),
                          train_robust_acc=accuracy(adv_logits, y))


def validate_mart(config) -> None:
    """beta must be a finite number >= 0."""
    beta = config.method.get("beta")
    if (isinstance(beta, bool) or not isinstance(beta, (int, float))
            or not 0 <= beta < float("inf")):
        raise ConfigError(f"config.method.beta={beta!r}: MART needs a number >= 0 (official: 6.0 "
                          "for WRN-34-10, 5.0 for ResNet-18)")


register(Method("mart", mart_loss, validate=validate_mart, defaults={"beta": 6.0},
                description="MART (Wang et al. 2020): misclassification-aware AT"))
