"""HAM against the official algorithm written out eagerly (boolean indexing, a Python loop).

The model is a tiny conv net with BatchNorm whose logits get a large offset from "marker"
pixels (rounded, so an eps <= 0.1 attack cannot move them): the markers fix which examples are
misclassified at every PGD iterate, i.e. the hard set, while the conv path still gives real
adversarial dynamics. With the markers at zero the hard set is whatever the network makes it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.methods.ham import (
    FORCE_HARD_KEY,
    HamSettings,
    bucket_sizes,
    choose_branch,
    forced_hard_rows,
    ham_loss,
    ham_terms,
    select_rows,
    validate,
)
from hamjax.models.layers import batch_norm
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

B, C, K, M = 16, 4, 4, 2
CLASSIC_BUCKETS = (0.125, 0.25, 0.5, 1.0)
EPS, ALPHA = 0.1, 0.04
STEPS_PER_EPOCH = 2
HAM_STEP = 2  # state.step in the first HAM epoch (warm-up is epoch 0)


class MarkerNet(nn.Module):
    """conv-BN-ReLU-pool-dense plus 50 * round(x[:, 0, :C, 0]) on the logits."""

    num_classes: int = C

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        marker = jax.lax.stop_gradient(jnp.round(x[:, 0, : self.num_classes, 0]))
        h = nn.Conv(6, (3, 3), strides=(2, 2))(x)
        h = nn.relu(batch_norm(h, train, mask, name="bn"))
        return nn.Dense(self.num_classes)(jnp.mean(h, axis=(1, 2))) + 50.0 * marker


def make_config(bn_mode: str = "eval", **method) -> ml_collections.FrozenConfigDict:
    c = base_config()
    c.attack.bn_mode = bn_mode
    c.model.name = "small_cnn"  # unused: the context carries MarkerNet
    # The classic power-of-two buckets (1/8 ... 1): the boundary tests below are stated in them.
    c.method = method_config("ham", **{"warmup_epochs": 1, "mining_step": M,
                                       "buckets": CLASSIC_BUCKETS, **method})
    c.attack.steps, c.attack.eps, c.attack.step_size = K, EPS, ALPHA
    c.train.batch_size = B
    c.train.lr_schedule = "constant"
    c.data.augment.crop_pad, c.data.augment.flip = 0, False
    return ml_collections.FrozenConfigDict(c)


def make_ctx(config) -> StepContext:
    return StepContext(
        model=MarkerNet(), tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, STEPS_PER_EPOCH), config=config, num_classes=C,
        class_counts=np.ones(C), steps_per_epoch=STEPS_PER_EPOCH, image_shape=(8, 8, 1),
    )


@functools.cache
def ham_fns(bn_mode: str = "eval", **method):
    """(ctx, jitted ham_terms) for one setting; cached so each setting compiles once."""
    ctx = make_ctx(make_config(bn_mode, **method))
    settings = HamSettings.from_config(ctx.config)

    @jax.jit
    def terms(params, stats, x, y, rng, epoch):
        return ham_terms(ctx, settings, params, stats, x, y, rng, epoch)

    return ctx, terms


@pytest.fixture(scope="module")
def state():
    ctx = make_ctx(make_config())
    st = create_train_state(ctx, get_method("ham"), seed=0)
    # Non-trivial running statistics, so eval-mode BN differs from batch statistics.
    stats = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size).reshape(v.shape), st.batch_stats)
    return st.replace(batch_stats=stats, step=jnp.int32(HAM_STEP))


def marker_batch(hard_count: int, seed: int = 0, markers: bool = True) -> dict:
    """Random images and labels; `hard_count` rows carry a wrong-class marker (always hard)."""
    rs = np.random.RandomState(seed)
    x = rs.uniform(0.2, 0.8, (B, 8, 8, 1)).astype(np.float32)
    y = rs.randint(0, C, B).astype(np.int32)
    x[:, 0, :C, 0] = 0.0
    if markers:
        hard = np.zeros(B, bool)
        hard[rs.permutation(B)[:hard_count]] = True
        code = np.where(hard, (y + 1) % C, y)
        x[np.arange(B), 0, code, 0] = 1.0
    return {"image": jnp.asarray(x), "label": jnp.asarray(y), "index": jnp.arange(B)}


# ---------------------------------------------------------------------------------------------
# The official algorithm, eagerly (ham.md), optionally with GAIR weights / drop_bili / extra rows


def official_ham(model, variables, x, y, key, *, bn_mode="eval", gair_lambda=None,
                 hard_keep=1.0, extra_rows=None):
    params = variables["params"]

    def attack_logits(z):
        if bn_mode == "eval":
            return model.apply(variables, z, train=False)
        return model.apply(variables, z, train=True, mutable=["batch_stats"])[0]

    def attack_loss(z, yy):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(attack_logits(z), yy))

    x, y = np.asarray(x), np.asarray(y)
    x_adv = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * EPS, 0.0, 1.0)
    rows, x_cur, y_cur = np.arange(B), x, y
    kappa = np.zeros(B, np.int32)
    hard = None
    for k in range(1, K + 1):
        kappa[rows] += np.asarray(jnp.argmax(attack_logits(x_adv), -1) == y_cur)
        g = jax.grad(attack_loss)(x_adv, y_cur)
        x_adv = x_adv + ALPHA * jnp.sign(g)
        x_adv = jnp.clip(jnp.minimum(jnp.maximum(x_adv, x_cur - EPS), x_cur + EPS), 0.0, 1.0)
        if k == M:
            logits = attack_logits(x_adv)
            hard = np.asarray(jnp.argmax(logits, -1) != y_cur)
            keep = hard.copy()
            if hard_keep < 1.0:
                ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, y_cur))
                order = np.argsort(-np.where(hard, ce, -np.inf), kind="stable")
                keep = np.zeros(B, bool)
                keep[order[: math.ceil(hard_keep * hard.sum())]] = True
            if extra_rows is not None:
                keep |= extra_rows
            x_adv, x_cur, y_cur, rows = x_adv[keep], x_cur[keep], y_cur[keep], rows[keep]
    if gair_lambda is None:
        weights = np.ones(len(rows), np.float32)
    else:
        raw = (np.tanh(gair_lambda + 5.0 * (1.0 - 2.0 * kappa[rows] / K)) + 1.0) / 2.0
        weights = (raw * len(raw) / raw.sum()).astype(np.float32)

    def train_loss(p):
        logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x_adv,
                                  train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_cur)
        return jnp.mean(ce * weights), new["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(train_loss, has_aux=True)(params)
    return dict(hard=hard, rows=rows, x_adv=np.asarray(x_adv), loss=float(loss), grads=grads,
                batch_stats=stats, kappa=kappa[rows], weights=weights)


def close(a, b, tol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v),
                                                         rtol=tol, atol=tol), a, b)


def run_ham(state, batch, rng, epoch=1, **method):
    ctx, terms = ham_fns(**method)
    out = terms(state.params, state.batch_stats, batch["image"], batch["label"], rng,
                jnp.int32(epoch))
    return ctx, out


def check_against_official(state, batch, rng, **method):
    ctx, out = run_ham(state, batch, rng, **method)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    extra = None
    if method.get("keep_easy_fraction", 0.0) > 0:
        extra = np.asarray(out.selected & ~out.hard)
    ref = official_ham(ctx.model, variables, batch["image"], batch["label"], rng,
                       bn_mode=ctx.config.attack.bn_mode,
                       gair_lambda=-1.0 if method.get("gair") else None,
                       hard_keep=method.get("hard_keep_fraction", 1.0), extra_rows=extra)
    np.testing.assert_array_equal(np.asarray(out.hard), ref["hard"])
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.selected)), ref["rows"])
    close(np.asarray(out.x_adv)[ref["rows"]], ref["x_adv"], 1e-6)
    np.testing.assert_array_equal(np.asarray(out.kappa)[ref["rows"]], ref["kappa"])
    close(np.asarray(out.weights)[ref["rows"]], ref["weights"])
    close(out.loss, ref["loss"])
    close(out.grads, ref["grads"])
    close(out.batch_stats, ref["batch_stats"])  # running stats from the trained rows only
    return out, ref


# ---------------------------------------------------------------------------------------------
# Equivalence with the official algorithm


def test_natural_hard_set_matches_official(state):
    batch = marker_batch(0, seed=1, markers=False)
    out, ref = check_against_official(state, batch, jax.random.PRNGKey(3))
    assert 0 < ref["hard"].sum() < B  # a real mix of hard and easy rows
    sizes = bucket_sizes((0.125, 0.25, 0.5, 1.0), B)
    assert int(out.bucket_size) == min(s for s in sizes if s >= ref["hard"].sum())
    # The gradient the trainer sees (ham_loss through attach_gradient) is the same.
    ctx = make_ctx(make_config())
    grad = jax.jit(lambda p, st, b, r: jax.grad(lambda q: ham_loss(q, st, b, r, ctx)[0])(p))
    close(grad(state.params, state, batch, jax.random.PRNGKey(3)), ref["grads"])


def test_public_mining_function_matches_the_training_step(state):
    """`hamjax.attacks.ham_mine` on a plain logits_fn: the step's hard set and examples."""
    from hamjax.attacks import ham_mine
    from hamjax.models import make_logits_fn

    batch = marker_batch(0, seed=1, markers=False)
    rng = jax.random.PRNGKey(3)
    ctx, out = run_ham(state, batch, rng)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits_fn = make_logits_fn(ctx.model, variables, bn_mode="eval")
    mined = jax.jit(lambda x, y, k: ham_mine(logits_fn, x, y, k, eps=EPS, step_size=ALPHA,
                                             steps=K, mining_step=M))(
        batch["image"], batch["label"], rng)
    assert 0 < int(mined.hard.sum()) < B
    np.testing.assert_array_equal(np.asarray(mined.hard), np.asarray(out.hard))
    close(mined.x_adv, out.x_adv, 1e-6)  # hard rows after K steps, easy rows at x_M
    hard = np.asarray(out.selected)
    np.testing.assert_array_equal(np.asarray(mined.kappa)[hard], np.asarray(out.kappa)[hard])
    # An explicit start point: continuing from x_M with M more steps moves only from there.
    again = ham_mine(logits_fn, batch["image"], batch["label"], rng, eps=EPS, step_size=ALPHA,
                     steps=K, mining_step=M, x_init=mined.x_mined)
    assert float(jnp.max(jnp.abs(again.x_mined - batch["image"]))) <= EPS + 1e-6
    with pytest.raises(ValueError, match="mining_step"):
        ham_mine(logits_fn, batch["image"], batch["label"], rng, eps=EPS, step_size=ALPHA,
                 steps=K, mining_step=K)


