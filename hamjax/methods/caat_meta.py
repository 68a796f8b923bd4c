"""CAAT's bi-level meta step (Meta-Weight-Net style): a differentiable virtual SGD step
W_hat(Omega), the composite loss of W_hat on a clean balanced meta batch, and an Adam step on
its gradient with respect to the router's weights Omega, every `meta_interval` steps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hamjax.methods.caat_objective import branch_terms, composite_loss, gates, perturbations
from hamjax.methods.caat_router import (
    class_proportion,
    make_meta_net,
    meta_features,
    meta_optimizer,
    route,
)
from hamjax.methods.common import attack_ledger, training_ledger
from hamjax.methods.frl import class_parameters, per_example_eps
from hamjax.metrics import Ledger

Array = jax.Array


def momentum_trace(opt_state) -> Any | None:
    """The momentum buffer inside the real optimiser's state (None without momentum)."""
    leaves = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
    traces = [s.trace for s in leaves if isinstance(s, optax.TraceState)]
    return traces[0] if traces else None


def virtual_sgd_step(params, grads, opt_state, lr, *, momentum: float, weight_decay: float):
    """W_hat = W - lr (mu buf + g + wd W): one step of `hamjax.optim`'s SGD, differentiable.

    PyTorch SGD (and `optim._sgd`): d = g + wd W; buf' = mu buf + d; W' = W - lr buf'. The real
    momentum buffer is read from opt_state; nothing is written back (it is a virtual step).
    """
    trace = momentum_trace(opt_state)
    if trace is None:
        trace = jax.tree.map(jnp.zeros_like, params)

    def step(w, g, buf):
        d = g + weight_decay * w
        if momentum:
            d = d + momentum * buf
        return w - lr * d

    return jax.tree.map(step, params, grads, trace)


def virtual_model(ctx, state, meta_params, train_inputs: tuple, lr):
    """W_hat(Omega): one virtual SGD step on the training batch's CAAT loss (Eq. 9).

    train_inputs = (x, y, x_adv, x_anti), the perturbations generated against W. BatchNorm uses
    batch statistics without updating the running ones (the official pseudo-model is in train
    mode and discarded); the meta-net also standardises with the batch's statistics (it is being
    trained).
    """
    mcfg = ctx.config.method
    ms = state.method_state
    x, y, x_adv, x_anti = train_inputs
    w0, w1, _ = class_parameters(ms["lambdas"], mcfg)
    net = make_meta_net(mcfg)
    proportion = class_proportion(ctx)

    def inner_loss(params):
        terms, _ = branch_terms(ctx, params, state.batch_stats, x, y, x_adv, x_anti,
                                bn_mode="batch")
        logits = terms.clean_logits
        if not mcfg.meta_feature_grad:
            logits = jax.lax.stop_gradient(logits)
        features = meta_features(logits, y, ms["class_loss_last"], proportion)
        weights, _ = route(net, meta_params, ms["meta_stats"], features, batch_stats=True)
        alpha, beta = gates(weights, mcfg.adv_weight_floor)
        return composite_loss(terms, w0[y], w1[y], alpha, beta, mcfg.beta)[0]

    grads = jax.grad(inner_loss)(state.params)
    train = ctx.config.train
    return virtual_sgd_step(state.params, grads, state.opt_state, lr,
                            momentum=float(train.momentum),
                            weight_decay=float(train.weight_decay))


def meta_objective(params, ctx, batch_stats, meta_inputs: tuple, lambdas) -> Array:
    """Composite loss (alpha = beta = 1) on the meta batch, with the meta batch's own w0, w1."""
    mcfg = ctx.config.method
    xm, ym, xm_adv, xm_anti = meta_inputs
    w0, w1, _ = class_parameters(lambdas, mcfg)
    terms, _ = branch_terms(ctx, params, batch_stats, xm, ym, xm_adv, xm_anti, bn_mode="batch")
    ones = jnp.ones_like(terms.ce)
    return composite_loss(terms, w0[ym], w1[ym], ones, ones, mcfg.beta)[0]


