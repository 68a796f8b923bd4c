"""GAIRAT and FAT: weights vs a NumPy formula, FAT's stopping rule, a real train step each."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hamjax.attacks import pgd
from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.methods.relatives import (
    fat_adversary,
    gair_weights,
    gairat_loss,
)
from hamjax.models.layers import batch_norm
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

B, C, K = 16, 4, 4
EPS, ALPHA = 0.1, 0.04


class MarkerNet(nn.Module):
    """conv-BN-ReLU-pool-dense plus 50 * round(x[:, 0, :C, 0]): markers fix the prediction."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        marker = jax.lax.stop_gradient(jnp.round(x[:, 0, :C, 0]))
        h = nn.Conv(6, (3, 3), strides=(2, 2))(x)
        h = nn.relu(batch_norm(h, train, mask, name="bn"))
        return nn.Dense(C)(jnp.mean(h, axis=(1, 2))) + 50.0 * marker


def make_ctx(method) -> StepContext:
    c = base_config()
    c.model.name = "small_cnn"  # unused: the context carries MarkerNet
    c.method = method
    c.attack.steps, c.attack.eps, c.attack.step_size = K, EPS, ALPHA
    c.train.batch_size = B
    c.train.lr_schedule = "constant"
    c.data.augment.crop_pad, c.data.augment.flip = 0, False
    config = ml_collections.FrozenConfigDict(c)
    return StepContext(
        model=MarkerNet(), tx=make_optimizer(config.train), lr_fn=make_lr_fn(config.train, 2),
        config=config, num_classes=C, class_counts=np.ones(C), steps_per_epoch=2,
        image_shape=(8, 8, 1),
    )


def marker_batch(wrong: np.ndarray, seed: int = 0) -> dict:
    """Rows with `wrong` True carry a wrong-class marker: misclassified at every iterate."""
    rs = np.random.RandomState(seed)
    x = rs.uniform(0.2, 0.8, (B, 8, 8, 1)).astype(np.float32)
    y = rs.randint(0, C, B).astype(np.int32)
    x[:, 0, :C, 0] = 0.0
    x[np.arange(B), 0, np.where(wrong, (y + 1) % C, y), 0] = 1.0
    return {"image": jnp.asarray(x), "label": jnp.asarray(y), "index": jnp.arange(B)}


def numpy_gair(kappa, steps, lam, mask):
    raw = (np.tanh(lam + 5.0 * (1.0 - 2.0 * np.asarray(kappa, np.float64) / steps)) + 1.0) / 2.0
    raw = np.where(mask, raw, 0.0)
    return raw * mask.sum() / raw.sum()


@pytest.mark.parametrize("lam", [-1.0, 0.0, 2.0])
def test_gair_weights_match_numpy(lam):
    kappa = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 0, 3], np.int32)
    mask = np.arange(len(kappa)) % 4 != 1
    got = np.asarray(gair_weights(jnp.asarray(kappa), 10, lam, jnp.asarray(mask)))
    np.testing.assert_allclose(got, numpy_gair(kappa, 10, lam, mask), rtol=1e-5, atol=1e-6)
    assert abs(got[mask].mean() - 1.0) < 1e-5
    assert np.all(got[~mask] == 0)
    full = np.asarray(gair_weights(jnp.asarray(kappa), 10, lam))
    np.testing.assert_allclose(full, numpy_gair(kappa, 10, lam, np.ones(len(kappa), bool)),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(full[:11]) <= 0)  # kappa 0..10: fewer correct iterates, more weight


def _stepped(ctx, step: int, seed: int = 0):
    state = create_train_state(ctx, get_method(ctx.config.method.name), seed)
    return state.replace(step=jnp.int32(step))


def test_gairat_loss_is_kappa_weighted_after_begin_epoch():
    ctx = make_ctx(method_config("gairat", begin_epoch=1))
    wrong = np.arange(B) % 3 == 0
    batch, rng = marker_batch(wrong, seed=1), jax.random.PRNGKey(2)
    x, y = batch["image"], batch["label"]
    loss_fn = jax.jit(lambda st: gairat_loss(st.params, st, batch, rng, ctx))
    for step, weighted in ((0, False), (2, True)):
        state = _stepped(ctx, step)
        variables = {"params": state.params, "batch_stats": state.batch_stats}

        def logits_fn(z, variables=variables):
            return ctx.model.apply(variables, z, train=False)

        x_adv, info = pgd(logits_fn, x, y, rng, eps=EPS, step_size=ALPHA, steps=K,
                          final_eval=False)
        logits, _ = ctx.model.apply(variables, x_adv, train=True, mutable=["batch_stats"])
        ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        kappa = np.asarray(info.kappa)
        assert np.all(kappa[wrong] == 0)  # markers: misclassified from the start
        w = numpy_gair(kappa, K, -1.0, np.ones(B, bool)) if weighted else np.ones(B)
        loss, aux = loss_fn(state)
        np.testing.assert_allclose(float(loss), float(np.mean(ce * w)), rtol=1e-5)
        assert float(aux["metrics"]["max_weight"]) > 1.0 if weighted else True


