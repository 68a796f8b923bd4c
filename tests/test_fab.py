"""FAB against closed forms: on a linear classifier the minimal L_inf adversarial is known."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from hamjax.attacks import rng
from hamjax.attacks.fab_attack import fab, fab_targeted, projection_linf

B, H, W, C, K = 6, 4, 4, 1, 4
_projection = jax.jit(projection_linf)
D = H * W * C


def _linear_problem(seed: int = 0):
    """Interior points of a random linear classifier, labelled by its own prediction.

    Returns images, labels, weights and the closed-form minimal L_inf distance to each other
    class's half-space, (z_y - z_j) / ||w_y - w_j||_1 (exact while the box does not bind: the
    points sit in [0.4, 0.6] and every distance is < 0.4).
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(D, K)).astype(np.float32)
    x = rng.uniform(0.4, 0.6, size=(B, H, W, C)).astype(np.float32)
    z = x.reshape(B, -1).astype(np.float64) @ weights
    y = np.argmax(z, -1).astype(np.int32)
    zy = z[np.arange(B), y][:, None]
    l1 = np.abs(weights[:, :, None] - weights[:, None, :]).sum(0)[y]  # [B, K]
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(np.arange(K)[None] == y[:, None], np.inf, (zy - z) / l1)
    assert np.all(dist.min(-1) < 0.4), "box would bind"
    return jnp.asarray(x), jnp.asarray(y), weights, dist


def _linear_logits(weights):
    w = jnp.asarray(weights)
    return lambda x: x.reshape(x.shape[0], -1) @ w


@functools.cache
def _attack(targeted: bool):
    """One jitted attack per mode, eps traced, shared by the tests to keep compiles down."""
    _, _, weights, _ = _linear_problem()
    attack = functools.partial(fab_targeted, n_target_classes=K - 1) if targeted else fab
    return jax.jit(lambda x, y, k, e: attack(_linear_logits(weights), x, y, k, eps=e, steps=40,
                                             return_info=True))


def _run(targeted: bool, eps_key: str):
    x, y, weights, dist = _linear_problem()
    dmin = dist.min(-1)
    factor = {"zero": 0.0, "above": 1.02, "below": 0.98,
              "mixed": np.where(np.arange(B) % 2 == 0, 1.02, 0.98)}[eps_key]
    eps = (factor * dmin).astype(np.float32)
    out = _attack(targeted)(x, y, jax.random.key(0), jnp.asarray(eps))
    return x, y, weights, dmin, eps, out


@pytest.mark.parametrize("targeted", [True, False])
def test_minimal_norm_matches_closed_form(targeted):
    x, y, weights, dmin, _, (x_adv, robust, info) = _run(targeted, "zero")
    norm = np.asarray(info.norm)
    # FAB never goes below the true minimum; with eta=1.05, beta=0.9 its fixed point on a linear
    # boundary is ~0.5% above it (the reference converges to the same point).
    assert np.all(norm >= dmin * (1 - 1e-4))
    np.testing.assert_allclose(norm, dmin, rtol=1e-2)
    x_min = np.asarray(info.x_min)
    np.testing.assert_allclose(np.abs(x_min - np.asarray(x)).reshape(B, -1).max(-1), norm,
                               rtol=1e-5)
    assert np.all(np.argmax(_linear_logits(weights)(jnp.asarray(x_min)), -1) != np.asarray(y))
    # eps = 0: nothing is broken and x_adv is the clean input
    assert np.all(np.asarray(robust))
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x))


@pytest.mark.parametrize("targeted", [True, False])
def test_eps_threshold(targeted):
    for key, expect in (("above", False), ("below", True)):
        x, y, weights, _, eps, (x_adv, robust, _) = _run(targeted, key)
        np.testing.assert_array_equal(np.asarray(robust), np.full(B, expect))
        x_adv = np.asarray(x_adv)
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        linf = np.abs(x_adv - np.asarray(x)).reshape(B, -1).max(-1)
        assert np.all(linf <= eps + 1e-7)
        pred = np.argmax(_linear_logits(weights)(jnp.asarray(x_adv)), -1)
        np.testing.assert_array_equal(pred == np.asarray(y), np.full(B, expect))


def test_per_example_eps():
    x, _, _, _, _, (x_adv, robust, _) = _run(True, "mixed")
    np.testing.assert_array_equal(np.asarray(robust), np.arange(B) % 2 == 1)
    changed = np.any(np.asarray(x_adv) != np.asarray(x), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, np.arange(B) % 2 == 0)


