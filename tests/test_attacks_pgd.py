"""hamjax.attacks.pgd_attack (pgd, fgsm): threat-model invariants (hypothesis), closed-form
optima on linear models, kappa / cross_step / early-stop semantics on a constructed case, and a
real attack."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_models import toy_data, train_mlp

from hamjax.attacks import fgsm, per_example_loss, pgd, random_init

SHAPE = (6, 4, 4, 1)  # batch of 6 tiny images
D = 16
CLASSES = 3
W3 = jax.random.normal(jax.random.PRNGKey(0), (D, CLASSES))
HYP = settings(max_examples=12, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow])


def linear(w, b=None):
    def logits_fn(x):
        out = x.reshape(x.shape[0], -1) @ w
        return out if b is None else out + b
    return logits_fn


@functools.cache
def _jitted_pgd(norm, loss, descend, random_start, init, steps, scalar_eps):
    """One compile per static config; data, eps, step sizes and masks are traced."""
    def run(x, y, key, eps, step, mask):
        return pgd(linear(W3), x, y, key, eps=eps, step_size=step, steps=steps, norm=norm,
                   loss=loss, descend=descend, random_start=random_start, init=init,
                   step_mask=mask)
    del scalar_eps  # part of the cache key only: a 0-d eps traces differently
    return jax.jit(run)


def _data(seed, edge_fraction=0.3):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, SHAPE).astype(np.float32)
    edge = rng.uniform(size=SHAPE) < edge_fraction  # pixels on the box faces test clipping
    x = np.where(edge, rng.integers(0, 2, SHAPE).astype(np.float32), x)
    y = rng.integers(0, CLASSES, SHAPE[0]).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def _size(delta, norm):
    flat = np.asarray(delta, np.float64).reshape(delta.shape[0], -1)
    return np.abs(flat).max(-1) if norm == "linf" else np.sqrt((flat ** 2).sum(-1))


@HYP
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["linf", "l2"]),
       loss=st.sampled_from(["ce", "cw", "kl"]), descend=st.booleans(),
       random_start=st.booleans(), init=st.sampled_from(["uniform", "normal"]),
       scalar_eps=st.booleans(), eps_scale=st.sampled_from([0.0, 1e-4, 0.03, 0.3, 2.0]))
def test_pgd_stays_in_ball_box_and_respects_mask(seed, norm, loss, descend, random_start, init,
                                                 scalar_eps, eps_scale):
    x, y = _data(seed)
    rng = np.random.default_rng(seed + 1)
    if scalar_eps:
        eps = jnp.float32(eps_scale)
    else:  # per example, one row pinned to eps = 0
        eps = jnp.asarray(rng.uniform(0, eps_scale, SHAPE[0]), jnp.float32).at[0].set(0.0)
    mask = jnp.asarray(rng.uniform(size=SHAPE[0]) < 0.7).at[1].set(False)
    step = 0.5 * eps + 0.01
    run = _jitted_pgd(norm, loss, descend, random_start, init, 3, scalar_eps)
    x_adv, info = run(x, y, jax.random.PRNGKey(seed), eps, step, mask)
    x_adv = np.asarray(x_adv)
    eps_b = np.broadcast_to(np.asarray(eps), (SHAPE[0],))
    assert np.all(_size(x_adv - np.asarray(x), norm) <= eps_b + 1e-6)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    m = np.asarray(mask)
    np.testing.assert_array_equal(x_adv[~m], np.asarray(x)[~m])  # masked rows never move
    assert not np.asarray(info.active)[~m].any()


def test_masked_rows_keep_x_init():
    x, y = _data(3)
    x_init = jnp.clip(x + 0.01, 0, 1)
    mask = jnp.array([True, False, True, False, True, False])
    x_adv, _ = pgd(linear(W3), x, y, jax.random.PRNGKey(0), eps=0.05, step_size=0.02, steps=3,
                   x_init=x_init, step_mask=mask)
    x_adv, x_init, m = np.asarray(x_adv), np.asarray(x_init), np.asarray(mask)
    np.testing.assert_array_equal(x_adv[~m], x_init[~m])
    assert not np.allclose(x_adv[m], x_init[m])


@functools.cache
def _jitted_descend(norm):
    def run(x, y, eps):
        return pgd(linear(0.3 * W3), x, y, None, eps=eps, step_size=eps / 8, steps=8, norm=norm,
                   loss="ce", descend=True, random_start=False)
    return jax.jit(run)


@HYP
@given(seed=st.integers(0, 2**16), norm=st.sampled_from(["linf", "l2"]),
       eps=st.floats(1e-3, 0.1))
def test_descend_never_raises_ce(seed, norm, eps):
    x, y = _data(seed)
    x_adv, _ = _jitted_descend(norm)(x, y, jnp.float32(eps))
    f = linear(0.3 * W3)
    before = per_example_loss("ce", f(x), y)
    after = per_example_loss("ce", f(x_adv), y)
    assert np.all(np.asarray(after) <= np.asarray(before) + 1e-6)


def _binary_problem(seed, batch=8, center=False):
    """Two-class linear model; returns (logits_fn, x, y, d = w_other - w_true per example)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, 2)).astype(np.float32)
    x = rng.uniform(0.4, 0.6, (batch, 4, 4, 1)) if center else rng.uniform(0, 1, (batch, 4, 4, 1))
    y = rng.integers(0, 2, batch)
    d = np.where(y[:, None] == 0, w[:, 1] - w[:, 0], w[:, 0] - w[:, 1])
    return linear(jnp.asarray(w)), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), d


