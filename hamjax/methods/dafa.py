"""DAFA (Lee et al., ICLR 2024, "DAFA: Distance-Aware Fair Adversarial Training").

As rucy74/DAFA @c60ba83 computes it (`losses.py: trades_loss`, `utils.py:
calculate_class_weights` after commit 74657cd, `train.py`):

- Class weights W = 1 until the end of (1-based) epoch `warmup_epochs`. During that epoch the
  softmax of the train-BN *adversarial* training logits is collected; after it
  P[i] = the mean probability vector of class i's examples, and for every j != i:
  W_i += lambda P_ij P_jj if P_ii < P_jj, else W_i -= lambda P_ji P_ii (the else-branch as
  fixed in Sep 2024; earlier clones read P_ij P_jj). Computed once, used from the next epoch.
- Attack: KL-PGD (eval-BN by default, x + 0.001 N start) with per-example radius W_y eps and
  step W_y step_size.
- TRADES loss, train-BN forwards adversarial then clean:
  L = mean_i W_{y_i} CE(f(x_i), y_i) + beta sum_i KL_i / B (the KL term unweighted).

base = "at": CE-PGD from the same start with the same class-wise radius and step, loss
mean_i W_{y_i} CE(f(x'_i), y_i). The official `madry_loss` follows each class-wise step with a
second, global step and projection to eps, so its class-wise radii are not enforced (a defect,
not reproduced).

The per-class sums of the collected probabilities live in `method_state` (a resumed warm-up
epoch continues them); the official code keeps one row per example, whose class means are the
same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hamjax.attacks.losses import kl_divergence
from hamjax.methods import Method, register
from hamjax.methods.classwise import (
    choice,
    class_counts,
    class_sums,
    completed_epochs,
    epoch_count,
    epoch_of_step,
    number,
    per_example,
    rounded,
)
from hamjax.methods.common import (
    accuracy,
    attack_ledger,
    cross_entropy,
    forward,
    step_aux,
    train_attack,
    training_ledger,
)
from hamjax.sharding import place_like

Array = jax.Array

BASES = ("trades", "at")

DAFA_DEFAULTS = {
    "base": "trades",  # --loss trades (the official default and the paper's main setting)
    "beta": 6.0,  # TRADES beta
    "dafa_lambda": 1.0,  # CIFAR-10: 1.0; CIFAR-100 / STL-10: 1.5
    "warmup_epochs": 70,  # --dafa_warmup: weights from the end of this (1-based) epoch on
}


# ------------------------------------------------------------------------------ pure maths
def class_similarity(prob_sums: Array, counts: Array) -> Array:
    """P[i] = mean softmax row of class i's collected examples (zeros for an absent class)."""
    counts = jnp.asarray(counts, jnp.float32)[:, None]
    return jnp.where(counts > 0, prob_sums / jnp.maximum(counts, 1.0), 0.0)


def dafa_class_weights(similarity: Array, lam: float) -> Array:
    """W_i = 1 + lam sum_{j != i} [P_ij P_jj if P_ii < P_jj else -P_ji P_ii]."""
    p = jnp.asarray(similarity, jnp.float32)
    diag = jnp.diagonal(p)
    gain = p * diag[None, :]  # P_ij P_jj
    loss = p.T * diag[:, None]  # P_ji P_ii
    harder = diag[:, None] < diag[None, :]  # P_ii < P_jj
    off_diagonal = ~jnp.eye(p.shape[0], dtype=bool)
    delta = jnp.where(harder, gain, -loss)
    return 1.0 + lam * jnp.sum(jnp.where(off_diagonal, delta, 0.0), axis=1)


def dafa_trades_objective(ce: Array, kl: Array, w: Array, beta: float) -> Array:
    """mean_i W_{y_i} CE_i + beta mean_i KL_i (w per example)."""
    return jnp.mean(w * ce) + beta * jnp.mean(kl)


# ------------------------------------------------------------------------------ method
def dafa_init_state(ctx, rng) -> dict:
    """W = 1; nothing collected."""
    del rng
    k = ctx.num_classes
    return {"weights": jnp.ones((k,), jnp.float32),
            "similarity": jnp.zeros((k, k), jnp.float32),
            "prob_sums": jnp.zeros((k, k), jnp.float32),
            "counts": jnp.zeros((k,), jnp.float32)}


def _collected(ctx, ms: dict, adv_logits: Array, y: Array, step: Array) -> dict:
    """ms with the batch's adversarial softmax rows added during the warm-up's last epoch."""
    collect = epoch_of_step(step, ctx.steps_per_epoch) == ctx.config.method.warmup_epochs - 1
    gate = collect.astype(jnp.float32)
    probs = jax.nn.softmax(jax.lax.stop_gradient(adv_logits).astype(jnp.float32), axis=-1)
    k = ctx.num_classes
    return dict(ms, prob_sums=ms["prob_sums"] + gate * class_sums(probs, y, k),
                counts=ms["counts"] + gate * class_counts(y, k))


