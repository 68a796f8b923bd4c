"""HAM's relatives on its PGD machinery: GAIRAT (Zhang et al. 2021) and FAT (Zhang et al. 2020).

Both rank adversarial examples by how soon PGD pushes them across the decision boundary, as HAM
does: GAIRAT re-weights the loss by kappa (iterates still classified correctly), FAT stops
moving an example `tau` steps after it crosses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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
from hamjax.validation import is_int, is_number, require

Array = jax.Array

GAIRAT_DEFAULTS: dict[str, Any] = {
    "gair_lambda": -1.0,
    # First 0-based epoch with kappa weights (uniform before). GAIRAT's code weights when
    # (epoch + 1) >= begin_epoch, so its `--begin_epoch 60` (120 epochs) is 59 here.
    "begin_epoch": 59,
}
FAT_DEFAULTS: dict[str, Any] = {
    # Extra steps after crossing. FAT's code raises tau 0 -> 1 -> 2 over training
    # (`--dynamictau`); here tau is fixed for the whole run.
    "tau": 0,
}


def _get(config, name: str, defaults: dict[str, Any]) -> Any:
    value = config.method.get(name, None)
    return defaults[name] if value is None else value


def gair_weights(kappa: Array, steps: int, lam: float, mask: Array | None = None) -> Array:
    """GAIRAT's Tanh weights w = (tanh(lambda + 5 (1 - 2 kappa / K)) + 1) / 2, normalised to
    mean 1 over the rows in `mask` (0 elsewhere).

    Low kappa (crossed early, close to the boundary) gets a large weight. GAIRAT's code writes
    5 (K//2 - kappa) / (K//2), the same for even K (K = 10 everywhere).
    """
    kappa = jnp.asarray(kappa, jnp.float32)
    raw = (jnp.tanh(lam + 5.0 * (1.0 - 2.0 * kappa / steps)) + 1.0) / 2.0
    mask = jnp.ones(kappa.shape, bool) if mask is None else mask
    raw = jnp.where(mask, raw, 0.0)
    count = jnp.sum(mask).astype(jnp.float32)
    return raw * count / jnp.maximum(jnp.sum(raw), jnp.finfo(jnp.float32).tiny)


def gairat_loss(params, state, batch, rng, ctx):
    """Kappa-weighted CE over PGD examples; uniform weights before `method.begin_epoch`."""
    x, y = batch["image"], batch["label"]
    x_adv, info = train_attack(ctx, params, state.batch_stats, x, y, rng)
    logits, stats = forward(ctx, params, state.batch_stats, x_adv, bn_mode="train")
    epoch = state.step // ctx.steps_per_epoch
    weights = gair_weights(
        info.kappa, ctx.config.attack.steps, _get(ctx.config, "gair_lambda", GAIRAT_DEFAULTS)
    )
    begin = _get(ctx.config, "begin_epoch", GAIRAT_DEFAULTS)
    weights = jnp.where(epoch >= begin, weights, 1.0)
    loss = jnp.mean(cross_entropy(logits, y) * weights)
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps) + training_ledger(x.shape[0])
    return loss, step_aux(
        stats, ledger, train_robust_acc=accuracy(logits, y), mean_kappa=jnp.mean(info.kappa),
        max_weight=jnp.max(weights),
    )


def fat_adversary(ctx, params, batch_stats, x, y, rng):
    """FAT's early-stopped PGD: an example stops `method.tau` steps after it is misclassified."""
    tau = int(_get(ctx.config, "tau", FAT_DEFAULTS))
    return train_attack(ctx, params, batch_stats, x, y, rng, early_stop_tau=tau)


def fat_loss(params, state, batch, rng, ctx):
    """CE on friendly (early-stopped) PGD examples.

    Under jit a stopped example is masked, not removed: every step still runs on all B rows, so
    the ledger counts K*B attack passes, as executed; FAT's saving would need bucketing as HAM's.
    """
    x, y = batch["image"], batch["label"]
    x_adv, info = fat_adversary(ctx, params, state.batch_stats, x, y, rng)
    logits, stats = forward(ctx, params, state.batch_stats, x_adv, bn_mode="train")
    loss = jnp.mean(cross_entropy(logits, y))
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps) + training_ledger(x.shape[0])
    return loss, step_aux(
        stats, ledger, train_robust_acc=accuracy(logits, y),
        stopped_fraction=1.0 - jnp.mean(info.active.astype(jnp.float32)),
    )


def _validate_gairat(config) -> None:
    lam = _get(config, "gair_lambda", GAIRAT_DEFAULTS)
    require(is_number(lam), "method.gair_lambda", lam, "needs a number (default -1.0)")
    begin = _get(config, "begin_epoch", GAIRAT_DEFAULTS)
    require(is_int(begin) and begin >= 0, "method.begin_epoch", begin, "needs an int >= 0")


def _validate_fat(config) -> None:
    tau = _get(config, "tau", FAT_DEFAULTS)
    require(is_int(tau) and tau >= 0, "method.tau", tau, "needs an int >= 0 (FAT: 0 to 2)")


register(
    Method(
        "gairat", gairat_loss, validate=_validate_gairat, defaults=dict(GAIRAT_DEFAULTS),
        description="GAIRAT: geometry-aware instance-reweighted AT (Zhang et al. 2021)",
    )
)
register(
    Method(
        "fat", fat_loss, validate=_validate_fat, defaults=dict(FAT_DEFAULTS),
        description="FAT: friendly adversarial training, early-stopped PGD (Zhang et al. 2020)",
    )
)
