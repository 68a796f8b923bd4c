"""CAAT: the virtual step equals the real optax update, the meta-gradient through it matches
finite differences, both perturbations respect per-example bounds, all-adversary routing is FRL,
the state checkpoints, and the jitted train step fires the meta update every meta_interval."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hamjax.attacks.losses import kl_divergence
from hamjax.checkpoint import Checkpointer
from hamjax.config import base_config, method_config
from hamjax.data.scenarios import apply_scenario
from hamjax.errors import ConfigError
from hamjax.methods import caat, caat_meta, caat_objective, caat_router, caat_state, get_method
from hamjax.methods.common import cross_entropy, forward
from hamjax.methods.frl import class_parameters, frl_loss
from hamjax.metrics import PerClassCounts
from hamjax.optim import make_lr_fn, make_optimizer, set_learning_rate
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

C = 3
B = 8
BASE_EPS = 0.05


class TinyNet(nn.Module):
    """conv4-BN-act-dense on 4x4x1 images; tanh makes the loss smooth in the weights (for
    finite differences: ReLU kinks in the model would dominate them)."""

    num_classes: int = C
    smooth: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        del mask
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = (jnp.tanh(x) if self.smooth else nn.relu(x)).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def make_ctx(steps_per_epoch: int = 4, momentum: float = 0.9, smooth: bool = False,
             **method) -> StepContext:
    config = base_config()
    config.data.augment.crop_pad = 0
    config.data.augment.flip = False
    config.data.val_size = 0
    config.data.meta_per_class = 4
    config.method = method_config("caat")
    config.method.update(method)
    config.attack.eps = BASE_EPS
    config.attack.step_size = 0.03
    config.attack.steps = 3
    config.train.lr = 0.1
    config.train.lr_schedule = "constant"
    config.train.momentum = momentum
    config.train.weight_decay = 5e-4
    return StepContext(
        model=TinyNet(smooth=smooth),
        tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, steps_per_epoch),
        config=ml_collections.FrozenConfigDict(config),
        num_classes=C,
        class_counts=np.array([12, 6, 3]),
        steps_per_epoch=steps_per_epoch,
        image_shape=(4, 4, 1),
    )


def make_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(0.2, 0.8, (B, 4, 4, 1)).astype(np.float32),
        "label": (np.arange(B) % C).astype(np.int32),
        "index": np.arange(B, dtype=np.int32),
        "meta_image": rng.uniform(0.2, 0.8, (B, 4, 4, 1)).astype(np.float32),
        "meta_label": ((np.arange(B) + 1) % C).astype(np.int32),
    }


LAMBDA2 = jnp.asarray([0.0, 0.2, 0.45], jnp.float32)  # bound multipliers 1, 1.49, 2.46


def make_state(ctx, seed: int = 0, lambda2=LAMBDA2):
    state = create_train_state(ctx, get_method("caat"), seed=seed)
    lambdas = dict(state.method_state["lambdas"], lambda2=lambda2,
                   lambda0=jnp.asarray([0.1, 0.0, 0.2], jnp.float32))
    return state.replace(method_state=dict(state.method_state, lambdas=lambdas))


def with_momentum(ctx, state, batch):
    """One real SGD update so that the momentum buffer is non-zero."""
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), state.params)
    opt_state = set_learning_rate(state.opt_state, 0.1)
    updates, opt_state = ctx.tx.update(grads, opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


# ---------------------------------------------------------------------- virtual step
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_virtual_step_equals_real_optax_update(momentum):
    ctx = make_ctx(momentum=momentum)
    state = with_momentum(ctx, make_state(ctx), make_batch())
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), state.params)
    lr = 0.037
    updates, _ = ctx.tx.update(grads, set_learning_rate(state.opt_state, lr), state.params)
    expected = optax.apply_updates(state.params, updates)
    got = caat_meta.virtual_sgd_step(state.params, grads, state.opt_state, lr,
                                momentum=momentum, weight_decay=5e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 got, expected)
    assert (caat_meta.momentum_trace(state.opt_state) is None) == (momentum == 0.0)


# ---------------------------------------------------------------------- meta-gradient
def _meta_setup(temperature: float, lr: float = 1.0, tie: bool = False):
    """Tiny smooth model, fixed perturbations; `objective(Omega)` = L_meta(W_hat(Omega)).

    tie=True shifts the meta-net's output bias so that one training example sits at
    (z0 - z1) / T = 0.3: with T = 0.001 only such near-tie examples carry a meta-gradient.
    """
    ctx = make_ctx(temperature=temperature, smooth=True)
    state = with_momentum(ctx, make_state(ctx), make_batch())
    ms = state.method_state
    batch = make_batch(1)
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    xm, ym = jnp.asarray(batch["meta_image"]), jnp.asarray(batch["meta_label"])
    _, _, mult = class_parameters(ms["lambdas"], ctx.config.method)
    key1, key2 = jax.random.split(jax.random.PRNGKey(5))
    train_inputs = (x, y, *caat_objective.perturbations(ctx, state.params, state.batch_stats, x, y,
                                              BASE_EPS * mult[y], key1))
    meta_pert = caat_objective.perturbations(ctx, state.params, state.batch_stats, xm, ym,
                                   BASE_EPS * mult[ym], key2)
    meta_params = ms["meta_params"]
    if tie:
        terms, _ = caat_objective.branch_terms(ctx, state.params, state.batch_stats, *train_inputs,
                                     bn_mode="batch")
        feats = caat_router.meta_features(terms.clean_logits, y, ms["class_loss_last"],
                                   caat_router.class_proportion(ctx))
        unit_t = caat_router.MetaNet(hidden=ctx.config.method.meta_hidden, temperature=1.0)
        w = caat_router.route(unit_t, meta_params, ms["meta_stats"], feats, batch_stats=True)[0]
        dz = np.log(np.asarray(w[:, 0])) - np.log(np.asarray(w[:, 1]))
        k = int(np.argmin(np.abs(dz)))
        out = dict(meta_params["out"])
        out["bias"] = out["bias"] + jnp.asarray([0.3 * temperature - dz[k], 0.0])
        meta_params = dict(meta_params, out=out)

    @jax.jit
    def objective(meta_params):
        w_hat = caat_meta.virtual_model(ctx, state, meta_params, train_inputs, lr)
        return caat_meta.meta_objective(w_hat, ctx, state.batch_stats, (xm, ym, *meta_pert),
                                   ms["lambdas"])

    @jax.jit
    def gradient(meta_params):
        return caat_meta.meta_gradient(ctx, state, meta_params, train_inputs, (xm, ym), key2, lr,
                                  meta_perturbations=meta_pert)

    return meta_params, objective, gradient


def _directional_fd(objective, params, direction, h):
    plus = jax.tree.map(lambda p, d: p + h * d, params, direction)
    minus = jax.tree.map(lambda p, d: p - h * d, params, direction)
    return (float(objective(plus)) - float(objective(minus))) / (2 * h)


def _unit(tree):
    norm = np.sqrt(_dot(tree, tree))
    return jax.tree.map(lambda leaf: leaf / norm, tree)


def _dot(a, b):
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True)))


def test_meta_gradient_matches_finite_differences_smooth_temperature():
    meta_params, objective, gradient = _meta_setup(temperature=1.0)
    loss, grad = gradient(meta_params)
    np.testing.assert_allclose(loss, objective(meta_params), rtol=1e-5)
    direct = jax.jit(jax.grad(objective))(meta_params)  # end-to-end autodiff, no vjp split
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-7),
                 grad, direct)
    assert _dot(grad, grad) > 0
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 100))
    for _ in range(3):
        direction = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), meta_params)
        direction = _unit(direction)
        fd = _directional_fd(objective, meta_params, direction, h=3e-3)
        analytic = _dot(grad, direction)
        assert abs(fd - analytic) <= 0.02 * abs(analytic) + 1e-3, (fd, analytic)
    # along the gradient itself the directional derivative is its norm: a strong signal
    fd = _directional_fd(objective, meta_params, _unit(grad), h=3e-3)
    np.testing.assert_allclose(fd, np.sqrt(_dot(grad, grad)), rtol=0.02)


def test_meta_gradient_is_finite_and_consistent_at_official_temperature():
    meta_params, objective, gradient = _meta_setup(temperature=1e-3, tie=True)
    loss, grad = gradient(meta_params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
    direct = jax.jit(jax.grad(objective))(meta_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3),
                 grad, direct)
    # softmax(z / T) depends on z0 - z1 only: exactly opposite bias gradients (a plain
    # float32 softmax breaks this at T = 0.001 with ~ulp/T round-off on every example)
    bias = np.asarray(grad["out"]["bias"])
    np.testing.assert_allclose(bias[0], -bias[1], rtol=1e-6)
    assert abs(bias[0]) > 1.0  # the near-tie example carries a 1/T-sized meta-gradient
    direction = jax.tree.map(jnp.zeros_like, meta_params)
    direction["out"] = dict(direction["out"], bias=jnp.asarray([1.0, 0.0]))
    fd = _directional_fd(objective, meta_params, direction, h=3e-5)  # h << T
    np.testing.assert_allclose(fd, bias[0], rtol=0.01)
    fd = _directional_fd(objective, meta_params, _unit(grad), h=1e-5)
    np.testing.assert_allclose(fd, np.sqrt(_dot(grad, grad)), rtol=0.02)


# ---------------------------------------------------------------------- perturbations
def test_adversary_and_anti_adversary_in_their_own_bounds():
    ctx = make_ctx()
    state = make_state(ctx)
    batch = make_batch(2)
    x, y = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    _, _, mult = class_parameters(state.method_state["lambdas"], ctx.config.method)
    eps = BASE_EPS * mult[y]
    assert len(np.unique(np.round(np.asarray(eps), 6))) == C  # bounds differ across classes
    x_adv, x_anti = caat_objective.perturbations(ctx, state.params, state.batch_stats, x, y, eps,
                                       jax.random.PRNGKey(0))
    for xp in (x_adv, x_anti):
        dist = np.max(np.abs(np.asarray(xp - x)).reshape(B, -1), axis=1)
        assert np.all(dist <= np.asarray(eps) + 1e-6)
    # 3 steps of 0.03 reach beyond the base bound only for classes with a larger bound
    big = np.asarray(mult[y]) > 1.4
    dist_adv = np.max(np.abs(np.asarray(x_adv - x)).reshape(B, -1), axis=1)
    assert np.all(dist_adv[big] > BASE_EPS + 1e-3)
    dist_anti = np.max(np.abs(np.asarray(x_anti - x)).reshape(B, -1), axis=1)
    assert np.all(dist_anti[big] > BASE_EPS + 1e-3)  # the anti-adversary's bound is eps_i too

    def logits(z):
        return forward(ctx, state.params, state.batch_stats, z, bn_mode="eval")[0]

    clean_logits = logits(x)
    kl_adv = kl_divergence(logits(x_adv), y, clean_logits=clean_logits)
    assert np.all(np.asarray(kl_adv) > 1e-4)  # KL at x itself is 0
    ce_clean = cross_entropy(clean_logits, y)
    ce_anti = cross_entropy(logits(x_anti), y)
    assert np.all(np.asarray(ce_anti) < np.asarray(ce_clean))


# ---------------------------------------------------------------------- features / routing
def test_meta_features_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, C)).astype(np.float32)
    labels = np.arange(B) % C
    last, prop = np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.3, 0.2])
    got = np.asarray(caat_router.meta_features(jnp.asarray(logits), jnp.asarray(labels),
                                        jnp.asarray(last, jnp.float32),
                                        jnp.asarray(prop, jnp.float32)))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(C)[labels]
    others = np.where(onehot > 0, -np.inf, p).max(1)
    expected = np.stack([
        -np.log(p[np.arange(B), labels]), last[labels], np.linalg.norm(onehot - p, axis=1),
        p[np.arange(B), labels] - others, (p * np.log(p)).sum(1), prop[labels]], axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _force_routing(state, alpha_first: bool):
    """Meta-net output layer zero with a bias that makes softmax one-hot."""
    params = jax.tree.map(lambda p: p, state.method_state["meta_params"])
    out = dict(params["out"])
    out["kernel"] = jnp.zeros_like(out["kernel"])
    out["bias"] = jnp.asarray([1.0, 0.0] if alpha_first else [0.0, 1.0], jnp.float32)
    params = dict(params, out=out)
    return state.replace(method_state=dict(state.method_state, meta_params=params))


def test_all_adversary_routing_equals_frl():
    ctx = make_ctx(temperature=1e-3)
    state = _force_routing(make_state(ctx), alpha_first=True)
    batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
    rng = jax.random.PRNGKey(11)
    (caat_value, caat_aux), caat_grads = jax.value_and_grad(caat.caat_loss, has_aux=True)(
        state.params, state, batch, rng, ctx)
    (frl_value, _), frl_grads = jax.value_and_grad(frl_loss, has_aux=True)(
        state.params, state, batch, rng, ctx)
    np.testing.assert_allclose(caat_value, frl_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 caat_grads, frl_grads)
    assert float(caat_aux["metrics"]["adv_fraction"]) == 1.0
    ms = caat_aux["method_state"]
    np.testing.assert_allclose(ms["route_adv"], ms["route_total"])
    np.testing.assert_allclose(ms["class_count"], np.bincount(batch["label"], minlength=C))
    summary = caat_state.routing_summary(ms)
    assert summary["adv_fraction"] == 1.0 and summary["per_class_adv_fraction"] == [1.0] * C


def test_adv_weight_floor_keeps_robust_terms_for_anti_routed_examples():
    ctx = make_ctx(adv_weight_floor=0.25)
    state = _force_routing(make_state(ctx), alpha_first=False)
    batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
    _, aux = caat.caat_loss(state.params, state, batch, jax.random.PRNGKey(0), ctx)
    m = aux["metrics"]
    assert float(m["adv_fraction"]) == 0.0
    assert float(m["adv_part"]) > 0.0  # 0 in the faithful mode (floor 0)
    ctx0 = make_ctx()
    _, aux0 = caat.caat_loss(state.params, state, batch, jax.random.PRNGKey(0), ctx0)
    assert float(aux0["metrics"]["adv_part"]) == 0.0
    # all routed to the anti-adversary: the loss is the batch mean of its CE
    np.testing.assert_allclose(aux0["metrics"]["anti_part"], aux0["metrics"]["ce_anti"],
                               rtol=1e-6)


def test_gates_lift_alpha_by_the_floor_and_leave_beta():
    """alpha_eff = f + (1 - f) alpha: an adversary-routed example keeps weight 1, an
    anti-routed one gets f, beta is untouched (hand-computed at f = 0.25)."""
    weights = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4]], jnp.float32)
    alpha, beta = caat_objective.gates(weights, 0.25)
    np.testing.assert_allclose(alpha, [1.0, 0.25, 0.7], rtol=1e-6)
    np.testing.assert_allclose(beta, [0.0, 1.0, 0.4], rtol=1e-6)
    alpha0, beta0 = caat_objective.gates(weights, 0.0)
    np.testing.assert_allclose(alpha0, [1.0, 0.0, 0.6])
    np.testing.assert_allclose(beta0, [0.0, 1.0, 0.4])


def test_meta_update_is_one_adam_descent_step_on_the_meta_batch_loss():
    """meta_update against the spec written out: perturbations of the training batch against
    W, the virtual step at this step's lr (a schedule that moves), the meta batch's (not the
    training batch's) composite loss with its perturbations made against W_hat, and a first
    torch-Adam step (L2 decay added to the gradient) that descends it."""
    ctx = make_ctx(temperature=1.0, smooth=True)
    config = ctx.config.as_configdict()
    config.attack.steps = 1  # one attack step each: the test is about the meta step
    ctx = dataclasses.replace(ctx, config=ml_collections.FrozenConfigDict(config),
                              lr_fn=lambda step: 0.5 + 0.25 * step)
    state = make_state(ctx).replace(step=jnp.int32(2))
    batch = {k: jnp.asarray(v) for k, v in make_batch(4).items()}
    rng = jax.random.PRNGKey(3)
    new = jax.jit(lambda s, b, r: caat_meta.meta_update(s, b, r, ctx))(state, batch, rng)

    ms, mcfg = state.method_state, ctx.config.method
    train_key, meta_key = jax.random.split(rng)
    x, y, xm, ym = batch["image"], batch["label"], batch["meta_image"], batch["meta_label"]
    mult = class_parameters(ms["lambdas"], mcfg)[2]
    train_inputs = (x, y, *caat_objective.perturbations(ctx, state.params, state.batch_stats,
                                                        x, y, BASE_EPS * mult[y], train_key))

    def objective(meta_params):
        w_hat = caat_meta.virtual_model(ctx, state, meta_params, train_inputs, 0.5 + 0.25 * 2)
        pert = caat_objective.perturbations(ctx, w_hat, state.batch_stats, xm, ym,
                                            BASE_EPS * mult[ym], meta_key)
        return caat_meta.meta_objective(w_hat, ctx, state.batch_stats, (xm, ym, *pert),
                                        ms["lambdas"])

    loss, grad = jax.jit(jax.value_and_grad(objective))(ms["meta_params"])
    np.testing.assert_allclose(new["meta_loss"], loss, rtol=1e-5)
    assert int(new["meta_updates"]) == int(ms["meta_updates"]) + 1
    # Adam's first step from a fresh state: m_hat = g', v_hat = g'^2, g' = g + wd * Omega.
    lr, wd = float(mcfg.meta_lr), float(mcfg.meta_weight_decay)

    def adam_first_step(p, g):
        g = np.asarray(g, np.float64) + wd * np.asarray(p, np.float64)
        return np.asarray(p, np.float64) - lr * g / (np.abs(g) + 1e-8)

    expected = jax.tree.map(adam_first_step, ms["meta_params"], grad)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=2e-7),
                 new["meta_params"], expected)
    moved = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(new["meta_params"]), jax.tree.leaves(ms["meta_params"]), strict=True))
    assert moved > 0


def test_real_step_routes_with_the_meta_nets_batch_statistics():
    """The official meta-net is never put in eval mode: with meta_bn="batch" the real step's
    weights standardise the features with this batch's statistics, not the running ones."""
    ctx = make_ctx(temperature=1.0)
    state = make_state(ctx)
    batch = {k: jnp.asarray(v) for k, v in make_batch(3).items()}
    _, aux = caat.caat_loss(state.params, state, batch, jax.random.PRNGKey(0), ctx)
    ms = state.method_state
    clean_logits = forward(ctx, state.params, state.batch_stats, batch["image"],
                           bn_mode="train")[0]
    feats = caat_router.meta_features(clean_logits, batch["label"], ms["class_loss_last"],
                                      caat_router.class_proportion(ctx))
    net = caat_router.make_meta_net(ctx.config.method)
    weights = net.apply({"params": ms["meta_params"], "batch_stats": ms["meta_stats"]}, feats,
                        use_running_average=False, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(aux["metrics"]["alpha_mean"], jnp.mean(weights[:, 0]),
                               rtol=1e-5)


# ---------------------------------------------------------------------- the jitted step
def test_train_step_fires_meta_update_every_interval():
    ctx = make_ctx(steps_per_epoch=4, meta_interval=2, temperature=1.0)
    method = get_method("caat")
    state = make_state(ctx)
    step = jax.jit(make_train_step(ctx, method))
    updates, meta_changed, spent = [], [], []
    for i in range(5):
        before = state.method_state["meta_params"]
        ledger_before = float(state.ledger.forward)
        state, metrics = step(state, make_batch(i))
        assert np.isfinite(float(metrics["loss"]))
        updates.append(int(state.method_state["meta_updates"]))
        changed = not all(np.allclose(a, b) for a, b in zip(
            jax.tree.leaves(before), jax.tree.leaves(state.method_state["meta_params"]),
            strict=True))
        meta_changed.append(changed)
        spent.append(float(state.ledger.forward) - ledger_before)
    # in-epoch batch indices 1 and 3 (global steps 1, 3), then index 0 of epoch 2: no
    assert updates == [0, 1, 1, 2, 2]
    assert meta_changed == [False, True, False, True, False]
    assert spent[1] == spent[3] > spent[0] == spent[2] == spent[4] > 0  # the meta step's cost
    assert float(jnp.sum(state.method_state["class_count"])) == 5 * B
    assert float(jnp.sum(state.method_state["route_total"])) == 5 * B


def test_epoch_end_rolls_class_loss_and_refits_on_meta():
    ctx = make_ctx()
    method = get_method("caat")
    state = make_state(ctx)
    ms = dict(state.method_state, class_loss_sum=jnp.asarray([4.0, 3.0, 0.0]),
              class_count=jnp.asarray([2.0, 3.0, 0.0]), route_adv=jnp.asarray([1.0, 2.0, 0.0]),
              route_total=jnp.asarray([2.0, 3.0, 0.0]))
    state = state.replace(method_state=ms, step=jnp.asarray(ctx.steps_per_epoch, jnp.int32))
    calls = []

    def evaluator(s, split):
        calls.append(split)
        clean = PerClassCounts(correct=jnp.asarray([9.0, 5.0, 7.0]), total=jnp.full((C,), 10.0))
        robust = PerClassCounts(correct=jnp.asarray([5.0, 0.0, 6.0]), total=jnp.full((C,), 10.0))
        return clean, robust

    summary = method.summarize_state(state.method_state)
    assert summary["per_class_adv_fraction"] == [0.5, pytest.approx(2 / 3), None]
    new = method.epoch_end(state, ctx, evaluator)
    assert calls == ["meta"]
    nms = new.method_state
    np.testing.assert_allclose(nms["class_loss_last"], [2.0, 1.0, 5.0])  # unseen class keeps 5
    for key in ("class_loss_sum", "class_count", "route_adv", "route_total"):
        np.testing.assert_array_equal(nms[key], 0.0)
    # boundary errors [0.4, 0.5, 0.1]: class 1 is 0.167 above the mean, > delta1 = 0.07
    assert float(nms["lambdas"]["lambda1"][1]) > 0.0
    assert float(nms["lambdas"]["lambda2"][1]) > float(LAMBDA2[1])
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail("moved"),
                 nms, state.method_state)


def test_method_state_checkpoint_round_trip(tmp_path):
    ctx = make_ctx(steps_per_epoch=2, meta_interval=2)
    state = make_state(ctx)
    step = jax.jit(make_train_step(ctx, get_method("caat")))
    state, _ = step(state, make_batch(0))
    state, _ = step(state, make_batch(1))  # fires the meta update: non-trivial Adam state
    assert int(state.method_state["meta_updates"]) == 1
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(int(state.step), state, {"note": "test"})
    template = make_state(ctx, seed=1)
    restored, meta = ckpt.restore(template)
    ckpt.close()
    assert meta["note"] == "test"
    assert (jax.tree.structure(restored.method_state)
            == jax.tree.structure(state.method_state))
    for a, b in zip(jax.tree.leaves(restored.method_state), jax.tree.leaves(state.method_state),
                    strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------- config
def test_validation_and_scenarios():
    config = base_config()
    config.method = method_config("caat")
    config.data.meta_per_class = 10
    get_method("caat").validate(config)
    for field, bad in (("temperature", 0.0), ("meta_bn", "eval"), ("adv_weight_floor", 2.0),
                       ("meta_interval", 0)):
        broken = config.copy_and_resolve_references()
        broken.method[field] = bad
        with pytest.raises(ConfigError, match=f"method.{field}"):
            get_method("caat").validate(broken)
    config.data.meta_per_class = 0
    with pytest.raises(ConfigError, match="meta_per_class"):
        get_method("caat").validate(config)
    scenario = apply_scenario(base_config().data, "lt10+pairflip20")
    assert scenario.imbalance_factor == 10.0
    assert scenario.label_noise.kind == "flip2"
    assert scenario.label_noise.rate == pytest.approx(0.2)
    assert apply_scenario(base_config().data, "flip40").label_noise.kind == "flip1"
    with pytest.raises(ConfigError, match="not understood"):
        apply_scenario(base_config().data, "noise20")


# ---------------------------------------------------------------------- routing diagnostics
def test_routing_report_matches_hand_counts():
    from hamjax.analysis.caat_routing import routing_report

    labels = np.array([0, 0, 0, 1, 1, 2])
    clean = np.array([0, 1, 0, 1, 2, 2])  # examples 1 and 4 mislabelled
    adv = np.array([True, True, False, False, False, True])
    adv_init = np.array([True, False, False, False, False, True])
    adv_no_class = np.ones(6, bool)
    feats = np.arange(36, dtype=np.float64).reshape(6, 6)
    r = routing_report(adv, adv_init, adv_no_class, labels, clean, 3,
                       standardised_features=feats)
    assert r["per_class_adv_fraction"] == [2 / 3, 0.0, 1.0]
    # majorities: class 0 adv, class 1 anti, class 2 adv -> example 2 is the only one against
    assert r["class_majority_agreement"] == pytest.approx(5 / 6)
    assert r["agreement_with_initial_router"] == pytest.approx(5 / 6)
    assert r["agreement_without_class_features"] == pytest.approx(3 / 6)
    assert r["anti_share_mislabelled"] == pytest.approx(1 / 2)  # example 4 anti, 1 adv
    assert r["anti_share_correctly_labelled"] == pytest.approx(2 / 4)
    assert r["standardised_feature_mean"]["ce"] == {"adversary": (0 + 6 + 30) / 3,
                                                    "anti_adversary": (12 + 18 + 24) / 3}


def test_without_class_features_neutralises_only_the_class_columns():
    from hamjax.analysis.caat_routing import CLASS_FEATURES, without_class_features

    size = (5, caat_router.NUM_FEATURES)
    f = jnp.asarray(np.random.default_rng(0).normal(size=size), jnp.float32)
    g = np.asarray(without_class_features(f))
    for i in range(caat_router.NUM_FEATURES):
        if i in CLASS_FEATURES:
            np.testing.assert_allclose(g[:, i], np.full(5, np.mean(np.asarray(f)[:, i])),
                                       rtol=1e-6)
        else:
            np.testing.assert_array_equal(g[:, i], np.asarray(f)[:, i])


def test_fresh_state_routes_like_its_initial_router():
    """initial_meta_params rebuilds the trainer's seeded meta-net: zero drift, same decisions."""
    from hamjax.analysis.caat_routing import batch_routing, initial_meta_params, relative_drift

    ctx = make_ctx()
    state = create_train_state(ctx, get_method("caat"), seed=3)
    ms = state.method_state
    init = initial_meta_params(ctx, 3)
    assert relative_drift(ms["meta_params"], init) == 0.0
    other = initial_meta_params(ctx, 4)
    assert relative_drift(ms["meta_params"], other) > 0.1
    batch = make_batch()
    a = batch_routing(ctx, state.params, state.batch_stats, ms, ms["meta_params"],
                      batch["image"], batch["label"])
    b = batch_routing(ctx, state.params, state.batch_stats, ms, init, batch["image"],
                      batch["label"])
    np.testing.assert_array_equal(np.asarray(a["adv"]), np.asarray(b["adv"]))
    z = np.asarray(a["standardised_features"])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)


def test_fine_tune_from_another_methods_run_loads_only_weights(tmp_path):
    """CAAT fine-tuned from a PGD-AT run (another method state): weights and BN statistics
    come over, CAAT's own state stays fresh; another model's weights raise CheckpointError."""
    from hamjax.errors import CheckpointError
    from hamjax.run import load_init_weights

    ctx = make_ctx()
    source = create_train_state(ctx, get_method("pgd_at"), seed=7)
    source = source.replace(batch_stats=jax.tree.map(lambda v: v + 0.5, source.batch_stats))
    ckpt = Checkpointer(str(tmp_path / "warm"))
    ckpt.save(5, source, {"epochs": [1]}, kind="best")
    ckpt.close()
    fresh = create_train_state(ctx, get_method("caat"), seed=0)
    loaded = load_init_weights(fresh, str(tmp_path / "warm"))
    for got, want in zip(jax.tree.leaves((loaded.params, loaded.batch_stats)),
                         jax.tree.leaves((source.params, source.batch_stats)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert int(loaded.step) == 0
    for got, want in zip(jax.tree.leaves(loaded.method_state),
                         jax.tree.leaves(fresh.method_state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    wide = dataclasses.replace(ctx, model=TinyNet(num_classes=C + 1))
    other = create_train_state(wide, get_method("caat"), seed=0)
    with pytest.raises(CheckpointError, match="do not fit this run's model"):
        load_init_weights(other, str(tmp_path / "warm"))


def test_initialisation_lottery_counts_per_seed():
    from hamjax.analysis.caat_routing import initialisation_lottery

    labels = np.array([0, 0, 1, 1])
    out = initialisation_lottery({3: np.array([True, True, False, True]),
                                  5: np.zeros(4, bool)}, labels, 2)
    assert out[0] == {"seed": 3, "adv_fraction": 0.75, "per_class_adv_fraction": [1.0, 0.5],
                      "class_majority_agreement": 0.75}  # a tie counts as adversary
    assert out[1]["adv_fraction"] == 0.0 and out[1]["class_majority_agreement"] == 1.0


def test_meta_init_seed_fixes_the_router_apart_from_config_seed():
    from hamjax.analysis.caat_routing import (
        initial_meta_params,
        relative_drift,
        untrained_meta_params,
    )

    ctx = make_ctx(meta_init_seed=11)
    a = create_train_state(ctx, get_method("caat"), seed=0).method_state["meta_params"]
    b = create_train_state(ctx, get_method("caat"), seed=1).method_state["meta_params"]
    assert relative_drift(a, b) == 0.0  # config.seed no longer moves the router
    assert relative_drift(a, initial_meta_params(ctx, 0)) == 0.0
    assert relative_drift(a, untrained_meta_params(make_ctx(), 11)) == 0.0
    assert relative_drift(a, untrained_meta_params(ctx, 12)) > 0.1
    config = base_config()
    config.method = method_config("caat", meta_init_seed=-2)
    config.data.meta_per_class = 10
    with pytest.raises(ConfigError, match=r"config\.method\.meta_init_seed=-2"):
        caat.validate_caat(config)