def _margin(x, d):
    return (np.asarray(x, np.float64).reshape(x.shape[0], -1) * d).sum(-1)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_linf_matches_closed_form_on_linear_model(loss):
    logits_fn, x, y, d = _binary_problem(0)
    eps = jnp.asarray(np.linspace(0.01, 0.3, x.shape[0]), jnp.float32)  # per-example eps
    x_adv, _ = pgd(logits_fn, x, y, jax.random.PRNGKey(1), eps=eps, step_size=eps / 4, steps=12,
                   loss=loss)
    xf = np.asarray(x).reshape(x.shape[0], -1)
    best = np.clip(xf + np.asarray(eps)[:, None] * np.sign(d), 0, 1)  # box-clipped corner
    np.testing.assert_allclose(_margin(x_adv, d), (best * d).sum(-1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(x_adv).reshape(x.shape[0], -1), best, atol=1e-6)


def test_pgd_l2_matches_closed_form_on_linear_model():
    logits_fn, x, y, d = _binary_problem(1, center=True)  # eps small: the box does not bind
    eps = 0.1
    for random_start in (False, True):
        x_adv, _ = pgd(logits_fn, x, y, jax.random.PRNGKey(2), eps=eps, step_size=eps / 4,
                       steps=40, norm="l2", random_start=random_start)
        opt = _margin(x, d) + eps * np.linalg.norm(d, axis=-1)
        np.testing.assert_allclose(_margin(x_adv, d), opt, rtol=1e-3, atol=1e-4)


def test_fgsm_is_one_signed_step():
    logits_fn, x, y, d = _binary_problem(2)
    x_adv, info = fgsm(logits_fn, x, y, jax.random.PRNGKey(0), eps=0.05)
    best = np.clip(np.asarray(x).reshape(x.shape[0], -1) + 0.05 * np.sign(d), 0, 1)
    np.testing.assert_allclose(np.asarray(x_adv).reshape(x.shape[0], -1), best, atol=1e-6)
    assert info.kappa.shape == (x.shape[0],)


# Constructed case: logits = [c_b, sum(x)], label 0, x = 0.5 everywhere (sum 8). Each linf step
# of size 0.01 raises sum(x) by 16 * 0.01 = 0.16, so with c_b = 8 + 0.16 (k_b - 0.5) example b is
# first misclassified at iterate x_{k_b}.
ALPHA, STEPS = 0.01, 10
CROSS = np.array([0, 1, 3, 9, 10, 11, 25])


def _crossing_case():
    c = jnp.asarray(8.0 + 16 * ALPHA * (CROSS - 0.5), jnp.float32)

    def logits_fn(x):
        return jnp.stack([c, x.reshape(x.shape[0], -1).sum(-1)], axis=-1)

    x = jnp.full((len(CROSS), 4, 4, 1), 0.5, jnp.float32)
    return logits_fn, x, jnp.zeros(len(CROSS), jnp.int32)


@pytest.mark.parametrize("final_eval", [True, False])
def test_kappa_and_cross_step(final_eval):
    logits_fn, x, y = _crossing_case()
    _, info = pgd(logits_fn, x, y, None, eps=0.4, step_size=ALPHA, steps=STEPS,
                  random_start=False, final_eval=final_eval)
    np.testing.assert_array_equal(info.kappa, np.minimum(CROSS, STEPS))
    seen = STEPS if final_eval else STEPS - 1  # last iterate whose prediction was looked at
    expected = np.where(CROSS <= seen, CROSS, STEPS + 1)
    np.testing.assert_array_equal(info.cross_step, expected)
    success_at = STEPS if final_eval else STEPS - 1
    np.testing.assert_array_equal(info.success, CROSS <= success_at)


@pytest.mark.parametrize("tau", [0, 2])
def test_early_stop_tau(tau):
    logits_fn, x, y = _crossing_case()
    x_adv, info = pgd(logits_fn, x, y, None, eps=0.4, step_size=ALPHA, steps=STEPS,
                      random_start=False, early_stop_tau=tau)
    moved_steps = np.minimum(CROSS + tau, STEPS)  # stops tau steps after first misclassified
    sums = np.asarray(x_adv).reshape(len(CROSS), -1).sum(-1)
    np.testing.assert_allclose(sums, 8.0 + 16 * ALPHA * moved_steps, atol=1e-4)
    np.testing.assert_array_equal(info.active, CROSS + tau >= STEPS)


def test_pgd_lowers_accuracy_of_trained_model():
    x, y = map(jnp.asarray, toy_data())
    logits_fn = train_mlp(x, y)
    clean = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
    assert clean > 0.9
    x_adv, info = jax.jit(lambda x, y, k: pgd(logits_fn, x, y, k, eps=0.03, step_size=0.0075,
                                               steps=10))(x, y, jax.random.PRNGKey(0))
    robust = float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y))
    assert robust < clean - 0.3
    np.testing.assert_array_equal(np.asarray(info.success),
                                  np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_lies_in_ball(norm):
    x, _ = _data(5)
    eps = jnp.asarray([0.0, 1e-5, 1e-3, 0.03, 0.3, 1.0], jnp.float32)
    for init in ("uniform", "normal"):
        start = random_init(jax.random.PRNGKey(0), x, eps.reshape(-1, 1, 1, 1), norm, init)
        assert np.all(_size(np.asarray(start - x), norm) <= np.asarray(eps) + 1e-6)
        assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0


def test_uniform_start_spans_the_linf_ball_and_pgd_starts_there():
    """Madry's start is x + U(-eps, eps) per pixel, the whole ball (away from the box faces
    nothing is clipped: std eps / sqrt(3)), and pgd's iterates begin at it (0 steps return it)."""
    x = jnp.full((64, 4, 4, 1), 0.5, jnp.float32)
    y = jnp.zeros((64,), jnp.int32)
    eps, key = 0.1, jax.random.PRNGKey(4)
    start = np.asarray(random_init(key, x, jnp.float32(eps), "linf", "uniform")) - 0.5
    assert start.max() > 0.98 * eps and start.min() < -0.98 * eps
    np.testing.assert_allclose(start.std(), eps / np.sqrt(3.0), rtol=0.05)
    assert abs(start.mean()) < 0.05 * eps
    x_adv, _ = pgd(linear(W3), x, y, key, eps=eps, step_size=0.01, steps=0)
    np.testing.assert_allclose(np.asarray(x_adv) - 0.5, start, atol=1e-7)
