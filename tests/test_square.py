"""Square Attack: eps ball, box, the reference p schedule, a linear model it must break."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax.attacks.square_attack import p_selection, square, window_sizes

B, H, W, C, K = 6, 4, 4, 3, 3
D = H * W * C
N_QUERIES = 150


def _linear(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = jnp.asarray(rng.normal(size=(D, K)).astype(np.float32))
    return weights, (lambda x: x.reshape(x.shape[0], -1) @ weights)


@functools.cache
def _attack(loss: str = "margin"):
    """One jitted attack (eps and labels traced) shared by the tests, to keep compiles down."""
    _, logits_fn = _linear()
    return jax.jit(lambda x, y, k, e: square(logits_fn, x, y, k, eps=e, n_queries=N_QUERIES,
                                             loss=loss))


def _closed_form_min_eps(weights, x, y):
    """Minimal L_inf distance to misclassification of a linear model (box not binding)."""
    w = np.asarray(weights, np.float64)
    z = np.asarray(x, np.float64).reshape(B, -1) @ w
    zy = z[np.arange(B), y][:, None]
    l1 = np.abs(w[:, :, None] - w[:, None, :]).sum(0)[y]
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(np.arange(K)[None] == y[:, None], np.inf, (zy - z) / l1)
    return dist.min(-1)


def test_p_schedule_matches_reference():
    # Values of the reference p_selection (p_init=0.8, rescale_schedule=True), by hand:
    # it' = int(it / n_queries * 10000); thresholds 10, 50, 200, 500, 1000, 2000, 4000, ...
    n = 5000
    cases = {0: 0.8, 5: 0.8, 6: 0.4, 25: 0.4, 26: 0.2, 100: 0.2, 101: 0.1, 250: 0.1, 251: 0.05,
             500: 0.05, 501: 0.025, 1000: 0.025, 1001: 0.0125, 2000: 0.0125, 2001: 0.00625,
             3000: 0.00625, 3001: 0.003125, 4000: 0.003125, 4001: 0.8 / 512, 4999: 0.8 / 512}
    for it, p in cases.items():
        assert p_selection(it, n, 0.8) == pytest.approx(p), it
    assert p_selection(1, 100, 0.8) == pytest.approx(0.8 / 4)  # rescaled: int(1/100*1e4) = 100
    # square side for 32x32x3 at the start: round(sqrt(0.8 * 3072 / 3)) = 29, and >= 1 always
    sizes = window_sizes(5000, 0.8, 32, 32, 3)
    assert sizes[0] == 29 and sizes[6] == round((0.4 * 1024) ** 0.5) and sizes.min() >= 1


def test_stays_in_ball_and_box_per_example_eps():
    _, logits_fn = _linear()
    x = jax.random.uniform(jax.random.key(1), (B, H, W, C))
    x = x.at[:, 0].set(jnp.round(x[:, 0]))  # a row on the box faces: clipping must bite
    y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
    eps = jnp.asarray([0.0, 0.01, 0.03, 0.1, 0.3, 0.5], jnp.float32)
    x_adv, robust = _attack()(x, y, jax.random.key(0), eps)
    x_adv, x = np.asarray(x_adv), np.asarray(x)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    linf = np.abs(x_adv - x).reshape(B, -1).max(-1)
    assert np.all(linf <= np.asarray(eps) + 1e-7)
    assert bool(robust[0]) and np.array_equal(x_adv[0], x[0])  # eps = 0 cannot move
    pred = np.argmax(logits_fn(jnp.asarray(x_adv)), -1)
    np.testing.assert_array_equal(pred == np.asarray(y), np.asarray(robust))


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_breaks_linear_model_below_closed_form_eps(loss):
    """At eps = 2 x the closed-form minimal distance every point has an adversarial vertex."""
    weights, logits_fn = _linear()
    x = jax.random.uniform(jax.random.key(2), (B, H, W, C), minval=0.35, maxval=0.65)
    y = np.asarray(jnp.argmax(logits_fn(x), -1)).astype(np.int32)
    dmin = _closed_form_min_eps(weights, x, y)
    assert np.all(2 * dmin < 0.35), "box would bind"
    eps = jnp.asarray(2 * dmin, jnp.float32)
    x_adv, robust = _attack(loss)(x, jnp.asarray(y), jax.random.key(0), eps)
    assert not np.any(np.asarray(robust))
    pred = np.argmax(logits_fn(x_adv), -1)
    assert np.all(pred != y)
    linf = np.abs(np.asarray(x_adv - x)).reshape(B, -1).max(-1)
    assert np.all(linf <= np.asarray(eps) + 1e-7)
    # and below the minimal distance nothing can be broken
    x_adv, robust = _attack(loss)(x, jnp.asarray(y), jax.random.key(0), eps * 0.49)
    assert np.all(np.asarray(robust))
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


def test_misclassified_untouched_and_deterministic():
    _, logits_fn = _linear()
    x = jax.random.uniform(jax.random.key(4), (B, H, W, C))
    pred = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
    y = pred.at[:3].set((pred[:3] + 1) % K)  # first three start misclassified
    eps = jnp.full((B,), 0.2, jnp.float32)
    x_adv, robust = _attack()(x, y, jax.random.key(5), eps)
    x_adv2, robust2 = _attack()(x, y, jax.random.key(5), eps)
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x_adv2))
    np.testing.assert_array_equal(np.asarray(robust), np.asarray(robust2))
    np.testing.assert_array_equal(np.asarray(x_adv[:3]), np.asarray(x[:3]))
    assert not np.any(np.asarray(robust[:3]))
    x_adv3, _ = _attack()(x, y, jax.random.key(6), eps)
    changed = np.any(np.asarray(x_adv) != np.asarray(x), axis=(1, 2, 3))
    changed3 = np.any(np.asarray(x_adv3) != np.asarray(x), axis=(1, 2, 3))
    if changed[3:].any() and changed3[3:].any():
        assert not np.array_equal(np.asarray(x_adv), np.asarray(x_adv3))


def test_bad_arguments():
    x = jnp.zeros((1, 2, 2, 1))
    y = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="norm"):
        square(lambda z: z.reshape(1, -1), x, y, jax.random.key(0), eps=0.1, norm="l2")
    with pytest.raises(ValueError, match="loss"):
        square(lambda z: z.reshape(1, -1), x, y, jax.random.key(0), eps=0.1, loss="dlr")


def test_a_query_that_fools_is_kept_even_if_the_loss_got_worse():
    """The reference keeps a query where the loss improved *or* the example is now
    misclassified. The model is misclassified, with a lower CE than at the start, exactly where
    one pixel of the one-column image left the stripe's sign (x itself is classified right):
    with loss="ce" the second rule alone catches it."""
    x = jnp.full((2, 4, 1, 1), 0.5, jnp.float32)
    y = jnp.zeros((2,), jnp.int32)

    def logits_fn(z):
        t = jnp.abs(jnp.mean((z - 0.5) / 0.1, axis=(1, 2, 3)))
        right = (t > 0.999) | (t < 1e-3)  # at x, or every pixel still on the start's side
        return jnp.where(right[:, None], jnp.asarray([0.0, -0.1, -0.1]),
                         jnp.asarray([0.0, 0.1, -10.0]))

    x_adv, robust = square(logits_fn, x, y, jax.random.PRNGKey(0), eps=0.1, n_queries=50,
                           loss="ce")
    assert not np.asarray(robust).any()
    # every pixel on a vertex of the ball: a flip moves a pixel by 2 eps, from -eps to +eps
    np.testing.assert_allclose(np.abs(np.asarray(x_adv - x)), 0.1, rtol=1e-5)