def test_an_adversarial_exactly_at_eps_breaks_the_example():
    """Broken means a minimal norm <= eps (the reference's test): with eps set to the very
    norm FAB finds (eps = 0 gives it), every example counts as broken."""
    x, y, _, _ = _linear_problem()
    attack = _attack(True)
    _, _, info = attack(x, y, jax.random.key(0), jnp.zeros(B, jnp.float32))
    _, robust, _ = attack(x, y, jax.random.key(0), info.norm)
    assert not np.asarray(robust).any()


def _reference_steps(x0, x1, linearise, is_adversarial, steps: int = 2):
    """FAB's steps written out from the iterate x1 (the reference's update): project the
    iterate and the clean point x0 onto the boundary linearised at x1 (w.z = b), step to their
    convex combination with alpha = min(a1 / (a1 + a2), alpha_max = 0.1), a1 the iterate's
    distance (so a near-boundary iterate moves mostly on its own), overshoot 1.05, keep the
    smallest adversarial L_inf norm, pull an adversarial iterate back by beta = 0.9."""
    n = len(x0)
    best = np.full(n, np.inf)
    for _ in range(steps):
        w, b = linearise(x1)
        d = np.asarray(_projection(np.concatenate([x1, x0]), np.concatenate([w, w]),
                                   np.concatenate([b, b])))
        a = np.maximum(np.abs(d).max(-1), 1e-8)
        alpha = np.clip(a[:n] / (a[:n] + a[n:]), 0.0, 0.1)[:, None]
        x_new = np.clip((x1 + 1.05 * d[:n]) * (1 - alpha) + (x0 + 1.05 * d[n:]) * alpha, 0, 1)
        adv = is_adversarial(x_new)
        norm = np.abs(x_new - x0).max(-1)
        best = np.where(adv & (norm < best), norm, best)
        x1 = np.where(adv[:, None], x0 + (x_new - x0) * 0.9, x_new)
    return best


def test_two_steps_match_the_reference_update():
    """Two FAB steps (targeted, linear model) equal the reference's update written out."""
    x, y, weights, _ = _linear_problem()
    logits_fn = _linear_logits(weights)
    _, _, info = jax.jit(lambda x, y: fab_targeted(
        logits_fn, x, y, jax.random.key(0), eps=0.0, n_target_classes=1, steps=2,
        return_info=True))(x, y)
    x0 = np.asarray(x).reshape(B, -1)
    z = x0 @ weights
    t = np.argsort(z, -1)[:, -2]  # the run's target: the second-highest clean logit
    y = np.asarray(y)
    w = (weights[:, t] - weights[:, y]).T  # gradient of z_t - z_y
    # b = w.x1 - (z_t - z_y)(x1) = 0: the linear boundary passes through the origin
    best = _reference_steps(x0, x0.copy(), lambda x1: (w, np.zeros(B, np.float32)),
                            lambda z: np.argmax(z @ weights, -1) != y)
    assert np.all(np.isfinite(best))
    np.testing.assert_allclose(np.asarray(info.norm), best, rtol=1e-5)


def test_a_restart_starts_at_half_eps_from_the_clean_point():
    """Restarts after the first start at x + (eps / 2) u / ||u||_inf (the reference's
    `0.5 * eps`). The model is flat at x, so the first run (from x) finds nothing close and
    the minimal norm is the restart's: two steps written out from that start give it."""
    x = jnp.asarray(np.random.default_rng(0).uniform(0.4, 0.6, (4, 4, 4, 1)), jnp.float32)
    x0 = np.asarray(x).reshape(4, -1)

    def logit_gap(z):  # z_1 - z_0: class 1 wins once ||z - x||_2^2 > 0.01; zero gradient at x
        return 10.0 * jnp.sum(jnp.square(z.reshape(4, -1) - x0), -1) - 0.1

    def logits_fn(z):
        gap = logit_gap(z)
        return jnp.stack([jnp.zeros_like(gap), gap], -1)

    y, eps, key = jnp.zeros((4,), jnp.int32), 0.2, jax.random.key(0)
    norms = [np.asarray(fab_targeted(logits_fn, x, y, key, eps=eps, n_target_classes=1, steps=2,
                                     n_restarts=n, return_info=True)[2].norm) for n in (1, 2)]
    # run 1's start, drawn as the attack draws it (fold_in(key, run), uniform in [-1, 1])
    u = np.asarray(rng.batch_draw(jax.random.uniform, rng.fold_in(key, 1), x0.shape,
                                  jnp.float32, minval=-1.0, maxval=1.0))
    x1 = np.clip(x0 + 0.5 * eps * u / np.abs(u).max(-1, keepdims=True), 0, 1)

    def linearise(z):
        w = np.asarray(jax.grad(lambda v: jnp.sum(logit_gap(v)))(jnp.asarray(z)))
        return w, np.sum(w * z, -1) - np.asarray(logit_gap(jnp.asarray(z)))

    best = _reference_steps(x0, x1, linearise,
                            lambda z: np.asarray(logit_gap(jnp.asarray(z))) > 0)
    assert np.all(best < norms[0])  # the restart, not the run from x, gives the minimum
    np.testing.assert_allclose(norms[1], best, rtol=1e-4)