def meta_gradient(ctx, state, meta_params, train_inputs: tuple, meta_batch: tuple, rng, lr,
                  meta_perturbations: tuple | None = None):
    """(L_meta, dL_meta/dOmega) through the virtual step (Eq. 10).

    The meta batch's perturbations are generated against W_hat with the meta labels' own
    bounds (unless given) and, like every adversarial example, treated as data.
    """
    w_hat, pullback = jax.vjp(lambda mp: virtual_model(ctx, state, mp, train_inputs, lr),
                              meta_params)
    xm, ym = meta_batch
    lambdas = state.method_state["lambdas"]
    if meta_perturbations is None:
        _, _, mult = class_parameters(lambdas, ctx.config.method)
        eps = per_example_eps(ctx.config.attack.eps, mult, ym)
        meta_perturbations = perturbations(ctx, w_hat, state.batch_stats, xm, ym, eps, rng)
    inputs = (xm, ym, *meta_perturbations)
    loss, grad_w = jax.value_and_grad(meta_objective)(w_hat, ctx, state.batch_stats, inputs,
                                                      lambdas)
    (grad_meta,) = pullback(grad_w)
    return loss, grad_meta


def meta_due(step: Array, steps_per_epoch: int, interval: int) -> Array:
    """True at in-epoch batch indices interval-1, 2 interval-1, ... (official `(i+1) % 50`)."""
    return ((step % max(int(steps_per_epoch), 1)) + 1) % int(interval) == 0


def meta_update(state, batch: dict, rng, ctx) -> dict:
    """One Meta-Weight-Net update of the meta-net (Eqs. 9-10); returns the new method_state."""
    mcfg = ctx.config.method
    ms = state.method_state
    train_key, meta_key = jax.random.split(rng)
    x, y = batch["image"], batch["label"]
    _, _, mult = class_parameters(ms["lambdas"], mcfg)
    eps = per_example_eps(ctx.config.attack.eps, mult, y)
    x_adv, x_anti = perturbations(ctx, state.params, state.batch_stats, x, y, eps, train_key)
    lr = ctx.lr_fn(state.step)
    loss, grad = meta_gradient(ctx, state, ms["meta_params"], (x, y, x_adv, x_anti),
                               (batch["meta_image"], batch["meta_label"]), meta_key, lr)
    tx = meta_optimizer(mcfg)
    updates, opt_state = tx.update(grad, ms["meta_opt_state"], ms["meta_params"])
    return dict(
        ms,
        meta_params=optax.apply_updates(ms["meta_params"], updates),
        meta_opt_state=opt_state,
        meta_updates=ms["meta_updates"] + 1,
        meta_loss=loss.astype(jnp.float32),
        meta_grad_norm=optax.tree.norm(grad).astype(jnp.float32),
    )


def _meta_ledger(batch: int, meta_batch: int, steps: int) -> Ledger:
    """Approximate example passes of one meta update.

    Training batch: both attacks, the inner loss (3 forwards + backward) and the reverse pass
    through that backward (counted as 3 more forwards + backwards); meta batch: both attacks
    and the meta loss.
    """
    perturb = (attack_ledger(batch, steps, final_eval=True) + attack_ledger(batch, steps)
               + attack_ledger(meta_batch, steps, final_eval=True)
               + attack_ledger(meta_batch, steps))
    return perturb + training_ledger(batch, 6) + training_ledger(meta_batch, 3)


def caat_pre_step(state, batch, rng, ctx):
    """Runs `meta_update` when `meta_due` (lax.cond: no cost on the other steps)."""
    mcfg = ctx.config.method
    fire = meta_due(state.step, ctx.steps_per_epoch, mcfg.meta_interval)
    method_state = jax.lax.cond(
        fire, lambda ms: meta_update(state, batch, rng, ctx), lambda ms: ms, state.method_state)
    cost = _meta_ledger(batch["image"].shape[0], batch["meta_image"].shape[0],
                        ctx.config.attack.steps)
    f = fire.astype(jnp.float32)
    ledger = state.ledger + Ledger(forward=cost.forward * f, backward=cost.backward * f)
    return state.replace(method_state=method_state, ledger=ledger)
