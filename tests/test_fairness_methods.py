"""CFA, DAFA, WAT and FAAL (and the TRADES terms and training attack under them) against the
official code: the reference's hand-computable cases, NumPy transcriptions of the official
formulas on random inputs (losses with their BatchNorm modes and forward order, class-wise
updates), the class-wise attack radii and starts, field validation, and a resumed run equal to
an uninterrupted one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from digits_configs import digits_config
from launching import run_on_host_devices
from scipy.optimize import minimize
from toy_models import TinyNet

from hamjax.attacks import pgd
from hamjax.config import base_config, method_config
from hamjax.errors import ConfigError
from hamjax.evaluation.driver import Driver, map_examples
from hamjax.methods import cfa, dafa, faal, get_method, wat
from hamjax.methods.baselines import trades_adversary, trades_terms
from hamjax.methods.common import train_attack
from hamjax.models import make_logits_fn
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.sharding import make_mesh
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

K = 4
B = 8
EPS = 0.05


def make_ctx(name: str, steps_per_epoch: int = 3, eps: float = EPS, step_size: float = 0.03,
             **method) -> StepContext:
    config = base_config()
    config.data.augment.crop_pad = 0
    config.data.augment.flip = False
    config.data.val_size = 40
    config.method = method_config(name, **method)
    config.attack.eps = eps
    config.attack.step_size = step_size
    config.attack.steps = 2
    config.train.lr = 0.1
    config.train.lr_schedule = "constant"
    return StepContext(
        model=TinyNet(),
        tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, steps_per_epoch),
        config=ml_collections.FrozenConfigDict(config),
        num_classes=K,
        class_counts=np.array([10, 8, 6, 4]),
        steps_per_epoch=steps_per_epoch,
        image_shape=(4, 4, 1),
    )


def make_batch(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(0.2, 0.8, (B, 4, 4, 1)).astype(np.float32),
            "label": (np.arange(B) % K).astype(np.int32)}


def trained_state(ctx, name: str, seed: int = 0):
    """A state whose BN running statistics are not the initial ones (eval-BN != train-BN)."""
    state = create_train_state(ctx, get_method(name), seed=seed)
    stats = jax.tree.map(lambda v: v + 0.3, state.batch_stats)
    return state.replace(batch_stats=stats)


# ---------------------------------------------------------------- independent references
def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(logits, y):
    return -np.log(np_softmax(logits)[np.arange(len(y)), y])


def np_kl(target_logits, adv_logits):
    """nn.KLDivLoss(reduction='none')(log_softmax(adv), softmax(target)).sum(1)."""
    p, q = np_softmax(target_logits), np_softmax(adv_logits)
    return np.sum(p * (np.log(p) - np.log(q)), axis=1)


def flax_train_forwards(ctx, state, *inputs):
    """Train-mode forwards in the given order through flax directly, threading the running
    statistics: the logits of each and the final statistics."""
    stats, outs = state.batch_stats, []
    for x in inputs:
        logits, upd = ctx.model.apply({"params": state.params, "batch_stats": stats},
                                      jnp.asarray(x), train=True, mutable=["batch_stats"])
        stats = upd["batch_stats"]
        outs.append(np.asarray(logits, np.float64))
    return outs, stats


def assert_stats_equal(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------- TRADES's terms and the training attack, shared by all
def test_trades_terms_match_numpy_on_train_bn_forwards_clean_first():
    """trades_terms: CE on the clean logits, KL(softmax(clean) || softmax(adv)) per example,
    both forwards in train mode, clean first, the BN statistics of the last one returned."""
    ctx = make_ctx("trades")
    state = trained_state(ctx, "trades")
    batch = make_batch(6)
    x, y = batch["image"], batch["label"]
    x_adv = np.clip(x + 0.04, 0, 1).astype(np.float32)
    ce, kl, _, _, stats = trades_terms(ctx, state.params, state.batch_stats, x, y, x_adv)
    (clean, adv), want_stats = flax_train_forwards(ctx, state, x, x_adv)
    np.testing.assert_allclose(ce, np_ce(clean, y), rtol=1e-5)
    np.testing.assert_allclose(kl, np_kl(clean, adv), rtol=1e-4, atol=1e-6)
    assert_stats_equal(stats, want_stats)


def test_the_training_attack_runs_the_model_in_eval_bn():
    """`config.attack.bn_mode` = eval (the default): the attack equals PGD on the eval-BN
    logits, which differ from train-BN ones on a state with moved running statistics."""
    ctx = make_ctx("mart")
    assert ctx.config.attack.bn_mode == "eval"
    state = trained_state(ctx, "mart")
    batch = make_batch(3)
    x, y, key = batch["image"], batch["label"], jax.random.PRNGKey(7)
    got, _ = train_attack(ctx, state.params, state.batch_stats, x, y, key, loss="ce",
                          init="normal")
    logits_fn = make_logits_fn(ctx.model, {"params": state.params,
                                           "batch_stats": state.batch_stats}, bn_mode="eval")
    want, _ = pgd(logits_fn, x, y, key, eps=EPS, step_size=0.03, steps=2, loss="ce",
                  init="normal", final_eval=False)
    np.testing.assert_allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------- CFA
def test_cfa_hand_case():
    t = jnp.asarray([0.2, 0.5])
    np.testing.assert_allclose(cfa.calibrated_eps_scale(t, 0.5) * 8 / 255,
                               [5.6 / 255, 8 / 255], rtol=1e-6)
    beta = cfa.calibrated_beta(t, 0.5, 6.0)
    np.testing.assert_allclose(beta, [4.2, 6.0], rtol=1e-6)
    np.testing.assert_allclose(cfa.convex_weight(beta), [0.8076923, 6 / 7], rtol=1e-6)


@pytest.mark.parametrize("scale", ["convex", "trades"])
def test_cfa_trades_loss_matches_official_transcription(scale):
    """cw_trades_loss: clean, adversarial and clean again in train mode (in that order), loss
    sum((1 - b) CE / B + b KL / B); and the KL target's gradient is kept."""
    ctx = make_ctx("cfa", trades_scale=scale)
    state = trained_state(ctx, "cfa")
    batch = make_batch(1)
    x, y = batch["image"], batch["label"]
    x_adv = np.clip(x + np.random.default_rng(2).uniform(-EPS, EPS, x.shape), 0, 1).astype(
        np.float32)
    class_beta = jnp.asarray([1.0, 2.5, 4.2, 6.0])
    loss, _, stats, _ = cfa.cfa_trades_from_adv(ctx, state.params, state.batch_stats, x, y,
                                                x_adv, class_beta)
    (clean, adv, target), want_stats = flax_train_forwards(ctx, state, x, x_adv, x)
    b = np.asarray(class_beta)[y] / (1 + np.asarray(class_beta)[y])
    want = np.sum((1 - b) * np_ce(clean, y) / B + b * np_kl(target, adv) / B)
    want *= 7.0 if scale == "trades" else 1.0
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert_stats_equal(stats, want_stats)

    def official(params):  # the same three forwards, written out; gradient through all
        def fwd(z, s):
            out, upd = ctx.model.apply({"params": params, "batch_stats": s}, z, train=True,
                                       mutable=["batch_stats"])
            return out, upd["batch_stats"]

        c, s = fwd(x, state.batch_stats)
        a, s = fwd(x_adv, s)
        t, _ = fwd(x, s)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(c), y[:, None], 1)[:, 0]
        kl = jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - jax.nn.log_softmax(a)), 1)
        bb = jnp.asarray(b, jnp.float32)
        return jnp.sum((1 - bb) * ce / B + bb * kl / B) * (7.0 if scale == "trades" else 1.0)

    got_grad = jax.grad(lambda p: cfa.cfa_trades_from_adv(
        ctx, p, state.batch_stats, x, y, x_adv, class_beta)[0])(state.params)
    for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(jax.grad(official)(state.params)),
                    strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_cfa_step_counts_training_robust_accuracy_and_epoch_end_calibrates():
    ctx = make_ctx("cfa", begin=2)
    method = get_method("cfa")
    state = create_train_state(ctx, method, seed=0)
    step = jax.jit(make_train_step(ctx, method))
    batch = make_batch(3)
    state1, metrics = step(state, batch)
    ms = state1.method_state
    np.testing.assert_array_equal(ms["count"], np.bincount(batch["label"], minlength=K))
    np.testing.assert_allclose(np.sum(ms["correct"]), metrics["train_robust_acc"] * B, atol=1e-5)
    np.testing.assert_allclose(metrics["mean_eps"], EPS, rtol=1e-6)  # before `begin`: eps

    correct, count = np.array([1.0, 2.0, 0.0, 3.0]), np.array([2.0, 4.0, 2.0, 3.0])
    t = correct / count
    filled = dict(ms, correct=jnp.asarray(correct), count=jnp.asarray(count))
    for completed, calibrated in ((1, False), (2, True)):
        at = state1.replace(method_state=filled,
                            step=jnp.asarray(completed * ctx.steps_per_epoch, jnp.int32))
        new = method.epoch_end(at, ctx, None).method_state
        want_eps = 0.5 + t if calibrated else np.ones(K)
        want_beta = (0.5 + t) * 6.0 if calibrated else np.full(K, 6.0)
        np.testing.assert_allclose(new["eps_scale"], want_eps, rtol=1e-6)
        np.testing.assert_allclose(new["beta"], want_beta, rtol=1e-6)
        np.testing.assert_array_equal(new["count"], np.zeros(K))
        np.testing.assert_array_equal(new["correct"], np.zeros(K))
    summary = method.summarize_state(filled)
    np.testing.assert_allclose(summary["train_robust_acc"], t, atol=1e-6)

    # The next epoch attacks class c within (0.5 + t_c) eps.
    calibrated = state1.replace(method_state=new)
    _, metrics = step(calibrated, batch)
    np.testing.assert_allclose(metrics["mean_eps"], EPS * np.mean((0.5 + t)[batch["label"]]),
                               rtol=1e-5)
    # CCR off, or the AT base: beta stays; an epoch with nothing counted changes nothing.
    for overrides in ({"ccr": False}, {"base": "at"}):
        ctx2 = make_ctx("cfa", begin=2, **overrides)
        at = state1.replace(method_state=filled, step=jnp.asarray(6, jnp.int32))
        np.testing.assert_allclose(method.epoch_end(at, ctx2, None).method_state["beta"],
                                   np.full(K, 6.0))
    empty = state.replace(step=jnp.asarray(6, jnp.int32))
    np.testing.assert_array_equal(method.epoch_end(empty, ctx, None).method_state["eps_scale"],
                                  np.ones(K))