def test_misclassified_untouched_and_box_binds():
    """Wrong labels are not attacked; points on the box faces stay in [0, 1]."""
    x, y, weights, _ = _linear_problem(1)
    x = x.at[:2].set(jnp.round(x[:2]))  # corners of the box: projections must clip
    logits_fn = _linear_logits(weights)
    y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
    y_wrong = y.at[0].set((y[0] + 1) % K)
    x_adv, robust, info = jax.jit(
        lambda x, y: fab_targeted(logits_fn, x, y, jax.random.key(1), eps=0.3,
                                  n_target_classes=K - 1, steps=20, n_restarts=2,
                                  return_info=True))(x, y_wrong)
    x_adv = np.asarray(x_adv)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    np.testing.assert_array_equal(x_adv[0], np.asarray(x[0]))
    assert not bool(robust[0]) and float(info.norm[0]) == 0.0
    broken = ~np.asarray(robust[1:])
    pred = np.argmax(logits_fn(jnp.asarray(x_adv)), -1)
    assert np.all(pred[1:][broken] != np.asarray(y_wrong[1:])[broken])


def test_mlp_adversarials_are_real_and_deterministic():
    """Nonlinear model: every broken example is misclassified within eps; fixed key, same answer."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    w1 = jax.random.normal(k1, (D, 16)) * 0.5
    w2 = jax.random.normal(k2, (16, K)) * 0.5
    x = jax.random.uniform(k3, (B, H, W, C))

    def logits_fn(z):
        return jnp.tanh(z.reshape(z.shape[0], -1) @ w1) @ w2

    y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
    run = jax.jit(lambda k: fab(logits_fn, x, y, k, eps=0.1, steps=20, n_restarts=2,
                                return_info=True))
    x_adv, robust, info = run(jax.random.key(0))
    x_adv2, robust2, _ = run(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(x_adv), np.asarray(x_adv2))
    np.testing.assert_array_equal(np.asarray(robust), np.asarray(robust2))
    broken = ~np.asarray(robust)
    assert broken.any()
    linf = np.abs(np.asarray(x_adv - x)).reshape(B, -1).max(-1)
    assert np.all(linf[broken] <= 0.1 + 1e-6)
    assert np.all(np.asarray(info.norm)[broken] <= 0.1 + 1e-6)
    pred = np.argmax(logits_fn(x_adv), -1)
    np.testing.assert_array_equal(pred[broken] != np.asarray(y)[broken], True)


def _lp_projection(t, w, b):
    """min lam s.t. w.(t + d) = b, |d_i| <= lam, 0 <= t + d <= 1; None when infeasible."""
    n = t.size
    cost = np.zeros(n + 1)
    cost[-1] = 1.0
    eye = np.eye(n)
    a_ub = np.block([[eye, -np.ones((n, 1))], [-eye, -np.ones((n, 1))]])
    bounds = [(-ti, 1.0 - ti) for ti in t] + [(0, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.append(w, 0.0)[None],
                  b_eq=[b - w @ t], bounds=bounds, method="highs")
    return res.x[-1] if res.status == 0 else None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 12), st.integers(0, 2**31 - 1), st.sampled_from([0.01, 0.3, 3.0]))
def test_projection_matches_linprog(n, seed, scale):
    rng = np.random.default_rng(seed)
    t = rng.uniform(size=n)
    t[rng.uniform(size=n) < 0.2] = rng.choice([0.0, 1.0])  # some coordinates on the faces
    w = rng.normal(size=n) * (rng.uniform(size=n) > 0.2)
    b = float(w @ t + scale * rng.normal())
    # padded to one width (one compile); padding has w = 0, so it must not move or matter
    pad = 12 - n
    t_pad = np.pad(t, (0, pad), constant_values=0.5)[None].astype(np.float32)
    w_pad = np.pad(w, (0, pad))[None].astype(np.float32)
    d = np.asarray(_projection(t_pad, w_pad, jnp.asarray([b], jnp.float32)))[0]
    assert np.all(d[n:] == 0.0)
    d = d[:n].astype(np.float64)
    z = t + d
    assert np.all(z >= -1e-6) and np.all(z <= 1 + 1e-6)
    lam = _lp_projection(t, w, b)
    if lam is not None:
        np.testing.assert_allclose(np.abs(d).max(initial=0.0), lam, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(w @ z, b, atol=1e-4 * (1 + np.abs(w).sum()))
    else:  # unreachable inside the box: move every coordinate fully towards the hyperplane
        s = np.sign(w @ t - b) if w @ t != b else 1.0
        face = (s * w < 0).astype(np.float64)
        np.testing.assert_allclose(d, np.where(w != 0, face - t, 0.0), atol=1e-6)


def _sorted_projection_np(t, w, b):
    """The reference's algorithm (sort the rooms, cumsum, pick the piece) in float64 NumPy."""
    t, w, b = (np.asarray(a, np.float64) for a in (t, w, b))
    excess = np.sum(w * t, -1) - b
    w = w * np.where(excess >= 0, 1.0, -1.0)[:, None]
    c, neg = np.abs(excess), w < 0
    room, absw = np.where(neg, 1.0 - t, t), np.abs(w)
    order = np.argsort(-room, axis=-1, kind="stable")
    room_s, absw_s = np.take_along_axis(room, order, -1), np.take_along_axis(absw, order, -1)
    spent = absw_s * room_s
    tail = np.cumsum(spent[:, ::-1], -1)[:, ::-1] - spent
    slope = np.cumsum(absw_s, -1)
    g_at = tail + room_s * slope
    piece = np.clip(np.sum(g_at > c[:, None], -1) - 1, 0, t.shape[-1] - 1)
    tail_p, slope_p = (np.take_along_axis(a, piece[:, None], -1)[:, 0] for a in (tail, slope))
    lam = np.maximum(np.where(slope_p > 0, (c - tail_p) / np.where(slope_p > 0, slope_p, 1), 0),
                     0)[:, None]
    d = np.where(neg, np.minimum(lam, 1.0 - t), np.maximum(-lam, -t))
    d = np.where((g_at[:, 0] > c)[:, None], d, neg - t)
    return np.where(w != 0, d, 0.0)


