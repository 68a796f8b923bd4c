"""CFA (Wei et al., CVPR 2023, "CFA: Class-wise Calibrated Fair Adversarial Training").

As PKU-ML/CFA @071f333 computes it (`train.py`, `attack.py`):

- CCM, class-wise calibrated margins: from epoch `begin` (0-based) on, class c is attacked
  within eps_c = (lambda1 + t_c) * eps, t_c the class's robust accuracy on the previous epoch's
  *training* adversarial examples (train-BN outputs of the loss forward, before that step's
  update).
- CCR, class-wise calibrated regularisation (TRADES base only): beta'_c = (lambda2 + t_c) * beta
  and the loss sum_i [(1 - b_{y_i}) CE(f(x_i), y_i) + b_{y_i} KL_i] / B, b = beta' / (1 + beta').
- FAWA (fairness-aware weight averaging) is a trainer option, not part of this loss: set
  `train.fawa_threshold` / `train.fawa_decay` (official: 0.24 / 0.88).

Deliberate, stated differences from the official code:
- t_c is class c's accuracy, correct_c / count_c. The official `CW_log` computes
  K * correct_c / N, which equals it only on a class-balanced training set.
- The official AT attack runs with the model in train mode: batch statistics (reproduced by
  `config.attack.bn_mode = "batch"`) *and* ten running-statistic updates per step from the
  attack's intermediate points (a side effect, not reproduced: evaluation's BN statistics would
  average half-finished adversarial batches).
- The official loop runs one more train-mode clean forward after each update, for logging only;
  it also moves the BN running statistics (a defect, not reproduced).
- `trades_scale`: the official TRADES loss is the convex combination above, i.e. Zhang et al.'s
  CE + beta KL divided by (1 + beta) before CCR starts (a 7x smaller gradient at beta = 6, which
  with an unscaled weight decay is not a pure learning-rate change). "convex" (default) keeps
  it; "trades" multiplies the whole loss by (1 + beta), the same class-wise balance at TRADES'
  scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hamjax.attacks.losses import kl_divergence
from hamjax.methods import Method, register
from hamjax.methods.baselines import trades_adversary
from hamjax.methods.classwise import (
    choice,
    class_counts,
    class_sums,
    completed_epochs,
    epoch_count,
    flag,
    number,
    per_example,
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

BASES = ("trades", "at")
TRADES_SCALES = ("convex", "trades")

CFA_DEFAULTS = {
    "base": "trades",  # train.py --mode (TRADES | AT); FAT is not included
    "beta": 6.0,  # TRADES beta
    "lambda1": 0.5,  # CCM: eps_c = (lambda1 + t_c) eps
    "lambda2": 0.5,  # CCR: beta'_c = (lambda2 + t_c) beta
    "ccm": True,  # --ccm
    "ccr": True,  # --ccr (TRADES base only)
    "begin": 10,  # --begin: the first (0-based) epoch with class-wise eps / beta
    "trades_scale": "convex",  # see the module docstring
}


# ------------------------------------------------------------------------------ pure maths
def calibrated_eps_scale(train_robust: Array, lambda1: float) -> Array:
    """CCM: the class's eps multiplier lambda1 + t_c."""
    return lambda1 + jnp.asarray(train_robust, jnp.float32)


def calibrated_beta(train_robust: Array, lambda2: float, beta: float) -> Array:
    """CCR: beta'_c = (lambda2 + t_c) beta."""
    return (lambda2 + jnp.asarray(train_robust, jnp.float32)) * beta


def convex_weight(beta: Array) -> Array:
    """b = beta / (1 + beta): the KL share of the official convex TRADES combination."""
    beta = jnp.asarray(beta, jnp.float32)
    return beta / (1.0 + beta)


def cfa_trades_objective(ce: Array, kl: Array, b: Array, scale: float = 1.0) -> Array:
    """scale * sum_i [(1 - b_i) CE_i + b_i KL_i] / B, b per example (official `cw_trades_loss`
    with scale 1)."""
    return scale * jnp.mean((1.0 - b) * ce + b * kl)


def next_class_state(ms: dict, completed: int, mcfg) -> dict:
    """The state the next epoch trains with: class-wise eps / beta from this epoch's training
    robust accuracy once `completed` >= begin (official: epoch >= args.begin, 0-based), and
    fresh counters. An epoch with nothing counted (a fine-tune's pre-training call) changes
    nothing."""
    if float(jnp.sum(ms["count"])) == 0.0:
        return ms
    new = dict(ms)
    if completed >= mcfg.begin:
        t = ratio(ms["correct"], ms["count"])
        if mcfg.ccm:
            new["eps_scale"] = calibrated_eps_scale(t, mcfg.lambda1)
        if mcfg.ccr and mcfg.base == "trades":
            new["beta"] = calibrated_beta(t, mcfg.lambda2, mcfg.beta)
    new["correct"] = jnp.zeros_like(ms["correct"])
    new["count"] = jnp.zeros_like(ms["count"])
    return new


# ------------------------------------------------------------------------------ method
def cfa_init_state(ctx, rng) -> dict:
    """Uniform eps (multiplier 1) and beta until `begin`; this epoch's adversarial counts."""
    del rng
    k = ctx.num_classes
    beta = float(ctx.config.method.beta)
    return {"eps_scale": jnp.ones((k,), jnp.float32),
            "beta": jnp.full((k,), beta, jnp.float32),
            "correct": jnp.zeros((k,), jnp.float32),
            "count": jnp.zeros((k,), jnp.float32)}