def test_gairat_train_step():
    ctx = make_ctx(method_config("gairat", begin_epoch=0))
    state = _stepped(ctx, 0)
    new, metrics = jax.jit(make_train_step(ctx, get_method("gairat")))(
        state, marker_batch(np.arange(B) % 2 == 0, seed=3)
    )
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["update_applied"]) == 1.0
    assert float(new.ledger.forward) == float(new.ledger.backward) == (K + 1) * B
    assert any(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.any(u != v)),
                                            new.params, state.params)))


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_fat_stops_examples_tau_steps_after_crossing(tau):
    """Rows misclassified from the start move exactly tau steps; the others all K steps."""
    ctx = make_ctx(method_config("fat", tau=tau))
    state = _stepped(ctx, 0)
    wrong = np.arange(B) % 2 == 0
    batch, rng = marker_batch(wrong, seed=4), jax.random.PRNGKey(5)
    x, y = batch["image"], batch["label"]
    x_fat, info = jax.jit(lambda st: fat_adversary(ctx, st.params, st.batch_stats, x, y, rng))(
        state
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def plain(steps):
        def logits_fn(z):
            return ctx.model.apply(variables, z, train=False)

        return np.asarray(pgd(logits_fn, x, y, rng, eps=EPS, step_size=ALPHA, steps=steps,
                              final_eval=False)[0])

    x_fat = np.asarray(x_fat)
    np.testing.assert_allclose(x_fat[wrong], plain(tau)[wrong], atol=1e-6)
    np.testing.assert_allclose(x_fat[~wrong], plain(K)[~wrong], atol=1e-6)
    assert not np.allclose(plain(tau + 1)[wrong], x_fat[wrong])  # it really stopped
    np.testing.assert_array_equal(np.asarray(info.active), ~wrong)


def test_fat_train_step_counts_executed_passes():
    ctx = make_ctx(method_config("fat", tau=0))
    state = _stepped(ctx, 0)
    new, metrics = jax.jit(make_train_step(ctx, get_method("fat")))(
        state, marker_batch(np.arange(B) % 4 == 0, seed=6)
    )
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["stopped_fraction"]) == 0.25
    # Stopped rows are masked, not removed: all K steps still run on all B rows.
    assert float(new.ledger.forward) == float(new.ledger.backward) == (K + 1) * B


def test_fat_loss_is_train_mode_ce_on_the_friendly_examples():
    """FAT's loss: mean CE of the model with BatchNorm in train mode (batch statistics, running
    ones updated) at the early-stopped examples, as the reference trains."""
    ctx = make_ctx(method_config("fat", tau=1))
    state = _stepped(ctx, 0)
    batch, rng = marker_batch(np.arange(B) % 2 == 0, seed=7), jax.random.PRNGKey(8)
    x, y = batch["image"], batch["label"]
    loss, aux = jax.jit(lambda st: get_method("fat").loss_fn(st.params, st, batch, rng, ctx))(
        state)
    x_fat, _ = fat_adversary(ctx, state.params, state.batch_stats, x, y, rng)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, new = ctx.model.apply(variables, x_fat, train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    np.testing.assert_allclose(float(loss), float(jnp.mean(ce)), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 aux["batch_stats"], new["batch_stats"])


@pytest.mark.parametrize(
    "method, field, value",
    [("gairat", "gair_lambda", "x"), ("gairat", "begin_epoch", -1), ("fat", "tau", -1),
     ("fat", "tau", 0.5)],
)
def test_validation_names_the_field(method, field, value):
    c = base_config()
    c.method = method_config(method, **{field: value})
    with pytest.raises(ConfigError, match=f"config.method.{field}"):
        validate_config(c)


def test_method_configs_validate():
    for method in (method_config("gairat"), method_config("fat", tau=2)):
        c = base_config()
        c.method = method
        validate_config(c)
    with pytest.raises(ConfigError, match="tau_max"):
        method_config("fat", tau_max=3)