def test_cfa_at_base_is_cross_entropy_on_train_bn_adversarial_forward():
    ctx = make_ctx("cfa", base="at")
    method = get_method("cfa")
    state = trained_state(ctx, "cfa")
    batch = make_batch(4)
    loss, aux = method.loss_fn(state.params, state, batch, jax.random.PRNGKey(0), ctx)
    # The official AT loss sees only the adversarial forward; recompute it on the same x_adv
    # by re-running the (deterministic given the key) attack through the helper.
    from hamjax.methods.common import train_attack

    y = batch["label"]
    x_adv, _ = train_attack(ctx, state.params, state.batch_stats, batch["image"], y,
                            jax.random.PRNGKey(0), eps=EPS * jnp.ones(B), loss="ce",
                            init="uniform")
    (adv,), want_stats = flax_train_forwards(ctx, state, x_adv)
    np.testing.assert_allclose(loss, np.mean(np_ce(adv, y)), rtol=1e-5)
    assert_stats_equal(aux["batch_stats"], want_stats)


def test_cfa_trades_attack_uses_the_class_wise_radius():
    """CFA's TRADES-base adversary is bounded by each example's class radius eps * scale_y
    (one shared radius would pass the loss transcription, which is given x_adv)."""
    ctx = make_ctx("cfa")
    method = get_method("cfa")
    state = trained_state(ctx, "cfa")
    scale = jnp.asarray([0.5, 0.8, 1.2, 1.5])
    state = state.replace(method_state=dict(state.method_state, eps_scale=scale))
    batch = make_batch(3)
    x, y = batch["image"], batch["label"]
    key = jax.random.PRNGKey(4)
    loss, _ = method.loss_fn(state.params, state, batch, key, ctx)
    x_adv, _ = trades_adversary(ctx, state.params, state.batch_stats, x, y, key,
                                eps=EPS * scale[y])
    want = cfa.cfa_trades_from_adv(ctx, state.params, state.batch_stats, x, y, x_adv,
                                   state.method_state["beta"])[0]
    np.testing.assert_allclose(loss, want, rtol=1e-5)