def dafa_adversary(ctx, params, batch_stats, x, y, w, rng):
    """KL-PGD (TRADES base) or CE-PGD (AT base) from x + 0.001 N, radius and step W_y times
    config.attack's."""
    attack = ctx.config.attack
    trades = ctx.config.method.base == "trades"
    return train_attack(ctx, params, batch_stats, x, y, rng, eps=w * attack.eps,
                        step_size=w * attack.step_size, loss="kl" if trades else "ce",
                        init="normal")[0]


def dafa_from_adv(ctx, params, batch_stats, x, y, x_adv, w):
    """Train-BN forwards, adversarial first (then clean for TRADES), and DAFA's objective."""
    adv_logits, stats = forward(ctx, params, batch_stats, x_adv, bn_mode="train")
    metrics = {"train_robust_acc": accuracy(adv_logits, y)}
    if ctx.config.method.base == "trades":
        clean_logits, stats = forward(ctx, params, stats, x, bn_mode="train")
        ce = cross_entropy(clean_logits, y)
        kl = kl_divergence(adv_logits, y, clean_logits=clean_logits)
        loss = dafa_trades_objective(ce, kl, w, float(ctx.config.method.beta))
        metrics.update(train_acc=accuracy(clean_logits, y), kl=jnp.mean(kl))
    else:
        loss = jnp.mean(w * cross_entropy(adv_logits, y))
    return loss, adv_logits, stats, metrics


def dafa_loss(params, state, batch, rng, ctx):
    """DAFA's TRADES (or AT) loss with class-wise radius, step and CE weight."""
    x, y = batch["image"], batch["label"]
    attack = ctx.config.attack
    w = per_example(state.method_state["weights"], y)
    x_adv = dafa_adversary(ctx, params, state.batch_stats, x, y, w, rng)
    loss, adv_logits, stats, metrics = dafa_from_adv(ctx, params, state.batch_stats, x, y,
                                                     x_adv, w)
    if ctx.config.method.base == "trades":
        ledger = attack_ledger(x.shape[0], attack.steps, final_eval=True)
        ledger = ledger + training_ledger(x.shape[0], 2)
    else:
        ledger = attack_ledger(x.shape[0], attack.steps) + training_ledger(x.shape[0])
    aux = step_aux(stats, ledger, mean_eps=jnp.mean(w) * attack.eps, **metrics)
    aux["method_state"] = _collected(ctx, state.method_state, adv_logits, y, state.step)
    return loss, aux


def weights_after_warmup(ms: dict, lam: float) -> dict:
    """The state after the warm-up epoch: similarity and weights from what it collected."""
    similarity = class_similarity(ms["prob_sums"], ms["counts"])
    return dict(ms, similarity=similarity, weights=dafa_class_weights(similarity, lam),
                prob_sums=jnp.zeros_like(ms["prob_sums"]),
                counts=jnp.zeros_like(ms["counts"]))


def dafa_epoch_end(state, ctx, evaluator):
    """At the end of epoch `warmup_epochs` (1-based), the class weights, once."""
    del evaluator
    mcfg = ctx.config.method
    ms = state.method_state
    if completed_epochs(state, ctx) != mcfg.warmup_epochs or float(jnp.sum(ms["counts"])) == 0:
        return state
    new = weights_after_warmup(ms, float(mcfg.dafa_lambda))
    return state.replace(method_state=place_like(new, ms))


def dafa_summarize_state(method_state) -> dict:
    """The class weights (radius and CE multipliers) this epoch trained with, and the class
    similarity diagonal P_ii they came from (zeros before the warm-up ends)."""
    ms = jax.device_get(method_state)
    return {"class_weights": rounded(ms["weights"]),
            "similarity_diagonal": rounded(jnp.diagonal(jnp.asarray(ms["similarity"])))}


def validate_dafa(config) -> None:
    """Every DAFA field, by name."""
    choice(config, "base", BASES)
    number(config, "beta", lambda v: v >= 0, "must be >= 0 (official: 6)")
    number(config, "dafa_lambda", lambda v: v >= 0,
           "must be >= 0 (official: 1.0 for CIFAR-10, 1.5 for CIFAR-100 / STL-10)")
    epoch_count(config, "warmup_epochs", "DAFA's class weights are computed")


register(Method(
    "dafa",
    dafa_loss,
    init_state=dafa_init_state,
    epoch_end=dafa_epoch_end,
    validate=validate_dafa,
    summarize_state=dafa_summarize_state,
    defaults=dict(DAFA_DEFAULTS),
    description="DAFA distance-aware class-wise eps and loss weights (Lee et al. 2024)",
    starts_at={"warmup_epochs": "DAFA's class weights are used"},
))
