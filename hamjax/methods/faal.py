"""FAAL (Zhang et al., CVPR 2024, "Towards Fairness-Aware Adversarial Learning"): fine-tuning a
robust model with distributionally robust class weights, as TrustAI/FAAL @b20ee9d computes them
(`ft_prn.py`, `FAAL.py: DAW`).

Per batch: m_i = max_{k != y} p_k(x'_i) - p_y(x'_i) (probability margin of the train-BN
adversarial forward) and a_c = sum_{i: y_i = c} m_i (the official objective sum_i p_{y_i}
m_{y_i} over the batch, i.e. the class mean times the class count; a class absent from the
batch has a_c = 0). The weights solve

    max_p  sum_c a_c p_c   s.t.  p >= 0, sum_c p_c = 1, KL(u || p) <= r,   u = 1/K,

which the official code hands to cvxpy (ECOS, then MOSEK, then SCS) at every step. Here the
1-D dual does it inside the jitted step: stationarity gives p_c = mu u_c / (nu - a_c) with
nu > max a; with t = nu - max a and d_c = max a - a_c, KL(u || p(t)) = sum_c u_c log(t + d_c)
+ log sum_c u_c / (t + d_c) falls from +inf (t -> 0) to 0 (t -> inf), so bisection on log t
finds the t where the ball is tight. r = 0 (or all a equal) gives p = u, i.e. the base loss.
The official code hard-codes K = 10 (`cw()`'s reshape(-1, 9), `range(10)`, `DAW(10)`); this
takes any K. p is a constant of the loss (the solver's output is detached there too).

Loss: sum_i l_i K p_{y_i} / B, l = CE(f(x'), y) (base "at") or CE(f(x), y) + beta KL (base
"trades"; the official hard-codes beta = 6); both forwards train-BN, adversarial first.
Attacks: base "at": CE-PGD from a uniform start; "trades": KL-PGD from x + 0.001 N; both eval-BN
in the official code (`config.attack.bn_mode`). A fine-tune: set `train.init_from` to a PGD-AT
(base "at") or TRADES ("trades") run; official: 2 epochs, lr 0.01, / 10 after the first.

Not reproduced (stated): in AT mode the official loop still runs a train-BN clean forward whose
only effect is on the BN running statistics; the AT attack keeps the better of one restart by
an extra forward (a no-op with one restart). MART and AWP bases are left to those options.

The state holds the epoch's running sums of the class weights and margins, so the per-epoch
record shows what the DRO did (and a resumed epoch continues them).
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
    number,
    ratio,
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

BASES = ("at", "trades")
BISECTION_STEPS = 64  # halvings of the 80-nat bracket on log t: below float32 resolution
# log t is searched in log(spread) +- 40: at the low end the ball's KL exceeds 40 (1 - 1/K) nats,
# at the high end it is below e^-80; the spread is floored so that exp(-log t) stays finite.
_LOG_T_SPAN = 40.0
_MIN_SPREAD = 1.0e-6

FAAL_DEFAULTS = {
    "base": "at",  # --loss AT (the official README's FAAL_AT); "trades" for FAAL_TRADES
    "r": 0.5,  # --scale: the KL ball's radius
    "beta": 6.0,  # TRADES base only (hard-coded 6 in ft_prn.py)
}


# ------------------------------------------------------------------------------ pure maths
def probability_margin(logits: Array, labels: Array) -> Array:
    """max_{k != y} p_k - p_y per example (FAAL's `cw`): > 0 once misclassified."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=bool)
    true = jnp.sum(jnp.where(onehot, probs, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, probs), axis=-1)
    return other - true


def _ball_kl(log_t: Array, gaps: Array) -> Array:
    """KL(u || p(t)) for p_c proportional to 1 / (t + d_c), u uniform, written in x = d / t
    (log1p: no cancellation where p is near u)."""
    x = gaps * jnp.exp(-log_t)
    return jnp.mean(jnp.log1p(x)) + jnp.log(jnp.mean(1.0 / (1.0 + x)))


def dro_class_weights(scores: Array, radius: float, steps: int = BISECTION_STEPS) -> Array:
    """argmax_p sum_c scores_c p_c over the simplex within KL(u || p) <= radius (u uniform),
    by bisection on the dual's one unknown (see the module docstring). f32[K], sums to 1."""
    a = jnp.asarray(scores, jnp.float32)
    num_classes = a.shape[-1]
    if radius <= 0:  # the ball is the point u
        return jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
    gaps = jnp.max(a) - a
    centre = jnp.log(jnp.maximum(jnp.max(gaps), _MIN_SPREAD))

    def halve(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        inside = _ball_kl(mid, gaps) <= radius  # t large enough: KL within the ball
        return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

    _, log_t = jax.lax.fori_loop(0, steps, halve, (centre - _LOG_T_SPAN, centre + _LOG_T_SPAN))
    q = 1.0 / (1.0 + gaps * jnp.exp(-log_t))  # proportional to 1 / (t + d_c), bounded
    return q / jnp.sum(q)


def faal_scores(margins: Array, labels: Array, num_classes: int) -> Array:
    """a_c = sum over the batch's class-c examples of their margin (0 for an absent class)."""
    return class_sums(margins, labels, num_classes)


def faal_objective(per_example_loss: Array, labels: Array, p: Array) -> Array:
    """sum_i l_i p_{y_i} K / B (p a constant: no gradient flows into the weights)."""
    num_classes = p.shape[-1]
    w = jax.lax.stop_gradient(p)[labels] * num_classes
    return jnp.mean(per_example_loss * w)


# ------------------------------------------------------------------------------ method
def faal_init_state(ctx, rng) -> dict:
    """The epoch's running sums: class weights K p (per step), class margins and counts."""
    del rng
    k = ctx.num_classes
    return {"weight_sums": jnp.zeros((k,), jnp.float32),
            "steps": jnp.zeros((), jnp.float32),
            "margin_sums": jnp.zeros((k,), jnp.float32),
            "margin_counts": jnp.zeros((k,), jnp.float32)}


def faal_from_adv(ctx, params, batch_stats, x, y, x_adv):
    """Train-BN forwards (adversarial, then clean for TRADES), the batch's margins, DRO class
    weights p and the reweighted loss."""
    mcfg = ctx.config.method
    adv_logits, stats = forward(ctx, params, batch_stats, x_adv, bn_mode="train")
    metrics = {"train_robust_acc": accuracy(adv_logits, y)}
    if mcfg.base == "trades":
        clean_logits, stats = forward(ctx, params, stats, x, bn_mode="train")
        kl = kl_divergence(adv_logits, y, clean_logits=clean_logits)
        per_ex = float(mcfg.beta) * kl + cross_entropy(clean_logits, y)
        metrics.update(train_acc=accuracy(clean_logits, y), kl=jnp.mean(kl))
    else:
        per_ex = cross_entropy(adv_logits, y)
    margins = probability_margin(jax.lax.stop_gradient(adv_logits), y)
    p = dro_class_weights(faal_scores(margins, y, ctx.num_classes), float(mcfg.r))
    return faal_objective(per_ex, y, p), p, margins, stats, metrics


def faal_loss(params, state, batch, rng, ctx):
    """The base loss per example, reweighted by the batch's DRO class weights."""
    x, y = batch["image"], batch["label"]
    attack = ctx.config.attack
    trades = ctx.config.method.base == "trades"
    k = ctx.num_classes
    x_adv, _ = train_attack(ctx, params, state.batch_stats, x, y, rng,
                            loss="kl" if trades else "ce", init="normal" if trades else "uniform")
    loss, p, margins, stats, metrics = faal_from_adv(ctx, params, state.batch_stats, x, y, x_adv)
    if trades:
        ledger = attack_ledger(x.shape[0], attack.steps, final_eval=True)
        ledger = ledger + training_ledger(x.shape[0], 2)
    else:
        ledger = attack_ledger(x.shape[0], attack.steps) + training_ledger(x.shape[0])
    metrics.update(max_class_weight=k * jnp.max(p), min_class_weight=k * jnp.min(p))
    ms = state.method_state
    aux = step_aux(stats, ledger, **metrics)
    aux["method_state"] = {"weight_sums": ms["weight_sums"] + k * p,
                           "steps": ms["steps"] + 1.0,
                           "margin_sums": ms["margin_sums"] + class_sums(margins, y, k),
                           "margin_counts": ms["margin_counts"] + class_counts(y, k)}
    return loss, aux


def faal_epoch_end(state, ctx, evaluator):
    """Starts the next epoch's running sums (the DRO itself has no state across batches)."""
    del ctx, evaluator
    ms = state.method_state
    return state.replace(method_state=place_like(jax.tree.map(jnp.zeros_like, ms), ms))


def faal_summarize_state(method_state) -> dict:
    """The epoch's mean class weight K p_c (1 = unweighted) and mean adversarial probability
    margin per class."""
    ms = jax.device_get(method_state)
    steps = max(float(ms["steps"]), 1.0)
    return {"mean_class_weight": rounded(jnp.asarray(ms["weight_sums"]) / steps),
            "mean_margin": rounded(ratio(ms["margin_sums"], ms["margin_counts"]))}


def validate_faal(config) -> None:
    """Every FAAL field, by name."""
    choice(config, "base", BASES)
    number(config, "r", lambda v: v >= 0,
           "the KL ball's radius must be >= 0 (official --scale 0.5; 0 = the base loss)")
    number(config, "beta", lambda v: v >= 0, "must be >= 0 (official: 6)")


register(Method(
    "faal",
    faal_loss,
    init_state=faal_init_state,
    epoch_end=faal_epoch_end,
    validate=validate_faal,
    summarize_state=faal_summarize_state,
    defaults=dict(FAAL_DEFAULTS),
    description="FAAL fairness-aware fine-tuning with DRO class weights (Zhang et al. 2024)",
))