def test_marker_hard_set_matches_official_with_padding(state):
    out, ref = check_against_official(state, marker_batch(5), jax.random.PRNGKey(4))
    assert ref["hard"].sum() == 5
    assert int(out.bucket_size) == 8  # 3 padded rows


def test_options_match_official(state):
    """GAIR weights, drop_bili (least confident half of H) and kept easy rows."""
    options = dict(gair=True, hard_keep_fraction=0.5, keep_easy_fraction=0.25)
    batch = marker_batch(8, seed=1)
    out, ref = check_against_official(state, batch, jax.random.PRNGKey(3), **options)
    n_hard, n_easy = int(out.hard.sum()), int((~out.hard).sum())
    kept_easy = int((out.selected & ~out.hard).sum())
    assert kept_easy == math.floor(0.25 * n_easy)
    assert int((out.selected & out.hard).sum()) == math.ceil(0.5 * n_hard)
    assert np.ptp(ref["weights"]) > 0.05  # the weights really differ
    # The bucketed and masked paths agree with the options on too.
    _, masked = run_ham(state, batch, jax.random.PRNGKey(3), bucketed=False, **options)
    _assert_same(out, masked)


@pytest.mark.parametrize("bucketed", [True, False])
def test_batch_mode_bn_attack_matches_official(state, bucketed):
    """BN in batch mode while attacking: rows outside the set must not leak into the batch
    statistics or the input gradients (padding in a bucket, dropped rows in the masked path)."""
    out, ref = check_against_official(state, marker_batch(5, seed=2), jax.random.PRNGKey(5),
                                      bn_mode="batch", bucketed=bucketed)
    assert ref["hard"].sum() == 5


