"""FRL: multiplier update and class weights against a NumPy port of the official scripts, the
per-example bound, epoch_end and one jitted train step on a tiny model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from toy_models import TinyNet

from hamjax.config import base_config, method_config
from hamjax.errors import ConfigError
from hamjax.methods import frl, get_method
from hamjax.metrics import PerClassCounts
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

C = 4


def make_ctx(name: str = "frl_rwrm", steps_per_epoch: int = 3, **method) -> StepContext:
    config = base_config()
    config.data.augment.crop_pad = 0
    config.data.augment.flip = False
    config.data.val_size = 40
    config.method = method_config(name)
    config.method.update(method)
    config.attack.eps = 0.05
    config.attack.step_size = 0.03
    config.attack.steps = 2
    config.train.lr = 0.1
    config.train.lr_schedule = "constant"
    config.train.weight_decay = 5e-4
    return StepContext(
        model=TinyNet(),
        tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, steps_per_epoch),
        config=ml_collections.FrozenConfigDict(config),
        num_classes=C,
        class_counts=np.array([10, 8, 6, 4]),
        steps_per_epoch=steps_per_epoch,
        image_shape=(4, 4, 1),
    )


def make_batch(seed: int = 0, batch: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(0, 1, (batch, 4, 4, 1)).astype(np.float32),
        "label": (np.arange(batch) % C).astype(np.int32),
        "index": np.arange(batch, dtype=np.int32),
    }


# ---------------------------------------------------------------- NumPy port of the scripts
def np_normalize_lambda(lmb, lim):
    lmb = np.maximum(lmb, 0.0)
    return lim * lmb / lmb.sum() if lmb.sum() > lim else lmb


def np_cost_sensitive(lam0, lam1, lam2, lo, hi):
    n = len(lam0)
    diff0 = np.ones(n) / n
    diff1 = np.ones(n) / n
    for i in range(n):
        for j in range(n):
            if j == i:
                diff0[i] += (n - 1) / n * lam0[i]
                diff1[i] += (n - 1) / n * lam1[i]
            else:
                diff0[i] -= 1 / n * lam0[j]
                diff1[i] -= 1 / n * lam1[j]
    return diff0, diff1, np.clip(np.exp(2 * lam2), lo, hi)


def np_update(lam, clean_err, bndy_err, delta0, delta1, rate1, rate2, lim, moves):
    gamma0 = clean_err - clean_err.mean() - delta0
    gamma1 = bndy_err - bndy_err.mean() - delta1
    lam0, lam1, lam2 = lam
    if moves[0]:
        lam0 = np_normalize_lambda(lam0 + rate1 * np.maximum(gamma0, -1000), lim)
    if moves[1]:
        lam1 = np_normalize_lambda(lam1 + rate1 * 2 * np.maximum(gamma1, -1000), lim)
    if moves[2]:
        lam2 = lam2 + rate2 * gamma1
    return lam0, lam1, lam2


@pytest.mark.parametrize("name", sorted(frl.VARIANTS))
def test_lambda_update_and_weights_match_numpy(name):
    rng = np.random.default_rng(3)
    moves = frl.VARIANTS[name]
    lam = (rng.uniform(0, 0.2, C), rng.uniform(0, 0.2, C), rng.normal(0, 0.3, C))
    lam_start = lam
    kw = dict(delta0=0.07, delta1=0.07, rate1=0.05, rate2=0.2, lim=0.5)
    for _ in range(5):  # several steps so that the clamp and the rescale both trigger
        clean_err = rng.uniform(0, 0.6, C)
        bndy_err = rng.uniform(0, 0.6, C)
        expected = np_update(lam, clean_err, bndy_err, moves=moves, **kw)
        got = frl.update_lambdas(
            {"lambda0": jnp.asarray(lam[0], jnp.float32),
             "lambda1": jnp.asarray(lam[1], jnp.float32),
             "lambda2": jnp.asarray(lam[2], jnp.float32)},
            clean_err, bndy_err, moves=moves, **kw)
        for k, e in zip(("lambda0", "lambda1", "lambda2"), expected, strict=True):
            np.testing.assert_allclose(got[k], e, rtol=1e-5, atol=1e-6)
        assert float(jnp.sum(got["lambda0"])) <= 0.5 + 1e-6
        assert float(jnp.min(got["lambda0"])) >= 0.0
        lam = expected
    w0, w1, mult = np_cost_sensitive(*lam, 0.98, 2.5)
    cfg = ml_collections.ConfigDict({"margin_min": 0.98, "margin_max": 2.5})
    got = frl.class_parameters({k: jnp.asarray(v, jnp.float32) for k, v in
                                zip(("lambda0", "lambda1", "lambda2"), lam, strict=True)}, cfg)
    for g, e in zip(got, (w0, w1, mult), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    assert np.all(w0 > 0) and np.all(w1 > 0)  # lim < 1 keeps the weights positive
    for k in range(3):
        if not moves[k]:  # a multiplier the variant does not move stays where it was
            np.testing.assert_array_equal(lam[k], lam_start[k])


def test_rate1_halving_and_class_errors():
    assert frl.rate1_for_epoch(0.05, 1, 40) == 0.05
    assert frl.rate1_for_epoch(0.05, 39, 40) == 0.05
    assert frl.rate1_for_epoch(0.05, 40, 40) == 0.025
    assert frl.rate1_for_epoch(0.05, 80, 40) == 0.0125
    clean_err, bndy_err = frl.class_errors([8, 5], [10, 10], [4, 5], [10, 10])
    np.testing.assert_allclose(clean_err, [0.2, 0.5])
    np.testing.assert_allclose(bndy_err, [0.4, 0.0])


def test_objective_reduces_to_trades_with_zero_multipliers():
    rng = np.random.default_rng(0)
    ce, kl = jnp.asarray(rng.uniform(0, 2, 8)), jnp.asarray(rng.uniform(0, 1, 8))
    w = frl.class_weights(jnp.zeros(C))[jnp.arange(8) % C]
    sep = frl.frl_objective(ce, kl, w, w, 1.5)
    np.testing.assert_allclose(sep, jnp.mean(ce) + 1.5 * jnp.mean(kl), rtol=1e-6)
    joint = frl.frl_objective(ce, kl, w, w, 1.5, normalise="joint")
    np.testing.assert_allclose(joint, (jnp.mean(ce) + 1.5 * jnp.mean(kl)) / 2, rtol=1e-6)


def fake_evaluator(clean_acc, robust_acc, n=10):
    clean = PerClassCounts(correct=jnp.asarray(clean_acc) * n, total=jnp.full((C,), n * 1.0))
    robust = PerClassCounts(correct=jnp.asarray(robust_acc) * n, total=jnp.full((C,), n * 1.0))
    calls = []

    def evaluator(state, split):
        calls.append(split)
        return clean, robust

    return evaluator, calls


@pytest.mark.parametrize("name", sorted(frl.VARIANTS))
def test_epoch_end_refits_on_val(name):
    ctx = make_ctx(name)
    method = get_method(name)
    state = create_train_state(ctx, method, seed=0)
    state = state.replace(step=jnp.asarray(2 * ctx.steps_per_epoch, jnp.int32))
    clean_acc, robust_acc = np.array([0.9, 0.8, 0.5, 0.7]), np.array([0.5, 0.3, 0.1, 0.4])
    evaluator, calls = fake_evaluator(clean_acc, robust_acc)
    new = method.epoch_end(state, ctx, evaluator)
    assert calls == ["val"]
    expected = np_update((np.zeros(C),) * 3, 1 - clean_acc, clean_acc - robust_acc, 0.07, 0.07,
                         0.05, 0.2, 0.5, frl.VARIANTS[name])
    for k, e in zip(("lambda0", "lambda1", "lambda2"), expected, strict=True):
        got = new.method_state["lambdas"][k]
        assert got.dtype == jnp.float32 and got.shape == (C,)
        np.testing.assert_allclose(got, e, rtol=1e-5, atol=1e-6)
    summary = method.summarize_state(new.method_state)
    assert len(summary["w0"]) == C and len(summary["eps_multiplier"]) == C


def test_epoch_end_uses_the_rate_of_the_epoch_it_precedes():
    """After `completed` epochs the update is the one before (1-based) epoch completed + 1, so
    with rate1 halved every 3 epochs the update after 2 epochs already uses rate1 / 2."""
    ctx = make_ctx("frl_rw", rate1_halve_every=3)
    method = get_method("frl_rw")
    state = create_train_state(ctx, method, seed=0)
    state = state.replace(step=jnp.asarray(2 * ctx.steps_per_epoch, jnp.int32))
    clean_acc, robust_acc = np.array([0.9, 0.8, 0.5, 0.7]), np.array([0.5, 0.3, 0.1, 0.4])
    evaluator, _ = fake_evaluator(clean_acc, robust_acc)
    new = method.epoch_end(state, ctx, evaluator)
    expected = np_update((np.zeros(C),) * 3, 1 - clean_acc, clean_acc - robust_acc, 0.07, 0.07,
                         0.05 / 2, 0.2, 0.5, frl.VARIANTS["frl_rw"])
    np.testing.assert_allclose(new.method_state["lambdas"]["lambda0"], expected[0], rtol=1e-5,
                               atol=1e-6)


def test_train_step_uses_class_bounds():
    ctx = make_ctx("frl_rwrm")
    method = get_method("frl_rwrm")
    state = create_train_state(ctx, method, seed=0)
    lambdas = dict(state.method_state["lambdas"])
    lambdas["lambda2"] = jnp.asarray([0.0, 0.1, 0.2, 0.45], jnp.float32)
    lambdas["lambda0"] = jnp.asarray([0.0, 0.1, 0.2, 0.1], jnp.float32)
    state = state.replace(method_state=dict(state.method_state, lambdas=lambdas))
    step = jax.jit(make_train_step(ctx, method))
    batch = make_batch()
    state1, metrics = step(state, batch)
    mult = np.clip(np.exp(2 * np.asarray(lambdas["lambda2"])), 0.98, 2.5)
    np.testing.assert_allclose(metrics["mean_eps"], 0.05 * mult[batch["label"]].mean(), rtol=1e-5)
    assert np.isfinite(float(metrics["loss"]))
    assert int(state1.step) == 1
    assert not np.allclose(state1.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])


def test_validation_names_the_field():
    config = base_config()
    config.data.val_size = 100
    config.method = method_config("frl_rm")
    get_method("frl_rm").validate(config)
    config.method.lim = 1.5
    with pytest.raises(ConfigError, match="method.lim"):
        get_method("frl_rm").validate(config)
    config.method.lim = 0.5
    config.data.val_size = 0
    with pytest.raises(ConfigError, match="val_size"):
        get_method("frl_rm").validate(config)
    del config.method["rate2"]
    config.data.val_size = 100
    with pytest.raises(ConfigError, match="method.rate2"):
        get_method("frl_rm").validate(config)
