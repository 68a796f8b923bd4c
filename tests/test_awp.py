"""AWP (option of pgd_at and trades): the reference's hand case, and one jitted train step against
the official order rebuilt by hand (attack at w, proxy gradient, per-kernel rescaling in NumPy,
gradient and weight decay at w + gamma v, update applied to w, BN statistics of the perturbed
forward)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_frl import make_batch, make_ctx

from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.methods.awp import weight_perturbation
from hamjax.methods.baselines import trades_adversary, trades_terms
from hamjax.methods.common import cross_entropy, forward, train_attack
from hamjax.optim import make_optimizer
from hamjax.state import create_train_state
from hamjax.train.step import make_train_step

LR, WD, MOMENTUM, GAMMA = 0.1, 0.5, 0.9, 0.01


def test_hand_computed_case():
    """w=[[3,4]], dL/dw=[[1,0]], gamma=0.01 -> v=[[5,0]], w + gamma v = [[3.05,4]]; 1-D
    parameters (BN scales, biases) are not perturbed."""
    params = {"kernel": jnp.array([[3.0, 4.0]]), "bias": jnp.array([1.0, 2.0])}
    direction = {"kernel": jnp.array([[1.0, 0.0]]), "bias": jnp.array([5.0, 5.0])}
    shift = weight_perturbation(params, direction, GAMMA)
    perturbed = jax.tree.map(lambda w, v: w + v, params, shift)
    np.testing.assert_allclose(np.asarray(perturbed["kernel"]), [[3.05, 4.0]], rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(perturbed["bias"]), [1.0, 2.0])
    # The proxy's learning rate cancels in the rescaling.
    scaled = weight_perturbation(params, jax.tree.map(lambda d: 0.01 * d, direction), GAMMA)
    np.testing.assert_allclose(np.asarray(scaled["kernel"]), np.asarray(shift["kernel"]),
                               rtol=1e-6)


def awp_ctx(name: str, **method):
    ctx = make_ctx(name, **method)
    train = ml_collections.ConfigDict(ctx.config.train.to_dict())
    train.weight_decay, train.lr, train.momentum = WD, LR, MOMENTUM
    return dataclasses.replace(ctx, tx=make_optimizer(train))


def pgd_at_objective(ctx, stats, x, y, rng, params):
    x_adv, _ = train_attack(ctx, params, stats, x, y, rng)

    def objective(p):
        logits, new_stats = forward(ctx, p, stats, x_adv, bn_mode="train")
        return jnp.mean(cross_entropy(logits, y)), new_stats

    return objective


def trades_objective(ctx, stats, x, y, rng, params):
    x_adv, _ = trades_adversary(ctx, params, stats, x, y, rng)
    beta = ctx.config.method.beta

    def objective(p):
        ce, kl, _, _, new_stats = trades_terms(ctx, p, stats, x, y, x_adv)
        return jnp.mean(ce) + beta * jnp.mean(kl), new_stats

    return objective


def expected_step(ctx, state, batch, build_objective, proxy_lr):
    """The official AWP order, the rescaling written in NumPy."""
    rng = jax.random.fold_in(state.rng, state.step)
    _, _, loss_rng = jax.random.split(rng, 3)
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    objective = build_objective(ctx, state.batch_stats, x, y, loss_rng, state.params)
    grads = jax.grad(lambda p: objective(p)[0])(state.params)

    def shift(w, g):
        w, d = np.asarray(w, np.float64), proxy_lr * np.asarray(g, np.float64)
        if w.ndim <= 1:
            return np.zeros_like(w)
        return GAMMA * np.linalg.norm(w) / (np.linalg.norm(d) + 1e-20) * d

    perturbed = jax.tree.map(lambda w, g: jnp.asarray(np.asarray(w) + shift(w, g), jnp.float32),
                             state.params, grads)
    (_, stats), grads_at = jax.value_and_grad(objective, has_aux=True)(perturbed)
    # SGD (first step: momentum buffer = gradient) with weight decay at w + gamma v, applied
    # to w.
    new = jax.tree.map(lambda w, g, wp: np.asarray(w) - LR * (np.asarray(g) + WD * np.asarray(wp)),
                       state.params, grads_at, perturbed)
    return new, stats


@pytest.mark.parametrize("name, build", [("pgd_at", pgd_at_objective),
                                         ("trades", trades_objective)])
def test_train_step_follows_the_official_order(name, build):
    ctx = awp_ctx(name, awp_gamma=GAMMA, awp_warmup_epochs=0, awp_proxy_lr=0.01)
    method = get_method(name)
    state = create_train_state(ctx, method, seed=0)
    batch = make_batch(2)
    new_state, metrics = jax.jit(make_train_step(ctx, method))(state, batch)
    want_params, want_stats = expected_step(ctx, state, batch, build, 0.01)
    assert float(metrics["awp_active"]) == 1.0
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want_params),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    for got, want in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(want_stats),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # The proxy pass is counted: PGD-AT 1x, TRADES 2x the batch, forward and backward.
    plain_ctx = awp_ctx(name)
    rows = batch["image"].shape[0] * (1 if name == "pgd_at" else 2)
    plain_state = create_train_state(plain_ctx, method, seed=0)
    plain_state, _ = jax.jit(make_train_step(plain_ctx, method))(plain_state, batch)
    assert float(new_state.ledger.forward - plain_state.ledger.forward) == rows
    assert float(new_state.ledger.backward - plain_state.ledger.backward) == rows


def test_warmup_epochs_train_without_the_perturbation():
    """Before awp_warmup_epochs the step equals the plain method's, bit for bit."""
    method = get_method("pgd_at")
    batch = make_batch(4)
    results = []
    for fields in ({"awp_gamma": GAMMA, "awp_warmup_epochs": 1}, {}):
        ctx = awp_ctx("pgd_at", **fields)
        state = create_train_state(ctx, method, seed=0)
        results.append(jax.jit(make_train_step(ctx, method))(state, batch)[0])
    for a, b in zip(jax.tree.leaves(results[0].params), jax.tree.leaves(results[1].params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field, value", [("awp_gamma", -0.1), ("awp_gamma", 1.5),
                                          ("awp_warmup_epochs", -1), ("awp_warmup_epochs", 1.5),
                                          ("awp_proxy_lr", 0.0)])
def test_validation_names_the_field(field, value):
    for name in ("pgd_at", "trades"):
        config = base_config()
        fields = dict(method_config(name))
        fields[field] = value
        config.method = ml_collections.ConfigDict(fields)
        with pytest.raises(ConfigError, match=rf"config\.method\.{field}"):
            validate_config(config)