def _assert_same(a, b):
    for field in ("hard", "selected", "kappa"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)))
    rows = np.asarray(a.selected)
    close(np.asarray(a.x_adv)[rows], np.asarray(b.x_adv)[rows], 1e-6)
    close(a.weights, b.weights)
    close(a.loss, b.loss)
    close(a.grads, b.grads)
    close(a.batch_stats, b.batch_stats)


@pytest.mark.parametrize("hard_count", [0, 3, 16])
def test_bucketed_and_masked_reference_agree(state, hard_count):
    batch, rng = marker_batch(hard_count, seed=3), jax.random.PRNGKey(6)
    _, bucketed = run_ham(state, batch, rng)
    _, masked = run_ham(state, batch, rng, bucketed=False)
    _assert_same(bucketed, masked)
    assert int(masked.bucket_size) == B  # the reference always runs the full batch


# ---------------------------------------------------------------------------------------------
# Buckets, ledger, empty and full hard sets


@pytest.mark.parametrize(
    "hard_count, size, index", [(0, 0, -1), (1, 2, 0), (2, 2, 0), (4, 4, 1), (5, 8, 2),
                                (8, 8, 2), (9, 16, 3), (16, 16, 3)],
)
def test_bucket_choice_at_boundaries(state, hard_count, size, index):
    _, out = run_ham(state, marker_batch(hard_count, seed=hard_count), jax.random.PRNGKey(0))
    assert int(out.hard.sum()) == hard_count
    assert int(out.bucket_size) == size
    assert int(out.bucket_index) == index
    forward = (M + 1) * B + (K - M + 1) * size
    backward = M * B + (K - M + 1) * size
    assert float(out.ledger.forward) == forward
    assert float(out.ledger.backward) == backward