def _counted(ms: dict, adv_logits: Array, y: Array, num_classes: int) -> dict:
    """ms with the batch's training adversarial hits added (t_c's numerator / denominator)."""
    hits = (jnp.argmax(adv_logits, -1) == y).astype(jnp.float32)
    return dict(ms, correct=ms["correct"] + class_sums(hits, y, num_classes),
                count=ms["count"] + class_counts(y, num_classes))


def cfa_at_terms(ctx, params, state, x, y, rng):
    """AT base: CE-PGD from a uniform start in each example's own ball (`cw_attack_pgd`), then
    CE on one train-BN forward."""
    eps = ctx.config.attack.eps * per_example(state.method_state["eps_scale"], y)
    x_adv, _ = train_attack(ctx, params, state.batch_stats, x, y, rng, eps=eps, loss="ce",
                            init="uniform")
    adv_logits, stats = forward(ctx, params, state.batch_stats, x_adv, bn_mode="train")
    loss = jnp.mean(cross_entropy(adv_logits, y))
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps) + training_ledger(x.shape[0])
    return loss, adv_logits, stats, ledger, {"mean_eps": jnp.mean(eps)}


def cfa_trades_from_adv(ctx, params, batch_stats, x, y, x_adv, class_beta):
    """The official three train-BN forwards: clean (CE), adversarial, clean again (the KL
    target, its gradient kept), each updating the BN running statistics in that order; then
    the convex (or TRADES-scaled) combination with b = beta'_y / (1 + beta'_y)."""
    mcfg = ctx.config.method
    clean_logits, stats = forward(ctx, params, batch_stats, x, bn_mode="train")
    adv_logits, stats = forward(ctx, params, stats, x_adv, bn_mode="train")
    target_logits, stats = forward(ctx, params, stats, x, bn_mode="train")
    ce = cross_entropy(clean_logits, y)
    kl = kl_divergence(adv_logits, y, clean_logits=target_logits)
    b = convex_weight(per_example(class_beta, y))
    scale = 1.0 + float(mcfg.beta) if mcfg.trades_scale == "trades" else 1.0
    loss = cfa_trades_objective(ce, kl, b, scale)
    extra = {"mean_b": jnp.mean(b), "kl": jnp.mean(kl), "train_acc": accuracy(clean_logits, y)}
    return loss, adv_logits, stats, extra


def cfa_trades_terms(ctx, params, state, x, y, rng):
    """TRADES base: KL-PGD (eval-BN by default, x + 0.001 N start) within eps_y, then
    `cfa_trades_from_adv`."""
    ms = state.method_state
    eps = ctx.config.attack.eps * per_example(ms["eps_scale"], y)
    x_adv, _ = trades_adversary(ctx, params, state.batch_stats, x, y, rng, eps=eps)
    loss, adv_logits, stats, extra = cfa_trades_from_adv(
        ctx, params, state.batch_stats, x, y, x_adv, ms["beta"])
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps, final_eval=True)
    ledger = ledger + training_ledger(x.shape[0], 3)
    return loss, adv_logits, stats, ledger, dict(extra, mean_eps=jnp.mean(eps))


def cfa_loss(params, state, batch, rng, ctx):
    """CFA's AT or TRADES loss; counts the batch's training robust accuracy per class."""
    x, y = batch["image"], batch["label"]
    terms = cfa_trades_terms if ctx.config.method.base == "trades" else cfa_at_terms
    loss, adv_logits, stats, ledger, extra = terms(ctx, params, state, x, y, rng)
    aux = step_aux(stats, ledger, train_robust_acc=accuracy(adv_logits, y), **extra)
    aux["method_state"] = _counted(state.method_state, jax.lax.stop_gradient(adv_logits), y,
                                   ctx.num_classes)
    return loss, aux


def cfa_epoch_end(state, ctx, evaluator):
    """Turns this epoch's training robust accuracy into the next epoch's eps / beta."""
    del evaluator
    ms = state.method_state
    new = next_class_state(ms, completed_epochs(state, ctx), ctx.config.method)
    return state.replace(method_state=place_like(new, ms))


def cfa_summarize_state(method_state) -> dict:
    """The class-wise eps multipliers and beta' this epoch trained with, the convex KL share b,
    and this epoch's per-class training robust accuracy (t_c for the next epoch)."""
    ms = jax.device_get(method_state)
    return {"eps_multiplier": rounded(ms["eps_scale"]),
            "beta": rounded(ms["beta"]),
            "kl_share_b": rounded(convex_weight(ms["beta"])),
            "train_robust_acc": rounded(ratio(ms["correct"], ms["count"]))}


def validate_cfa(config) -> None:
    """Every CFA field, by name."""
    choice(config, "base", BASES)
    number(config, "beta", lambda v: v >= 0, "must be >= 0 (official: 6)")
    number(config, "lambda1", lambda v: v > 0, "must be > 0 (official: 0.5)")
    number(config, "lambda2", lambda v: v >= 0, "must be >= 0 (official: 0.5)")
    flag(config, "ccm")
    flag(config, "ccr")
    epoch_count(config, "begin", "the class-wise calibration starts")
    choice(config, "trades_scale", TRADES_SCALES)


register(Method(
    "cfa",
    cfa_loss,
    init_state=cfa_init_state,
    epoch_end=cfa_epoch_end,
    validate=validate_cfa,
    summarize_state=cfa_summarize_state,
    defaults=dict(CFA_DEFAULTS),
    description="CFA class-wise calibrated margins and regularisation (Wei et al. 2023)",
    starts_at={"begin": "the class-wise calibration starts"},
))