# ---------------------------------------------------------------- DAFA
def np_dafa_weights(probs, labels, lamb):
    """utils.py: calculate_class_weights after commit 74657cd, verbatim in NumPy."""
    num_classes = len(np.unique(labels))
    class_similarity = np.zeros((num_classes, num_classes))
    class_weights = np.ones(num_classes)
    for i in range(num_classes):
        class_similarity[i] = np.mean(probs[np.where(labels == i)[0]], axis=0)
    for i in range(num_classes):
        for j in range(num_classes):
            if i == j:
                continue
            if class_similarity[i, i] < class_similarity[j, j]:
                class_weights[i] += lamb * class_similarity[i, j] * class_similarity[j, j]
            else:
                class_weights[i] -= lamb * class_similarity[j, i] * class_similarity[i, i]
    return class_weights


def test_dafa_hand_case_and_official_weights_on_random_probabilities():
    p = jnp.asarray([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(dafa.dafa_class_weights(p, 1.0), [1.29, 0.87, 0.84], rtol=1e-6)
    rng = np.random.default_rng(0)
    for lamb in (1.0, 1.5):
        labels = rng.integers(0, 5, 200)
        probs = np_softmax(rng.normal(0, 2, (200, 5)))
        sums = np.zeros((5, 5))
        np.add.at(sums, labels, probs)
        similarity = dafa.class_similarity(jnp.asarray(sums, jnp.float32),
                                           jnp.asarray(np.bincount(labels, minlength=5)))
        np.testing.assert_allclose(dafa.dafa_class_weights(similarity, lamb),
                                   np_dafa_weights(probs, labels, lamb), rtol=1e-5)


def test_dafa_attack_radius_and_step_are_class_weighted():
    ctx = make_ctx("dafa")
    state = trained_state(ctx, "dafa")
    batch = make_batch(5)
    y = batch["label"]
    w = jnp.asarray([0.5, 1.0, 1.5, 2.0])[y]
    x_adv = dafa.dafa_adversary(ctx, state.params, state.batch_stats, batch["image"], y, w,
                                jax.random.PRNGKey(1))
    dist = np.max(np.abs(np.asarray(x_adv) - batch["image"]).reshape(B, -1), axis=1)
    # two signed steps of W_y * 0.03 against a radius W_y * 0.05: every example ends on its
    # own ball's boundary (pixels stay inside [0, 1]), none beyond
    np.testing.assert_allclose(dist, EPS * np.asarray(w), rtol=1e-5)


def test_dafa_loss_matches_official_transcription():
    """trades_loss: adversarial then clean in train mode; mean(W_y CE) + beta sum KL / B."""
    ctx = make_ctx("dafa")
    state = trained_state(ctx, "dafa")
    batch = make_batch(6)
    x, y = batch["image"], batch["label"]
    x_adv = np.clip(x + 0.04, 0, 1).astype(np.float32)
    w_class = np.array([1.2, 0.9, 1.1, 0.8])
    loss, _, stats, _ = dafa.dafa_from_adv(ctx, state.params, state.batch_stats, x, y, x_adv,
                                           jnp.asarray(w_class[y], jnp.float32))
    (adv, clean), want_stats = flax_train_forwards(ctx, state, x_adv, x)
    want = np.mean(np_ce(clean, y) * w_class[y]) + 6.0 * np.sum(np_kl(clean, adv)) / B
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert_stats_equal(stats, want_stats)


def test_dafa_collects_in_the_warmup_epoch_only_then_weights_once():
    ctx = make_ctx("dafa", warmup_epochs=2)
    method = get_method("dafa")
    step = jax.jit(make_train_step(ctx, method))
    batch = make_batch(7)
    state = create_train_state(ctx, method, seed=0)
    outside, _ = step(state, batch)  # epoch 0: not the warm-up's last epoch
    np.testing.assert_array_equal(outside.method_state["counts"], np.zeros(K))
    inside, _ = step(state.replace(step=jnp.asarray(ctx.steps_per_epoch, jnp.int32)), batch)
    ms = inside.method_state
    np.testing.assert_array_equal(ms["counts"], np.bincount(batch["label"], minlength=K))
    np.testing.assert_allclose(np.sum(ms["prob_sums"], axis=1), ms["counts"], rtol=1e-5)
    done = inside.replace(step=jnp.asarray(2 * ctx.steps_per_epoch, jnp.int32))
    after = method.epoch_end(done, ctx, None).method_state
    similarity = np.asarray(ms["prob_sums"]) / np.asarray(ms["counts"])[:, None]
    np.testing.assert_allclose(after["weights"], dafa.dafa_class_weights(similarity, 1.0),
                               rtol=1e-5)
    np.testing.assert_array_equal(after["counts"], np.zeros(K))
    # any other epoch's end leaves the weights alone
    later = done.replace(step=jnp.asarray(3 * ctx.steps_per_epoch, jnp.int32))
    np.testing.assert_array_equal(method.epoch_end(later, ctx, None).method_state["weights"],
                                  np.ones(K))
    assert len(method.summarize_state(after)["class_weights"]) == K


def test_dafa_weights_on_a_tie_follow_the_official_strict_comparison():
    """Classes 0 and 1 are equally easy (P_00 = P_11): the official `P_ii < P_jj` moves weight
    in neither direction between them, so only class 2's similarity to each counts."""
    similarity = jnp.asarray([[.6, .3, .1], [.3, .6, .1], [.1, .1, .8]])
    np.testing.assert_allclose(dafa.dafa_class_weights(similarity, 1.0), [0.90, 0.90, 0.84],
                               rtol=1e-6)


def test_dafa_collects_softmax_rows_not_one_hot_predictions():
    ctx = make_ctx("dafa", warmup_epochs=1)
    state = dafa.dafa_init_state(ctx, None)
    logits = jnp.log(jnp.asarray([[.5, .3, .1, .1]]))
    new = dafa._collected(ctx, state, logits, jnp.asarray([0]), jnp.asarray(0))
    np.testing.assert_allclose(new["prob_sums"][0], [.5, .3, .1, .1], rtol=1e-6)


@pytest.mark.parametrize("name", ["dafa", "trades"])
def test_trades_style_attacks_start_at_x_plus_a_small_gaussian(name):
    """With a zero step the TRADES adversary (DAFA's too) stays at its start x + 0.001 N(0, 1),
    within 0.006 of x at these sizes; a uniform start would reach eps = 0.05."""
    ctx = make_ctx(name, step_size=0.0)
    state = trained_state(ctx, name)
    batch = make_batch(5)
    x, y, key = batch["image"], batch["label"], jax.random.PRNGKey(1)
    if name == "dafa":
        x_adv = dafa.dafa_adversary(ctx, state.params, state.batch_stats, x, y, jnp.ones(B), key)
    else:
        x_adv, _ = trades_adversary(ctx, state.params, state.batch_stats, x, y, key)
    moved = np.max(np.abs(np.asarray(x_adv) - x))
    assert 0 < moved < 0.006, moved


# ---------------------------------------------------------------- WAT
def test_wat_hand_case_and_large_costs():
    w = wat.hedge_weights(jnp.asarray([1.0, 2.0, 1.5]), 0.1)
    np.testing.assert_allclose(w, [0.63362, 0.70026, 0.66611], atol=2e-5)
    w = wat.hedge_weights(jnp.asarray([1.5, 3.0, 2.25]), 0.1)
    np.testing.assert_allclose(w, [0.61734, 0.71724, 0.66542], atol=2e-5)
    big = wat.hedge_weights(jnp.asarray([5000.0, 5001.0, 4000.0]), 1.0)  # exp would overflow
    assert np.all(np.isfinite(big)) and abs(float(jnp.sum(big)) - 2.0) < 1e-5
    ms = {"cumulative_cost": jnp.asarray([1.0, 2.0, 1.5]), "weights": jnp.ones(3),
          "last_cost": jnp.zeros(3)}
    new = wat.hedge_step(ms, np.array([0.5, 1.0, 0.75]), 0.1)
    np.testing.assert_allclose(new["weights"], [0.61734, 0.71724, 0.66542], atol=2e-5)


def test_wat_loss_matches_official_transcription():
    """train(): sum_c w_c sum_{y=c} (CE + beta KL) / B + TRADES_loss * w_K."""
    rng = np.random.default_rng(8)
    clean, adv = rng.normal(0, 2, (B, K)), rng.normal(0, 2, (B, K))
    y = rng.integers(0, K, B)
    weights = rng.uniform(0.2, 2.0, K + 1)
    ce, kl = np_ce(clean, y), np_kl(clean, adv)
    nat = sum(ce[y == i].sum() * weights[i] for i in range(K))
    bndy = sum(kl[y == i].sum() * weights[i] for i in range(K))
    want = (nat + 6.0 * bndy) / B + (ce.mean() + 6.0 * kl.sum() / B) * weights[K]
    got = wat.wat_objective(jnp.asarray(ce, jnp.float32), jnp.asarray(kl, jnp.float32),
                            jnp.asarray(y), jnp.asarray(weights, jnp.float32), 6.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


class _SplitEvaluator:
    """The trainer's `evaluator.map_split` over a fixed split (hamjax.evaluation.driver)."""

    def __init__(self, images, labels, mesh, batch_size=16):
        self.images, self.labels = images, labels
        self.driver = Driver(mesh, batch_size)

    def map_split(self, state, split_name, fn, key):
        assert split_name == "val"
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return map_examples(self.driver, fn, variables, self.images, self.labels,
                            key), np.asarray(self.labels)


def _wat_costs_and_clean_ce(eps: float):
    """WAT's validation costs on 30 random images, and each class's (then the overall) mean CE
    of the eval-BN clean logits."""
    ctx = make_ctx("wat", eps=eps)
    state = trained_state(ctx, "wat")
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (30, 4, 4, 1)).astype(np.uint8)
    labels = (np.arange(30) % K).astype(np.int32)
    evaluator = _SplitEvaluator(images, labels, make_mesh(jax.devices()[:1]))
    cost = wat.measure_validation_cost(state, ctx, evaluator, epoch=1)
    logits = ctx.model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             jnp.asarray(images, jnp.float32) / 255.0, train=False)
    per_ex = np_ce(np.asarray(logits), labels)
    return np.asarray(cost), [per_ex[labels == c].mean() for c in range(K)] + [per_ex.mean()]


def test_wat_validation_cost_is_eval_bn_trades_cost_per_class():
    """With eps 0 the TRADES attack cannot move: cost = CE of the eval-BN clean logits, class
    means then the overall mean."""
    cost, clean_ce = _wat_costs_and_clean_ce(eps=0.0)
    np.testing.assert_allclose(cost, clean_ce, rtol=1e-5)


def test_wat_validation_cost_includes_the_kl_term_when_the_attack_moves():
    """With eps 0.3 the TRADES attack moves, and every class's cost (CE + beta KL) exceeds its
    clean eval-BN CE."""
    cost, clean_ce = _wat_costs_and_clean_ce(eps=0.3)
    assert np.all(cost - clean_ce > 1e-6), (cost, clean_ce)


def test_wat_loss_uses_the_hedge_weights():
    """All class weights and the average expert's weight at 0: the loss is exactly 0."""
    ctx = make_ctx("wat")
    method = get_method("wat")
    state = create_train_state(ctx, method, seed=0)
    state = state.replace(method_state=dict(state.method_state, weights=jnp.zeros(K + 1)))
    loss, _ = method.loss_fn(state.params, state, make_batch(3), jax.random.PRNGKey(0), ctx)
    assert float(loss) == 0.0


# ---------------------------------------------------------------- FAAL
def scipy_dro(a, r):
    """The official primal (sum p = 1, p >= 0, sum kl_div(1/K, p) <= r, maximise a . p),
    solved by a general-purpose solver."""
    k = len(a)
    u = np.full(k, 1.0 / k)
    cons = [{"type": "eq", "fun": lambda p: np.sum(p) - 1.0},
            {"type": "ineq", "fun": lambda p: r - np.sum(u * np.log(u / p) - u + p)}]
    res = minimize(lambda p: -a @ p, u, constraints=cons, bounds=[(1e-9, 1.0)] * k,
                   method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    assert res.success, res.message
    return res.x


def test_faal_hand_case_and_general_solver_on_random_scores():
    p = faal.dro_class_weights(jnp.asarray([-1.5, 0.2]), 0.5)
    np.testing.assert_allclose(p, [0.10247, 0.89753], atol=1e-5)
    np.testing.assert_allclose(2 * p, [0.20494, 1.79506], atol=2e-5)
    np.testing.assert_allclose(faal.dro_class_weights(jnp.asarray([-1.5, 0.2]), 0.0),
                               [0.5, 0.5])
    np.testing.assert_allclose(faal.dro_class_weights(jnp.ones(5), 0.5), np.full(5, 0.2))
    rng = np.random.default_rng(10)
    for k, r in ((3, 0.1), (5, 0.5), (10, 0.5), (7, 2.0)):
        a = rng.normal(0, 3, k)
        got = np.asarray(faal.dro_class_weights(jnp.asarray(a, jnp.float32), r))
        want = scipy_dro(a, r)
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert a @ got >= a @ want - 1e-4  # at least as good as the general solver


def test_faal_loss_matches_official_transcription():
    """ft_prn.py (K generalised): margins from the train-BN adversarial softmax, class means,
    the count-weighted objective, loss sum(l p_y) K / B; TRADES: 6 KL + CE(clean)."""
    for base in ("at", "trades"):
        ctx = make_ctx("faal", base=base)
        state = trained_state(ctx, "faal")
        batch = make_batch(11)
        x, y = batch["image"], np.array([0, 0, 0, 1, 1, 2, 0, 1], np.int32)  # class 3 absent
        x_adv = np.clip(x - 0.04, 0, 1).astype(np.float32)
        loss, p, _, stats, _ = faal.faal_from_adv(ctx, state.params, state.batch_stats, x, y,
                                                  x_adv)
        if base == "trades":
            (adv, clean), want_stats = flax_train_forwards(ctx, state, x_adv, x)
            per_ex = np_kl(clean, adv) * 6 + np_ce(clean, y)
        else:
            (adv,), want_stats = flax_train_forwards(ctx, state, x_adv)
            per_ex = np_ce(adv, y)
        probs = np_softmax(adv)
        true = probs[np.arange(B), y]
        other = np.where(np.eye(K, dtype=bool)[y], -np.inf, probs).max(1)
        margin = other - true
        class_margin = np.array([margin[y == c].mean() if np.any(y == c) else -1.0
                                 for c in range(K)])
        counts = np.bincount(y, minlength=K)
        want_p = scipy_dro(counts * class_margin, 0.5)  # sum_i p[y_i] m[y_i]
        np.testing.assert_allclose(p, want_p, atol=2e-4)
        want = np.sum(per_ex * want_p[y]) * K / B
        np.testing.assert_allclose(loss, want, rtol=2e-4)
        assert_stats_equal(stats, want_stats)


def test_faal_step_accumulates_the_epoch_record_and_epoch_end_resets():
    ctx = make_ctx("faal")
    method = get_method("faal")
    step = jax.jit(make_train_step(ctx, method))
    state = create_train_state(ctx, method, seed=0)
    batch = make_batch(12)
    state, metrics = step(state, batch)
    state, _ = step(state, batch)
    ms = state.method_state
    assert float(ms["steps"]) == 2.0
    np.testing.assert_allclose(np.sum(ms["weight_sums"]), 2 * K, rtol=1e-5)  # K p sums to K
    summary = method.summarize_state(ms)
    assert len(summary["mean_class_weight"]) == K and len(summary["mean_margin"]) == K
    assert float(metrics["max_class_weight"]) >= 1.0 >= float(metrics["min_class_weight"])
    reset = method.epoch_end(state, ctx, None).method_state
    assert all(float(jnp.sum(jnp.abs(v))) == 0.0 for v in jax.tree.leaves(reset))


@pytest.mark.parametrize("base, loss, init", [("at", "ce", "uniform"),
                                              ("trades", "kl", "normal")])
def test_faal_attack_starts_as_its_base_does(base, loss, init):
    """The official code: a uniform start in the eps ball for the AT base, x + 0.001 N(0, 1)
    for TRADES's KL ascent."""
    ctx = make_ctx("faal", base=base)
    method = get_method("faal")
    state = trained_state(ctx, "faal")
    batch = make_batch(11)
    x, y, key = batch["image"], batch["label"], jax.random.PRNGKey(3)
    got, _ = method.loss_fn(state.params, state, batch, key, ctx)
    x_adv, _ = train_attack(ctx, state.params, state.batch_stats, x, y, key, loss=loss,
                            init=init)
    want = faal.faal_from_adv(ctx, state.params, state.batch_stats, x, y, x_adv)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("name, field, bad, message", [
    ("cfa", "base", "fat", "method.base='fat'"),
    ("cfa", "beta", -1.0, "method.beta=-1.0"),
    ("cfa", "lambda1", 0.0, "method.lambda1=0.0"),
    ("cfa", "lambda2", float("nan"), "method.lambda2=nan"),
    ("cfa", "ccm", 1, "method.ccm=1"),
    ("cfa", "ccr", "yes", "method.ccr='yes'"),
    ("cfa", "begin", 0, "method.begin=0"),
    ("cfa", "trades_scale", "zhang", "method.trades_scale='zhang'"),
    ("dafa", "base", "mart", "method.base='mart'"),
    ("dafa", "beta", "6", "method.beta='6'"),
    ("dafa", "dafa_lambda", -0.5, "method.dafa_lambda=-0.5"),
    ("dafa", "warmup_epochs", 1.5, "method.warmup_epochs=1.5"),
    ("wat", "beta", True, "method.beta=True"),
    ("wat", "eta", -0.1, "method.eta=-0.1"),
    ("faal", "base", "mart", "method.base='mart'"),
    ("faal", "r", -0.5, "method.r=-0.5"),
    ("faal", "beta", float("inf"), "method.beta=inf"),
])
def test_validation_names_the_field(name, field, bad, message):
    config = base_config()
    config.data.val_size = 100
    config.method = method_config(name)
    get_method(name).validate(config)
    # a fresh ConfigDict: assigning into a typed field would convert or refuse the value
    config.method = ml_collections.ConfigDict({**config.method.to_dict(), field: bad})
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
        get_method(name).validate(config)
    del config.method[field]
    with pytest.raises(ConfigError, match=f"method.{field} is missing"):
        get_method(name).validate(config)


def test_wat_needs_a_validation_split():
    config = base_config()
    config.data.val_size = 0
    config.method = method_config("wat")
    with pytest.raises(ConfigError, match="val_size"):
        get_method("wat").validate(config)


# ---------------------------------------------------------------- resume
def _digits_config(name: str, **method):
    return digits_config(name, attack=(0.1, 0.05, 2), evaluation=(0.1, 0.05, 2),
                         eval_examples=100, eval_batch_size=64, **method)


@pytest.mark.slow
@pytest.mark.parametrize("name, method", [("cfa", {"begin": 1}), ("wat", {})])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, name,
                                                             method):
    """Stopped (SIGTERM path) mid-way through the second epoch, after the first epoch's
    class-wise update (CFA: calibrated eps / beta from counts; WAT: the Hedge step on the
    validation costs) and with this epoch's counters half full: the resumed run ends with the
    same weights, method state and per-class report as an uninterrupted one."""
    import signal

    from hamjax.checkpoint import Checkpointer
    from hamjax.errors import TrainingInterrupted
    from hamjax.train.loop import Trainer

    config = _digits_config(name, **method)
    straight = Trainer(config, str(tmp_path / "straight")).run()

    batches = Trainer._device_batches

    def stop_mid_second_epoch(self, epoch, start):
        for i, batch in enumerate(batches(self, epoch, start), start=start):
            if epoch == 1 and start == 0 and i == 3:
                self.signals.received = signal.SIGTERM
            yield batch

    monkeypatch.setattr(Trainer, "_device_batches", stop_mid_second_epoch)
    workdir = str(tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted):
        Trainer(config, workdir).run()
    monkeypatch.setattr(Trainer, "_device_batches", batches)
    resumed = Trainer(config, workdir).run()

    for key in ("last", "best_on_val"):
        for kind in ("clean", "robust"):
            assert straight["results"][key][kind]["per_class"] == \
                resumed["results"][key][kind]["per_class"]
    assert [e.get("method") for e in straight["epochs"]] == \
        [e.get("method") for e in resumed["epochs"]]
    states = []
    for run in ("straight", "resumed"):
        ckpt = Checkpointer(str(tmp_path / run))
        states.append(ckpt.restore_host(step=ckpt.latest_step()))
        ckpt.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- four devices
FOUR_DEVICE_CHILD = """
import jax
import numpy as np

from hamjax.config import base_config, method_config, validate_config
from hamjax.data import iterate_batches, load_splits
from hamjax.methods import get_method, wat
from hamjax.evaluation.driver import Driver, map_examples
from hamjax.sharding import make_mesh, replicated, shard_batch
from hamjax.train import build_context, create_train_state, make_train_step
from hamjax.train.step import jit_train_step


class _SplitEvaluator:
    def __init__(self, images, labels, mesh, batch_size=16):
        self.images, self.labels = images, labels
        self.driver = Driver(mesh, batch_size)

    def map_split(self, state, split_name, fn, key):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return map_examples(self.driver, fn, variables, self.images, self.labels,
                            key), np.asarray(self.labels)

assert jax.device_count() == 4, jax.devices()
# CE attacks from a uniform start: a KL ascent from x + 0.001 N on a fresh model follows
# gradients of ~1e-6, whose sign a cross-device reassociation can flip (see
# test_multi_device.py); WAT (TRADES only) therefore runs with eps 0 here.
FIELDS = {"cfa": {"base": "at"}, "dafa": {"base": "at", "warmup_epochs": 1}, "faal": {},
          "wat": {}}
one, four = make_mesh(jax.devices()[:1]), make_mesh()
for name, fields in FIELDS.items():
    c = base_config()
    c.data.name, c.data.val_size, c.model.name = "digits", 40, "small_cnn"
    c.method = method_config(name, **fields)
    c.attack.eps, c.attack.step_size, c.attack.steps = (0.0 if name == "wat" else 0.1), 0.03, 3
    c.train.batch_size = 16
    c.eval.batch_size = 16
    validate_config(c)
    splits = load_splits(c.data, seed=0)
    method = get_method(name)
    ctxs = [build_context(c, splits, mesh) for mesh in (one, four)]
    steps = [(mesh, jit_train_step(make_train_step(ctx, method), mesh))
             for mesh, ctx in zip((one, four), ctxs)]
    state = jax.device_get(create_train_state(ctxs[0], method, seed=0))
    for i, batch in enumerate(iterate_batches(splits.train, 16, seed=0, epoch=0)):
        if i == 2:
            break
        a, b = [jax.device_get(step(jax.device_put(state, replicated(mesh)),
                                    shard_batch(batch, mesh))) for mesh, step in steps]
        for x, y in zip(jax.tree.leaves((a[0].params, a[0].method_state, a[1])),
                        jax.tree.leaves((b[0].params, b[0].method_state, b[1])), strict=True):
            np.testing.assert_allclose(y, x, rtol=2e-4, atol=2e-5, err_msg=name)
        state = a[0]
    filled = {"cfa": "count", "dafa": "counts", "faal": "weight_sums", "wat": "weights"}[name]
    assert np.sum(state.method_state[filled]) > 0, name  # the sums compared were not empty
    if name == "wat":
        costs = [wat.measure_validation_cost(
            state, ctx, _SplitEvaluator(splits.val.images, splits.val.labels, mesh), epoch=1)
            for mesh, ctx in zip((one, four), ctxs)]
        np.testing.assert_allclose(costs[1], costs[0], rtol=1e-5)
    print(name, "ok", flush=True)
"""


@pytest.mark.slow
def test_four_device_steps_equal_one_device(tmp_path):
    """The per-class sums inside the step (CFA counts, DAFA's collected softmax, FAAL's DRO
    weights and running sums) and WAT's sharded validation pass equal one device's."""
    stdout = run_on_host_devices(FOUR_DEVICE_CHILD, tmp_path, 4)
    for name in ("cfa", "dafa", "faal", "wat"):
        assert f"{name} ok" in stdout