def test_bucket_helpers():
    assert bucket_sizes((0.125, 0.25, 0.5, 1.0), 128) == (16, 32, 64, 128)
    assert bucket_sizes((0.125, 0.25, 0.5, 1.0), 10) == (2, 3, 5, 10)
    assert bucket_sizes((0.1, 0.2, 1.0), 4) == (1, 4)  # ceil, deduplicated
    sizes = (16, 32, 64, 128)
    got = [int(choose_branch(jnp.int32(n), sizes)) for n in (0, 1, 16, 17, 32, 33, 64, 65, 128)]
    assert got == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_select_rows_is_deterministic_by_key():
    hard = jnp.asarray(np.arange(B) % 3 == 0)
    loss = jnp.asarray(np.random.RandomState(0).rand(B).astype(np.float32))
    kw = dict(keep_easy_fraction=0.5, hard_keep_fraction=1.0)
    a = select_rows(hard, loss, jax.random.PRNGKey(1), **kw)
    b = select_rows(hard, loss, jax.random.PRNGKey(1), **kw)
    c = select_rows(hard, loss, jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert bool(jnp.all(a | ~hard))  # every hard row kept
    assert int((a & ~hard).sum()) == int((c & ~hard).sum()) == math.floor(0.5 * (~hard).sum())


@pytest.fixture(scope="module")
def train_step():
    ctx = make_ctx(make_config())
    return ctx, jax.jit(make_train_step(ctx, get_method("ham")))


def test_empty_hard_set_applies_no_update(state, train_step):
    _, step = train_step
    new, metrics = step(state, marker_batch(0, seed=7))
    assert float(metrics["empty_batch"]) == 1.0
    assert float(metrics["update_applied"]) == 0.0
    assert float(metrics["bucket_size"]) == 0.0
    for field in ("params", "opt_state", "batch_stats"):
        jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
                     getattr(new, field), getattr(state, field))
    assert int(new.step) == int(state.step) + 1
    assert float(new.ledger.forward - state.ledger.forward) == (M + 1) * B
    assert float(new.ledger.backward - state.ledger.backward) == M * B


