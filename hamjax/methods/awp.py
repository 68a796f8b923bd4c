"""Adversarial weight perturbation (Wu et al. 2020) as an option of PGD-AT and TRADES.

`method.awp_gamma` > 0 turns it on (0: off, the method unchanged). Per step, as the official
code (csdongxian/AWP, `utils_awp.py`) runs it, inside the one jitted train step:

1. the adversarial examples come from the current weights w (the method's own attack);
2. a proxy copy of w takes one SGD step (rate `awp_proxy_lr`, no momentum or weight decay) on
   -L, the method's own training loss, BN in train mode (the proxy's BN statistics are thrown
   away), so d = proxy - w = awp_proxy_lr * grad L;
3. per weight tensor with ndim > 1 (conv and dense kernels; BN scales and biases stay):
   v = ||w||_F / (||d||_F + 1e-20) * d;
4. the training loss and its gradient are taken at w + gamma v, where the optimiser also
   evaluates weight decay (PyTorch steps the optimiser while the model holds w + gamma v);
5. the update is applied to w (the official code subtracts gamma v again after the step).

Steps before epoch `awp_warmup_epochs` train without the perturbation (and skip the proxy pass).
Ledger: the proxy's forward and backward passes are counted (1x the batch for PGD-AT, 2x for
TRADES' two forwards).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from hamjax.errors import ConfigError
from hamjax.metrics import Ledger

Array = jax.Array
Params = Any

NORM_EPS = 1e-20  # the official code's guard in ||w|| / (||d|| + 1e-20)

# Official defaults: AT-AWP gamma 0.01, warm-up 0, proxy lr 0.01; TRADES-AWP gamma 0.005,
# AWP from epoch 10, proxy lr = the training lr (0.1). gamma 0 keeps the plain method.
PGD_AT_DEFAULTS = {"awp_gamma": 0.0, "awp_warmup_epochs": 0, "awp_proxy_lr": 0.01}
TRADES_DEFAULTS = {"awp_gamma": 0.0, "awp_warmup_epochs": 10, "awp_proxy_lr": 0.1}


def is_perturbed(leaf: Array) -> bool:
    """The official rule: only tensors with ndim > 1 (conv and dense kernels) are perturbed."""
    return jnp.ndim(leaf) > 1


def weight_perturbation(params: Params, direction: Params, gamma) -> Params:
    """gamma * ||w|| / (||d|| + 1e-20) * d per perturbed tensor (Frobenius norms), 0 elsewhere."""

    def one(w, d):
        if not is_perturbed(w):
            return jnp.zeros_like(w)
        w32, d32 = w.astype(jnp.float32), d.astype(jnp.float32)
        scale = jnp.linalg.norm(w32.ravel()) / (jnp.linalg.norm(d32.ravel()) + NORM_EPS)
        return (gamma * scale * d32).astype(w.dtype)

    return jax.tree.map(one, params, direction)


def proxy_direction(objective: Callable, params: Params, proxy_lr: float) -> Params:
    """d = proxy - w after one SGD step of the proxy on -objective (ascent on the loss)."""
    grads = jax.grad(lambda p: objective(p)[0])(jax.lax.stop_gradient(params))
    return jax.tree.map(lambda g: proxy_lr * g, grads)


def awp_settings(config) -> tuple[float, int, float]:
    """(gamma, warm-up epochs, proxy lr) from `config.method` (0 gamma when absent)."""
    method = config.method
    return (float(method.get("awp_gamma", 0.0)), int(method.get("awp_warmup_epochs", 0)),
            float(method.get("awp_proxy_lr", 0.01)))


def with_awp(objective: Callable, params: Params, ctx, step, proxy_passes: int,
             batch: int) -> tuple[Array, Any, dict, Ledger]:
    """objective(params) -> (loss, aux), evaluated at w + gamma v when AWP is on and warm.

    Returns (loss, aux, extra step aux, extra ledger). The loss's gradient w.r.t. `params` is the
    gradient at the perturbed point (the perturbation is a constant shift); the extra aux carries
    `optimizer_params` (where weight decay is evaluated) and the `awp_active` metric.
    """
    gamma, warmup, proxy_lr = awp_settings(ctx.config)
    if gamma <= 0.0:
        loss, aux = objective(params)
        return loss, aux, {}, Ledger.zeros()
    active = step // ctx.steps_per_epoch >= warmup

    def perturbation():
        return weight_perturbation(params, proxy_direction(objective, params, proxy_lr), gamma)

    def none():
        return jax.tree.map(jnp.zeros_like, params)

    shift = jax.lax.stop_gradient(jax.lax.cond(active, perturbation, none))
    perturbed = jax.tree.map(lambda w, v: w + v, params, shift)
    loss, aux = objective(perturbed)
    passes = jnp.where(active, float(proxy_passes * batch), 0.0)
    extra = {"optimizer_params": jax.lax.stop_gradient(perturbed),
             "awp_active": active.astype(jnp.float32)}
    return loss, aux, extra, Ledger(forward=passes, backward=passes)


def validate_awp(config) -> None:
    """Rejects bad AWP fields naming the field and the fix."""
    method = config.method
    gamma = method.get("awp_gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
        raise ConfigError(f"config.method.awp_gamma={gamma!r}: needs a number in [0, 1) "
                          "(0: off; AT-AWP 0.01, TRADES-AWP 0.005)")
    warmup = method.get("awp_warmup_epochs", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"config.method.awp_warmup_epochs={warmup!r}: needs an int >= 0 "
                          "(epochs trained before AWP starts; TRADES-AWP 10)")
    lr = method.get("awp_proxy_lr", 0.01)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"config.method.awp_proxy_lr={lr!r}: needs a number > 0 (the proxy's "
                          "SGD step; official 0.01)")
