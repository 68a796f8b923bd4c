"""MART against the reference's hand-computed case, a NumPy transcription of the official
`mart_loss` (random inputs, loss and gradient), and the BN modes of its train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_frl import make_batch
from toy_models import TinyNet

from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.methods.common import forward, train_attack
from hamjax.methods.mart import mart_objective, mart_terms
from hamjax.state import create_train_state

BETA = 6.0


def np_mart_loss(clean_logits, adv_logits, y, beta):
    """The official `mart_loss` after the attack, line by line in float64 NumPy."""
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    batch = len(y)
    adv_probs = softmax(adv_logits)
    tmp1 = np.argsort(adv_probs, axis=1, kind="stable")[:, -2:]
    new_y = np.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    log_softmax_adv = adv_logits - adv_logits.max(1, keepdims=True)
    log_softmax_adv -= np.log(np.exp(log_softmax_adv).sum(1, keepdims=True))
    ce = -log_softmax_adv[np.arange(batch), y].mean()
    nll = -np.log(1.0001 - adv_probs + 1e-12)[np.arange(batch), new_y].mean()
    nat_probs = softmax(clean_logits)
    true_probs = nat_probs[np.arange(batch), y]
    kl = np.sum(nat_probs * (np.log(nat_probs) - np.log(adv_probs + 1e-12)), axis=1)
    loss_robust = (1.0 / batch) * np.sum(kl * (1.0000001 - true_probs))
    return ce + nll + beta * loss_robust


def test_hand_computed_case():
    """y=0, p'=[.5,.3,.2], p=[.8,.1,.1], beta=6 (the reference's numbers)."""
    adv = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    clean = jnp.log(jnp.array([[0.8, 0.1, 0.1]]))
    y = jnp.array([0])
    t = mart_terms(clean, adv, y)
    np.testing.assert_allclose(float(t["bce"][0]), 1.049679, atol=2e-6)
    np.testing.assert_allclose(float(t["kl"][0]), 0.196827, atol=2e-6)
    np.testing.assert_allclose(float(t["kl"][0] * t["weight"][0]), 0.039365, atol=2e-6)
    np.testing.assert_allclose(float(mart_objective(clean, adv, y, BETA)), 1.285872, atol=4e-6)


def test_matches_numpy_transcription_on_random_inputs():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(32, 7)) * 2
    adv = rng.normal(size=(32, 7)) * 2
    y = rng.integers(0, 7, 32)
    y[:8] = np.argmax(adv[:8], 1)  # some rows where the top adversarial class is the label
    for beta in (0.0, 5.0, BETA):
        got = float(mart_objective(jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32),
                                   jnp.asarray(y), beta))
        np.testing.assert_allclose(got, np_mart_loss(clean, adv, y, beta), rtol=2e-6)


def test_gradient_matches_numpy_finite_differences():
    """Nothing is detached: the gradient w.r.t. both logits (through the KL weight 1 - p_y too)
    equals central differences of the NumPy transcription."""
    rng = np.random.default_rng(1)
    clean, adv = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    y = rng.integers(0, 5, 4)
    grads = jax.grad(mart_objective, argnums=(0, 1))(
        jnp.asarray(clean, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(y), BETA)
    h = 1e-6
    for which, (base, got) in enumerate(zip((clean, adv), grads, strict=True)):
        expected = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            hi, lo = base.copy(), base.copy()
            hi[idx] += h
            lo[idx] -= h
            args_hi = (hi, adv) if which == 0 else (clean, hi)
            args_lo = (lo, adv) if which == 0 else (clean, lo)
            expected[idx] = (np_mart_loss(*args_hi, y, BETA) - np_mart_loss(*args_lo, y, BETA)) / (
                2 * h)
        np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


def make_mart_ctx():
    from test_frl import make_ctx

    return make_ctx("mart", beta=BETA)


def test_train_step_uses_train_bn_clean_first_and_the_normal_start_attack():
    """The step's loss is the objective on train-BN logits (clean forward first, its running
    statistics fed to the adversarial forward) at the CE-PGD examples from x + 0.001 N(0, 1)
    attacked in eval-BN."""
    ctx = make_mart_ctx()
    method = get_method("mart")
    state = create_train_state(ctx, method, seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
    x, y = batch["image"], batch["label"]
    rng = jax.random.PRNGKey(7)
    loss, aux = jax.jit(lambda p: method.loss_fn(p, state, batch, rng, ctx))(state.params)

    x_adv, _ = train_attack(ctx, state.params, state.batch_stats, x, y, rng, loss="ce",
                            init="normal")
    clean, stats = forward(ctx, state.params, state.batch_stats, x, bn_mode="train")
    adv, stats = forward(ctx, state.params, stats, x_adv, bn_mode="train")
    expected = np_mart_loss(np.asarray(clean, np.float64), np.asarray(adv, np.float64),
                            np.asarray(y), BETA)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(aux["batch_stats"]), jax.tree.leaves(stats), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # The attack is in eval-BN and starts from a 0.001-Gaussian: a uniform start differs.
    other, _ = train_attack(ctx, state.params, state.batch_stats, x, y, rng, loss="ce")
    assert not np.allclose(np.asarray(other), np.asarray(x_adv))
    assert ctx.config.attack.bn_mode == "eval"
    assert ctx.model is not None and isinstance(ctx.model, TinyNet)


def test_config_fields_and_validation():
    config = base_config()
    config.method = method_config("mart")
    assert config.method.beta == BETA
    validate_config(config)
    for bad in (-1.0, "6", True, float("inf")):
        config.method = method_config("mart", beta=bad)
        with pytest.raises(ConfigError, match=r"config\.method\.beta"):
            validate_config(config)