def test_all_hard_uses_full_bucket_and_updates(state, train_step):
    _, step = train_step
    new, metrics = step(state, marker_batch(B, seed=8))
    assert float(metrics["hard_fraction"]) == 1.0
    assert float(metrics["bucket_size"]) == B
    assert float(metrics["update_applied"]) == 1.0
    changed = jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.any(u != v)), new.params,
                                           state.params))
    assert any(changed)


def test_a_forced_hard_set_costs_and_steps_as_the_mined_one(state, train_step):
    """FORCE_HARD_KEY (a benchmark hook): int8 rows of -1 follow the mining pass, int8 and bool
    sets give the step of that set, and the int8 step keeps the mining forward pass that a bool
    set lets XLA drop (same compiled FLOPs as a real step), so forced timings cost what runs pay."""
    from hamjax.flops import compiled_flops

    ctx, _ = train_step
    step = jax.jit(make_train_step(ctx, get_method("ham")))  # the fixture's stays one compile
    batch = marker_batch(5, seed=3)
    marked = np.asarray(jnp.argmax(batch["image"][:, 0, :C, 0], axis=1) != batch["label"])

    def with_hard(hard):
        return {**batch, FORCE_HARD_KEY: jnp.asarray(hard)}

    # One compile per batch structure: no key, an int8 set, a bool set.
    examples = {"real": batch, "int8": with_hard(forced_hard_rows(marked)),
                "bool": with_hard(marked)}
    programs = {kind: step.lower(state, example).compile() for kind, example in examples.items()}
    real = programs["real"](state, batch)
    assert float(real[1]["hard_fraction"]) == 5 / B
    for name, kind, hard in (("follow mining", "int8", np.full(B, -1, np.int8)),
                             ("int8", "int8", forced_hard_rows(marked)), ("bool", "bool", marked)):
        out = programs[kind](state, with_hard(hard))
        jax.tree.map(lambda u, v, n=name: np.testing.assert_array_equal(u, v, err_msg=n),
                     jax.device_get(out), jax.device_get(real))

    # Forcing overrides the mining pass: every row hard; or the mined set (-1) with two easy
    # rows forced hard and one hard row forced easy.
    _, everything = programs["int8"](state, with_hard(np.ones(B, np.int8)))
    assert float(everything["hard_fraction"]) == 1.0 and float(everything["bucket_size"]) == B
    mixed = np.full(B, -1, np.int8)
    mixed[np.flatnonzero(~marked)[:2]], mixed[np.flatnonzero(marked)[0]] = 1, 0
    _, some = programs["int8"](state, with_hard(mixed))
    assert float(some["hard_fraction"]) == 6 / B  # 5 mined + 2 - 1
    with pytest.raises(ValueError, match="signed integer"):
        step.lower(state, with_hard(np.ones(B, np.uint8)))

    flops = {kind: compiled_flops(program) for kind, program in programs.items()}
    assert flops["real"] - flops["bool"] > 1000  # the bool set's step lacks the mining pass
    # the int8 one has it, plus its few elementwise ops per row
    assert abs(flops["int8"] - flops["real"]) <= 4 * B


