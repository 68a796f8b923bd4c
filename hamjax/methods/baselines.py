"""Baselines: standard training, PGD-AT (Madry et al. 2018), TRADES (Zhang et al. 2019)."""

from __future__ import annotations

import jax.numpy as jnp

from hamjax.attacks.losses import kl_divergence
from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.awp import PGD_AT_DEFAULTS, TRADES_DEFAULTS, validate_awp, with_awp
from hamjax.methods.common import (
    accuracy,
    attack_ledger,
    cross_entropy,
    forward,
    step_aux,
    train_attack,
    training_ledger,
)


def standard_loss(params, state, batch, rng, ctx):
    """Clean cross-entropy: the no-defence reference."""
    del rng
    x, y = batch["image"], batch["label"]
    logits, stats = forward(ctx, params, state.batch_stats, x, bn_mode="train")
    loss = jnp.mean(cross_entropy(logits, y))
    ledger = training_ledger(x.shape[0])
    return loss, step_aux(stats, ledger, train_acc=accuracy(logits, y))


def pgd_at_loss(params, state, batch, rng, ctx):
    """Cross-entropy on PGD adversarial examples (the attack in `config.attack`); with
    `method.awp_gamma` > 0 taken at AWP's perturbed weights (`hamjax.methods.awp`)."""
    x, y = batch["image"], batch["label"]
    x_adv, info = train_attack(ctx, params, state.batch_stats, x, y, rng)

    def objective(p):
        logits, stats = forward(ctx, p, state.batch_stats, x_adv, bn_mode="train")
        return jnp.mean(cross_entropy(logits, y)), (logits, stats)

    loss, (logits, stats), extra, awp_ledger = with_awp(objective, params, ctx, state.step,
                                                         proxy_passes=1, batch=x.shape[0])
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps) + training_ledger(x.shape[0])
    return loss, _with_extra(step_aux(
        stats, ledger + awp_ledger, train_robust_acc=accuracy(logits, y),
        mean_kappa=jnp.mean(info.kappa)), extra)


def _with_extra(aux: dict, extra: dict) -> dict:
    """Adds AWP's `optimizer_params` and metrics to a step aux."""
    aux = dict(aux)
    if "optimizer_params" in extra:
        aux["optimizer_params"] = extra["optimizer_params"]
        aux["metrics"] = {**aux["metrics"], "awp_active": extra["awp_active"]}
    return aux


def trades_terms(ctx, params, batch_stats, x, y, x_adv, eps_weights=None):
    """TRADES' two terms per example: clean CE and KL(p(x) || p(x_adv)), BN in train mode.

    Two forward passes, as the reference code does (clean first, then adversarial), each
    updating the running statistics.
    """
    del eps_weights
    clean_logits, stats = forward(ctx, params, batch_stats, x, bn_mode="train")
    adv_logits, stats = forward(ctx, params, stats, x_adv, bn_mode="train")
    ce = cross_entropy(clean_logits, y)
    kl = kl_divergence(adv_logits, y, clean_logits=clean_logits)
    return ce, kl, clean_logits, adv_logits, stats


def trades_adversary(ctx, params, batch_stats, x, y, rng, eps=None):
    """TRADES' inner maximisation: PGD on KL from x + 0.001 N(0, 1)."""
    overrides = {"loss": "kl", "init": "normal"}
    if eps is not None:
        overrides["eps"] = eps
    return train_attack(ctx, params, batch_stats, x, y, rng, **overrides)


def trades_loss(params, state, batch, rng, ctx):
    """CE(f(x), y) + beta * KL(f(x) || f(x')), x' from PGD on the KL."""
    x, y = batch["image"], batch["label"]
    x_adv, _ = trades_adversary(ctx, params, state.batch_stats, x, y, rng)
    beta = ctx.config.method.beta

    def objective(p):
        ce, kl, clean_logits, adv_logits, stats = trades_terms(
            ctx, p, state.batch_stats, x, y, x_adv)
        return jnp.mean(ce) + beta * jnp.mean(kl), (kl, clean_logits, adv_logits, stats)

    loss, (kl, clean_logits, adv_logits, stats), extra, awp_ledger = with_awp(
        objective, params, ctx, state.step, proxy_passes=2, batch=x.shape[0])
    # The attack's clean forward (its KL target) is one more forward pass without backward.
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps, final_eval=True)
    ledger = ledger + training_ledger(x.shape[0], 2) + awp_ledger
    return loss, _with_extra(step_aux(
        stats,
        ledger,
        train_acc=accuracy(clean_logits, y),
        train_robust_acc=accuracy(adv_logits, y),
        kl=jnp.mean(kl),
    ), extra)


def _validate_trades(config) -> None:
    beta = config.method.get("beta")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < float("inf"):
        raise ConfigError(f"config.method.beta={beta!r}: TRADES needs beta >= 0 (paper: 6.0)")
    validate_awp(config)


register(Method("standard", standard_loss, description="clean cross-entropy"))
register(Method("pgd_at", pgd_at_loss, validate=validate_awp, defaults=dict(PGD_AT_DEFAULTS),
                description="PGD adversarial training (Madry et al.); AWP with awp_gamma > 0"))
register(
    Method("trades", trades_loss, validate=_validate_trades,
           defaults={"beta": 6.0, **TRADES_DEFAULTS},
           description="TRADES (Zhang et al.); AWP with awp_gamma > 0")
)
