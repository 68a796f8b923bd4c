"""hamjax.attacks.autoattack_ensemble / checks and run_autoattack: per-example worst case over
attacks (fake attacks with known outcomes), the host driver re-attacking only robust examples in
fixed-size chunks, results independent of the batch size, the gradient-masking checks, the
public names, and the real ensemble against PGD on a tiny trained model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import toy_data, train_mlp

from hamjax.attacks import STANDARD_ATTACKS, autoattack, chunked, pgd
from hamjax.attacks.checks import output_gap
from hamjax.evaluation.autoattack import run_autoattack
from hamjax.evaluation.driver import Driver
from hamjax.sharding import make_mesh

N, C, EPS = 48, 4, 0.15


# ---------------------------------------------------------------- a linear model and fake attacks
# Pixel 0 carries the example's index (its weights are 0, so the model ignores it and the
# corner attacks below never move it): fake attacks and callbacks can tell who they got.

def _problem(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(16, C)).astype(np.float32)
    w[0] = 0.0
    x = rng.uniform(0.2, 0.8, (N, 4, 4, 1)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(N) / 64.0
    logits_fn = _linear(jnp.asarray(w))
    y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)).astype(np.int32)
    y[::7] = (y[::7] + 1) % C  # a few clean-misclassified examples
    return logits_fn, w, x, y


def _linear(w):
    return lambda z: z.reshape(z.shape[0], -1) @ w


def _corner(x, y, w, target, scale):
    """x + scale * EPS * sign(w_target - w_y): the best point towards `target` (linear model)."""
    d = (w[:, target] - w[:, y]).T.reshape(x.shape)
    return np.clip(x + scale * EPS * np.sign(d), 0, 1).astype(np.float32)


def _index(x):
    return jnp.round(x[:, 0, 0, 0] * 64).astype(jnp.int32)


def _table_attack(points, chosen, seen=None, traces=None):
    """A fake attack returning points[i] for chosen examples i, x otherwise."""
    points, chosen = jnp.asarray(points), jnp.asarray(chosen)

    def attack(logits_fn, x, y, key, *, eps, norm, num_classes):
        if traces is not None:
            traces.append(x.shape)  # runs once per trace, i.e. per compilation
        idx = _index(x)
        if seen is not None:
            jax.debug.callback(lambda i: seen.append(np.asarray(i).copy()), idx)
        pick = chosen[idx].reshape(-1, 1, 1, 1)
        return jnp.where(pick, points[idx], x), None
    return attack


def _fake_setup():
    logits_fn, w, x, y = _problem()
    ids = np.arange(N)
    adv_a = _corner(x, y, w, (y + 1) % C, 1.0)
    adv_b = _corner(x, y, w, (y + 2) % C, 0.9)
    chosen_a, chosen_b = ids % 2 == 0, ids % 3 != 1
    predict = lambda z: np.asarray(jnp.argmax(logits_fn(jnp.asarray(z)), -1))  # noqa: E731
    clean_ok = predict(x) == y
    fooled_a = chosen_a & (predict(adv_a) != y) & clean_ok
    fooled_b = chosen_b & (predict(adv_b) != y) & clean_ok
    expected_robust = clean_ok & ~fooled_a & ~fooled_b
    expected_x = np.where(fooled_a[:, None, None, None], adv_a,
                          np.where(fooled_b[:, None, None, None], adv_b, x))
    # the fixture must contain every case: A only, B only, both, neither, clean-wrong
    assert (fooled_a & ~fooled_b).any() and (fooled_b & ~fooled_a).any()
    assert (fooled_a & fooled_b).any() and expected_robust.any() and (~clean_ok).any()
    return dict(logits_fn=logits_fn, x=x, y=y, adv_a=adv_a, adv_b=adv_b, chosen_a=chosen_a,
                chosen_b=chosen_b, clean_ok=clean_ok, fooled_a=fooled_a, fooled_b=fooled_b,
                robust=expected_robust, x_adv=expected_x)


@pytest.mark.parametrize("per_example_eps", [False, True])
def test_worst_case_over_attacks_jitted(per_example_eps):
    s = _fake_setup()
    attacks = {"A": _table_attack(s["adv_a"], s["chosen_a"]),
               "B": _table_attack(s["adv_b"], s["chosen_b"])}
    eps = np.full(N, EPS, np.float32) if per_example_eps else EPS
    run = jax.jit(functools.partial(autoattack, s["logits_fn"], eps=eps, version="custom",
                                    attacks=attacks, num_classes=C))
    x_adv, res = run(jnp.asarray(s["x"]), jnp.asarray(s["y"]), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(res.clean_correct, s["clean_ok"])
    np.testing.assert_array_equal(res.robust, s["robust"])
    np.testing.assert_array_equal(res.robust_after["A"], s["clean_ok"] & ~s["fooled_a"])
    np.testing.assert_array_equal(res.fooled_by["B"], s["fooled_b"])  # run on all in jit mode
    np.testing.assert_allclose(np.asarray(x_adv), s["x_adv"])  # first success kept
    assert res.attack_names == ("A", "B")
    assert res.warnings == []


def test_driver_matches_and_reattacks_only_robust_examples():
    s = _fake_setup()
    seen_b, traces_a, traces_b = [], [], []
    attacks = {"A": _table_attack(s["adv_a"], s["chosen_a"], traces=traces_a),
               "B": _table_attack(s["adv_b"], s["chosen_b"], seen=seen_b, traces=traces_b)}
    logs = []
    x_adv, res = run_autoattack(s["logits_fn"], s["x"], s["y"], jax.random.PRNGKey(0), eps=EPS,
                                version="custom", attacks=attacks, num_classes=C, batch_size=16,
                                log_fn=logs.append)
    np.testing.assert_array_equal(res.robust, s["robust"])
    np.testing.assert_allclose(x_adv, s["x_adv"])
    survivors = np.flatnonzero(s["clean_ok"] & ~s["fooled_a"])
    np.testing.assert_array_equal(np.unique(np.concatenate(seen_b)), survivors)
    # Chunks of 16, the tail in pieces of 8, 4 or 2 rows (`Driver.chunk_plan`, tested in
    # test_evaluation); one compile per attack and chunk size.
    driver = Driver(make_mesh(), 16)
    sizes = [driver.chunk_size(c) for c in driver.chunk_plan(len(survivors))]
    assert [len(batch) for batch in seen_b] == sizes
    assert len(traces_b) == len(set(sizes))
    attacked_a = int(s["clean_ok"].sum())
    assert len(traces_a) == len({driver.chunk_size(c) for c in driver.chunk_plan(attacked_a)})
    assert res.fooled_by["B"][~(s["clean_ok"] & ~s["fooled_a"])].sum() == 0
    assert any(f"of {len(survivors)} attacked" in line for line in logs)


def test_chunked_batch_fn_gives_same_result():
    s = _fake_setup()
    attacks = {"A": _table_attack(s["adv_a"], s["chosen_a"]),
               "B": _table_attack(s["adv_b"], s["chosen_b"])}
    x_adv, res = autoattack(s["logits_fn"], jnp.asarray(s["x"]), jnp.asarray(s["y"]),
                            jax.random.PRNGKey(0), eps=EPS, version="custom", attacks=attacks,
                            num_classes=C, batch_fn=chunked(12))
    np.testing.assert_array_equal(res.robust, s["robust"])
    np.testing.assert_allclose(np.asarray(x_adv), s["x_adv"])


def test_outputs_outside_threat_model_are_rejected_and_flagged():
    s = _fake_setup()
    def cheat(logits_fn, x, y, key, *, eps, norm, num_classes):
        return jnp.clip(x + 2 * EPS, 0, 1)  # x is in [0.2, 0.8]: every pixel moves > eps

    _, res = autoattack(s["logits_fn"], jnp.asarray(s["x"]), jnp.asarray(s["y"]),
                        jax.random.PRNGKey(0), eps=EPS, version="custom",
                        attacks={"cheat": cheat}, num_classes=C)
    np.testing.assert_array_equal(res.robust, s["clean_ok"])
    assert any("outside the eps ball" in w for w in res.warnings)


def test_argument_errors():
    logits_fn, _, x, y = _problem()
    kw = dict(eps=EPS, num_classes=C)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="custom"):
        autoattack(logits_fn, x, y, key, attacks=["apgd-ce"], **kw)
    with pytest.raises(ValueError, match="needs attacks"):
        autoattack(logits_fn, x, y, key, version="custom", **kw)
    with pytest.raises(ValueError, match="unknown attacks"):
        autoattack(logits_fn, x, y, key, version="custom", attacks=["pgd-7"], **kw)
    with pytest.raises(ValueError, match="not run"):
        autoattack(logits_fn, x, y, key, version="custom", attacks=["apgd-ce"],
                   attack_kwargs={"square": {}}, **kw)
    with pytest.raises(ValueError, match="version"):
        autoattack(logits_fn, x, y, key, version="plus", **kw)


# ---------------------------------------------------------------- checks

def _noop(logits_fn, x, y, key, *, eps, norm, num_classes):
    return x


def test_checks_flag_zero_gradients():
    _, w, x, y = _problem()
    quantised = lambda z: _linear(jnp.asarray(w))(jnp.round(z * 4) / 4)  # noqa: E731
    y = np.asarray(jnp.argmax(quantised(jnp.asarray(x)), -1))
    _, res = autoattack(quantised, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0),
                        eps=EPS, version="custom", attacks=["apgd-ce"], num_classes=C,
                        attack_kwargs={"apgd-ce": dict(steps=3)})
    assert int(res.n_zero_grad) == int(res.n_grad_checked) == N
    assert any(w.startswith("zero gradients") for w in res.warnings)


def test_checks_pass_a_deterministic_differentiable_model():
    logits_fn, _, x, y = _problem()
    _, res = run_autoattack(logits_fn, x, y, jax.random.PRNGKey(0), eps=EPS, version="custom",
                            attacks=["apgd-ce"], num_classes=C, batch_size=16,
                            attack_kwargs={"apgd-ce": dict(steps=3)}, log_fn=lambda _: None)
    assert res.warnings == []
    assert float(res.output_gap) == 0.0 and int(res.n_zero_grad) == 0


def test_checks_flag_a_randomised_model():
    _, w, x, y = _problem()
    host_rng = np.random.default_rng(0)

    def noisy(z):  # Python-level noise: a fresh draw on every eager call
        noise = host_rng.normal(size=(z.shape[0], C)).astype(np.float32)
        return _linear(jnp.asarray(w))(z) + jnp.asarray(noise)

    _, res = run_autoattack(noisy, x, y, jax.random.PRNGKey(0), eps=EPS, version="custom",
                            attacks={"none": _noop}, num_classes=C, batch_size=16,
                            log_fn=lambda _: None)
    assert any(w.startswith("randomised outputs") for w in res.warnings)
    assert float(output_gap([jnp.ones((2, 3)), jnp.ones((2, 3))])) == 0.0


def test_checks_flag_probabilities():
    logits_fn, _, x, y = _problem()
    probs = lambda z: jax.nn.softmax(logits_fn(z))  # noqa: E731
    _, res = autoattack(probs, jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0), eps=EPS,
                        version="custom", attacks={"none": _noop}, num_classes=C)
    assert any("probabilities" in w for w in res.warnings)


def test_checks_flag_square_beating_white_box():
    s = _fake_setup()
    square_like = _table_attack(s["adv_a"], s["chosen_a"])
    for runner in ("jit", "driver"):
        attacks = {"apgd-ce": _noop, "square": square_like}
        if runner == "jit":
            _, res = autoattack(s["logits_fn"], jnp.asarray(s["x"]), jnp.asarray(s["y"]),
                                jax.random.PRNGKey(0), eps=EPS, version="custom",
                                attacks=attacks, num_classes=C)
        else:
            _, res = run_autoattack(s["logits_fn"], s["x"], s["y"], jax.random.PRNGKey(0),
                                    eps=EPS, version="custom", attacks=attacks, num_classes=C,
                                    batch_size=16, log_fn=lambda _: None)
        assert any(w.startswith("black-box beats white-box") for w in res.warnings), runner
    # when the white-box attack already finds them, Square adds nothing and nobody complains
    _, res = autoattack(s["logits_fn"], jnp.asarray(s["x"]), jnp.asarray(s["y"]),
                        jax.random.PRNGKey(0), eps=EPS, version="custom",
                        attacks={"apgd-ce": square_like, "square": square_like}, num_classes=C)
    assert res.warnings == []


# ---------------------------------------------------------------- the real ensemble


@pytest.fixture(scope="module")
def toy():
    x, y = toy_data(n=128)
    return train_mlp(x, y), x, y


def test_standard_autoattack_beats_pgd20(toy):
    logits_fn, x, y = toy
    eps = 0.03
    x_pgd, _ = jax.jit(lambda a, b: pgd(logits_fn, a, b, jax.random.PRNGKey(1), eps=eps,
                                        step_size=eps / 4, steps=20))(x, y)
    pgd_robust = np.asarray(jnp.argmax(logits_fn(x_pgd), -1)) == y
    logs = []
    x_adv, res = run_autoattack(logits_fn, x, y, jax.random.PRNGKey(0), eps=eps, num_classes=C,
                                n_queries=1000, batch_size=64, log_fn=logs.append)
    assert res.attack_names == STANDARD_ATTACKS
    assert res.clean_accuracy > 0.9
    assert res.robust_accuracy <= pgd_robust.mean()
    assert res.robust_accuracy < res.clean_accuracy
    # every reported success is real and inside the ball
    assert np.abs(x_adv - x).max() <= eps + 1e-6
    np.testing.assert_array_equal(
        res.robust, res.clean_correct & (np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y))
    assert res.warnings == []  # 3 targets = min(9, C - 1) is the standard setting here
    assert len(logs) >= len(STANDARD_ATTACKS) + 2


def test_custom_subset_jitted(toy):
    logits_fn, x, y = toy
    run = jax.jit(functools.partial(
        autoattack, logits_fn, eps=0.03, version="custom", attacks=["apgd-ce", "square"],
        num_classes=C, n_queries=200, attack_kwargs={"apgd-ce": dict(steps=10)}))
    x_adv, res = run(jnp.asarray(x), jnp.asarray(y), jax.random.PRNGKey(0))
    assert res.attack_names == ("apgd-ce", "square")
    assert set(res.robust_after) == {"apgd-ce", "square"}
    ra = {k: np.asarray(v) for k, v in res.robust_after.items()}
    assert np.all(ra["square"] <= ra["apgd-ce"]) and np.all(ra["apgd-ce"] <= res.clean_correct)
    np.testing.assert_array_equal(res.robust, ra["square"])
    assert res.robust_accuracy < res.clean_accuracy
    np.testing.assert_array_equal(
        res.robust, np.asarray(jnp.argmax(logits_fn(x_adv), -1) == y) & res.clean_correct)


def test_jitted_skips_attacks_once_nothing_is_robust():
    logits_fn, _, x, _ = _problem()
    pred = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
    calls = []

    def spy(logits_fn, x, y, key, *, eps, norm, num_classes):
        jax.debug.callback(lambda: calls.append(1))
        return x

    for labels, expect_call in (((pred + 1) % C, False), (pred, True)):  # all wrong / all right
        calls.clear()
        _, res = jax.jit(functools.partial(
            autoattack, logits_fn, eps=EPS, version="custom", attacks={"spy": spy},
            num_classes=C))(jnp.asarray(x), jnp.asarray(labels), jax.random.PRNGKey(0))
        jax.effects_barrier()
        assert bool(calls) == expect_call
        assert np.asarray(res.robust).all() == expect_call


def test_driver_results_do_not_depend_on_the_batch_size(toy):
    """Each example draws from its own key (its index folded in): batches of 32 and 128 give
    the same per-example outcome of every attack and the same adversarial points."""
    logits_fn, x, y = toy
    fast = {"apgd-ce": dict(steps=10), "apgd-t": dict(steps=10), "fab-t": dict(steps=10),
            "square": dict(n_queries=100)}
    runs = [run_autoattack(logits_fn, x, y, jax.random.PRNGKey(3), eps=0.03, num_classes=C,
                           attack_kwargs=fast, batch_size=b, log_fn=None, progress=False)
            for b in (32, 128)]
    (x32, r32), (x128, r128) = runs
    np.testing.assert_array_equal(r32.clean_correct, r128.clean_correct)
    for name in STANDARD_ATTACKS:
        np.testing.assert_array_equal(r32.fooled_by[name], r128.fooled_by[name], err_msg=name)
        np.testing.assert_array_equal(r32.robust_after[name], r128.robust_after[name])
    np.testing.assert_array_equal(x32, x128)
    assert r32.robust_accuracy < r32.clean_accuracy  # the attacks did something


def test_attacks_are_importable_by_their_names():
    """The README's names are the functions; every module imports as itself."""
    import importlib

    import hamjax.attacks as attacks

    for name in ("pgd", "fgsm", "apgd", "apgd_targeted", "fab", "fab_targeted", "square",
                 "autoattack", "ham_mine", "mine_hard"):
        assert callable(getattr(attacks, name)), name
    for module in ("pgd_attack", "apgd_attack", "fab_attack", "square_attack",
                   "autoattack_ensemble", "checks", "losses", "mining", "rng"):
        loaded = importlib.import_module(f"hamjax.attacks.{module}")
        assert loaded.__name__ == f"hamjax.attacks.{module}"