def test_step_never_recompiles_across_hard_fractions(state, train_step):
    _, step = train_step
    seen = []
    for count in (0, 1, 3, 5, 11, 16, 2, 9):
        _, metrics = step(state, marker_batch(count, seed=count))
        assert float(metrics["hard_fraction"]) == count / B
        seen.append(int(metrics["bucket_size"]))
        shares = {k: float(v) for k, v in metrics.items() if k.startswith("bucket_share/")}
        assert set(shares) == {"bucket_share/0.125", "bucket_share/0.25", "bucket_share/0.5",
                               "bucket_share/1"}
        ran = f"bucket_share/{seen[-1] / B:.4g}" if seen[-1] else None
        assert shares == {k: float(k == ran) for k in shares}  # one-hot; all 0 when empty
    assert seen == [0, 2, 4, 8, 16, 16, 2, 16]
    assert step._cache_size() == 1


def test_default_buckets_capture_the_hard_fractions_real_runs_see():
    """Between hard fractions 0.15 and 0.6 the chosen bucket pads at most a third."""
    from hamjax.methods.ham import DEFAULTS

    sizes = bucket_sizes(DEFAULTS["buckets"], 128)
    assert sizes == (16, 24, 32, 40, 48, 64, 80, 96, 128)
    for hard in range(math.ceil(0.15 * 128), math.floor(0.6 * 128) + 1):
        bucket = sizes[int(choose_branch(jnp.int32(hard), sizes)) - 1]
        assert hard <= bucket <= math.ceil(hard * 4 / 3)


def test_warmup_is_pgd_at(state):
    ctx = make_ctx(make_config())
    warm = state.replace(step=jnp.int32(0))  # epoch 0 < warmup_epochs = 1
    batch = marker_batch(5, seed=9)
    ham_step = jax.jit(make_train_step(ctx, get_method("ham")))
    pgd_step = jax.jit(make_train_step(ctx, get_method("pgd_at")))
    a, ma = ham_step(warm, batch)
    b, mb = pgd_step(warm, batch)
    assert float(ma["warmup"]) == 1.0 and float(ma["update_applied"]) == 1.0
    close(ma["loss"], mb["loss"])
    close(a.params, b.params)
    close(a.batch_stats, b.batch_stats)
    close(a.opt_state, b.opt_state)
    assert float(a.ledger.forward) == float(b.ledger.forward) == (K + 1) * B
    assert float(a.ledger.backward) == float(b.ledger.backward) == (K + 1) * B
    # Nothing is mined in warm-up: the per-class hard record stays empty (None per class).
    assert float(jnp.sum(a.method_state["mined"])) == float(jnp.sum(a.method_state["hard"])) == 0


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("mining_step", 0), ("mining_step", K), ("mining_step", 1.5),
        ("buckets", (0.5, 0.25, 1.0)), ("buckets", (0.25, 0.5)), ("buckets", (0.0, 1.0)),
        ("buckets", ()), ("buckets", (0.5, 0.5, 1.0)), ("warmup_epochs", -1),
        ("keep_easy_fraction", 1.5), ("hard_keep_fraction", 0.0), ("gair", 1),
        ("bucketed", "yes"),
    ],
)
def test_validate_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"config.method.{field}"):
        validate(make_config(**{field: value}))


@pytest.mark.parametrize(
    "name", ["cifar10_ham", "cifar100_ham", "svhn_ham", "imagenette_ham", "fashion_mnist_ham"]
)
def test_config_files_validate(name):
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    validate_config(config)
    assert config.method.name == "ham"
    assert f"--config=configs/{name}.py" in module.__doc__


# ---------------------------------------------------------------------------------------------
# easy_examples="train_at_m": easy rows trained on their step-M adversaries