def test_projection_matches_the_sorted_reference_at_image_size():
    """MNIST-sized rows (D = 784) with coordinates on the faces, zero weights and offsets from
    tiny to unreachable: the bisection gives the sorted-cumsum answer."""
    rng = np.random.default_rng(1)
    n, d = 64, 784
    t = rng.uniform(size=(n, d)).astype(np.float32)
    t[rng.uniform(size=(n, d)) < 0.2] = 0.0
    t[rng.uniform(size=(n, d)) < 0.1] = 1.0
    w = (rng.normal(size=(n, d)) * (rng.uniform(size=(n, d)) > 0.1)).astype(np.float32)
    b = (np.sum(w * t, -1) + rng.normal(size=n) * np.geomspace(1e-4, 1e3, n)).astype(np.float32)
    got = np.asarray(_projection(t, w, b))
    want = _sorted_projection_np(t, w, b)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_projection_batched_rows_independent():
    """Rows of a batch give the same answer as alone (vectorised sort/cumsum, no leakage)."""
    rng = np.random.default_rng(0)
    t = rng.uniform(size=(5, 48)).astype(np.float32)
    w = rng.normal(size=(5, 48)).astype(np.float32)
    b = (np.sum(w * t, -1) + rng.normal(size=5)).astype(np.float32)
    d = np.asarray(_projection(t, w, b))
    for i in range(5):
        alone = _projection(t[i:i + 1], w[i:i + 1], b[i:i + 1])
        np.testing.assert_allclose(d[i], np.asarray(alone)[0], atol=1e-7)


def test_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        fab(lambda z: z.reshape(1, -1), jnp.zeros((1, 2, 2, 1)), jnp.zeros((1,), jnp.int32),
            jax.random.key(0), eps=0.1, norm="l1")