def train_at_m_reference(model, variables, x, y, key):
    """Eagerly: M steps on the batch, hard rows continue to K, then CE over all B rows (hard at
    x_K, easy at x_M) with BN in train mode over the whole batch."""
    def attack_logits(z):
        return model.apply(variables, z, train=False)

    def attack_loss(z, yy):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(attack_logits(z), yy))

    def pgd_steps(x_adv, x0, yy, n):
        for _ in range(n):
            x_adv = x_adv + ALPHA * jnp.sign(jax.grad(attack_loss)(x_adv, yy))
            x_adv = jnp.clip(jnp.minimum(jnp.maximum(x_adv, x0 - EPS), x0 + EPS), 0.0, 1.0)
        return x_adv

    x, y = jnp.asarray(x), jnp.asarray(y)
    start = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * EPS, 0.0, 1.0)
    x_mid = pgd_steps(start, x, y, M)
    hard = np.asarray(jnp.argmax(attack_logits(x_mid), -1) != y)
    x_train = np.array(x_mid)
    if hard.any():
        x_train[hard] = np.asarray(pgd_steps(x_mid[hard], x[hard], y[hard], K - M))

    def train_loss(p):
        logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                  jnp.asarray(x_train), train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new

    (loss, new), grads = jax.value_and_grad(train_loss, has_aux=True)(variables["params"])
    return dict(hard=hard, x_train=x_train, loss=float(loss), grads=grads,
                batch_stats=new["batch_stats"])


@pytest.mark.parametrize("hard_count, bucketed", [(5, True), (5, False), (0, True),
                                                  (16, True)])
def test_train_at_m_matches_the_eager_reference(state, hard_count, bucketed):
    batch, rng = marker_batch(hard_count, seed=11), jax.random.PRNGKey(12)
    ctx, out = run_ham(state, batch, rng, easy_examples="train_at_m", bucketed=bucketed)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    ref = train_at_m_reference(ctx.model, variables, batch["image"], batch["label"], rng)
    np.testing.assert_array_equal(np.asarray(out.hard), ref["hard"])
    close(out.x_adv, ref["x_train"], 1e-6)
    close(out.loss, ref["loss"])
    close(out.grads, ref["grads"])
    close(out.batch_stats, ref["batch_stats"])  # statistics of the whole batch
    # Ledger: (M + 2) B forward and (M + 1) B backward on the batch (M attack steps, the mining
    # forward, the training pass), (K - M) steps on the executed bucket (padding included).
    rows = {0: 0, 5: 8, 16: 16}[hard_count] if bucketed else B
    assert float(out.ledger.forward) == (M + 2) * B + (K - M) * rows
    assert float(out.ledger.backward) == (M + 1) * B + (K - M) * rows


def test_train_at_m_trains_on_an_empty_hard_set_and_records_per_class_hard_fractions(state):
    """No hard row: the drop rule skips the update, train_at_m trains every row at x_M. The
    per-class hard counts of the epoch reach `summarize_state`."""
    ctx = make_ctx(make_config(easy_examples="train_at_m"))
    method = get_method("ham")
    step = jax.jit(make_train_step(ctx, method))
    counts = method.init_state(ctx, None)
    start = state.replace(method_state=counts)
    new, metrics = step(start, marker_batch(0, seed=7))
    assert float(metrics["update_applied"]) == 1.0 and float(metrics["empty_batch"]) == 0.0
    assert any(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.any(u != v)), new.params,
                                            state.params)))
    batch = marker_batch(5, seed=8)
    new, _ = step(new, batch)
    labels = np.asarray(batch["label"])
    summary = method.summarize_state(jax.device_get(new.method_state))["hard_fraction_per_class"]
    mined = np.bincount(labels, minlength=C) + np.bincount(
        np.asarray(marker_batch(0, seed=7)["label"]), minlength=C)
    assert sum(round(f * m) for f, m in zip(summary, mined, strict=True) if f is not None) == 5
    reset = method.epoch_end(new, ctx, None)
    assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(reset.method_state))


@pytest.mark.parametrize("field, value", [("easy_examples", "keep"), ("easy_examples", 3)])
def test_easy_examples_is_validated(field, value):
    with pytest.raises(ConfigError, match=f"config.method.{field}"):
        validate(make_config(**{field: value}))
    with pytest.raises(ConfigError, match="config.method.gair"):
        validate(make_config(easy_examples="train_at_m", gair=True))
