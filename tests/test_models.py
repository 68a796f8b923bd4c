"""hamjax.models: shapes, parameter counts, normalisation, BN modes, masked BN, dtypes, builder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hamjax.errors import ConfigError
from hamjax.models import (
    BN_MODES,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    apply_model,
    build_model,
    default_model_config,
    init_variables,
    make_logits_fn,
    model_names,
)
from hamjax.models.layers import BN_EPSILON, BN_MOMENTUM


def _cfg(name: str, **kw) -> ml_collections.ConfigDict:
    cfg = default_model_config()
    cfg.name = name
    cfg.update(kw)
    return cfg


def _key(seed: int) -> jax.Array:
    """rbg keys: XLA:CPU compiles threefry-based init several times slower (shared 2-core box)."""
    return jax.random.key(seed, impl="rbg")


def _images(seed: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).random(shape, np.float32))


def _num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _assert_trees_close(a, b, **kw) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def _assert_trees_differ(a, b) -> None:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a, b))
    assert any(leaves)


@pytest.fixture(autouse=True)
def _full_precision():
    """Exact-comparison tests must not see TF32/bf16 default conv precision on GPU/TPU."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.fixture(scope="module")
def small():
    """SmallCNN on 8x8x1 digits-like inputs with 10 classes, plus variables and a batch."""
    model = build_model(_cfg("small_cnn"), 10)
    variables = init_variables(model, _key(0), (8, 8, 1))
    x = _images(1, (4, 8, 8, 1))
    return model, variables, x


# --- shapes and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg,num_classes,input_shape,batch",
    [
        (_cfg("small_cnn"), 10, (8, 8, 1), 4),
        (_cfg("preact_resnet18"), 10, (8, 8, 3), 2),
        (_cfg("wideresnet", depth=10, width=1), 7, (8, 8, 3), 2),
    ],
    ids=["small_cnn", "preact_resnet18", "wrn_10_1"],
)
def test_output_shapes(cfg, num_classes, input_shape, batch):
    model = build_model(cfg, num_classes, input_shape)
    variables = init_variables(model, _key(0), input_shape)
    assert set(variables) == {"params", "batch_stats"}
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    x = _images(1, (batch, *input_shape))

    @jax.jit  # one compile for all modes: cheaper than eager op-by-op on a shared CPU
    def all_modes(variables, x):
        return [apply_model(model, variables, x, bn_mode=m) for m in BN_MODES]

    for logits, stats in all_modes(variables, x):
        assert logits.shape == (batch, num_classes)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
        assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])


@pytest.mark.parametrize("input_shape", [(28, 28, 1), (32, 32, 3)])
def test_small_cnn_sizes_abstract(input_shape):
    """Fashion-MNIST / CIFAR sizes, shape-checked abstractly (no FLOPs)."""
    model = build_model(_cfg("small_cnn"), 10, input_shape)
    variables = jax.eval_shape(lambda k: init_variables(model, k, input_shape), _key(0))
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    logits, _ = jax.eval_shape(lambda v, x: apply_model(model, v, x, bn_mode="train"), variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_builder_returns_expected_classes():
    assert isinstance(build_model(_cfg("small_cnn"), 10), SmallCNN)
    assert isinstance(build_model(_cfg("preact_resnet18"), 10), PreActResNet18)
    wrn = build_model(_cfg("wrn34_10", depth=16, width=2), 10)  # fixed name ignores depth/width
    assert isinstance(wrn, WideResNet) and (wrn.depth, wrn.width) == (34, 10)
    wrn = build_model(_cfg("wideresnet", depth=16, width=2), 10)
    assert (wrn.depth, wrn.width) == (16, 2)
    assert build_model(_cfg("wrn", depth=28, width=4), 10).depth == 28


@pytest.mark.parametrize(
    "name,expected",
    [("preact_resnet18", 11_172_170), ("wrn34_10", 46_160_474)],
)
def test_parameter_counts(name, expected):
    """Matches the PyTorch reference models (11.17M / 46.16M params); eval_shape: no FLOPs."""
    model = build_model(_cfg(name), 10)
    shapes = jax.eval_shape(lambda k: init_variables(model, k, (32, 32, 3)), _key(0))
    assert _num_params(shapes["params"]) == expected


# --- normalisation ----------------------------------------------------------------------------


def test_normalisation_inside():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    normed = build_model(_cfg("small_cnn"), 10, mean=mean, std=std)
    plain = build_model(_cfg("small_cnn"), 10)
    variables = init_variables(plain, _key(0), (8, 8, 3))
    x = _images(2, (4, 8, 8, 3))
    x_pre = (x - jnp.asarray(mean)) / jnp.asarray(std)

    @jax.jit
    def run(variables, x, x_pre):
        return [
            (
                apply_model(normed, variables, x, bn_mode=m),
                apply_model(plain, variables, x_pre, bn_mode=m),
            )
            for m in ("eval", "train")
        ]

    for (a, sa), (b, sb) in run(variables, x, x_pre):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        _assert_trees_close(sa, sb, rtol=1e-5, atol=1e-6)


def test_mean_std_from_config_and_argument_precedence():
    cfg = _cfg("small_cnn", mean=[0.5], std=[0.25])
    model = build_model(cfg, 10)
    assert model.mean == (0.5,) and model.std == (0.25,)
    model = build_model(cfg, 10, mean=(0.1,), std=(0.2,))
    assert model.mean == pytest.approx((0.1,)) and model.std == pytest.approx((0.2,))
    with pytest.raises(ConfigError, match="channels"):
        build_model(_cfg("small_cnn", mean=[0.1, 0.2]), 10, (8, 8, 3))
    with pytest.raises(ConfigError, match="std"):
        build_model(_cfg("small_cnn"), 10, std=(0.0,))


# --- BN modes ---------------------------------------------------------------------------------


def test_bn_mode_semantics(small):
    model, variables, x = small
    stats = variables["batch_stats"]

    eval_logits, eval_stats = apply_model(model, variables, x, bn_mode="eval")
    assert eval_stats is stats

    train_logits, train_stats = apply_model(model, variables, x, bn_mode="train")
    assert jax.tree.structure(train_stats) == jax.tree.structure(stats)
    _assert_trees_differ(train_stats, stats)

    batch_logits, batch_stats = apply_model(model, variables, x, bn_mode="batch")
    assert batch_stats is stats
    np.testing.assert_allclose(batch_logits, train_logits, rtol=1e-6, atol=1e-6)
    assert not np.allclose(batch_logits, eval_logits, atol=1e-4)

    # eval uses running stats: after swapping in the updated stats, eval logits change
    new_vars = {"params": variables["params"], "batch_stats": train_stats}
    eval_logits2, _ = apply_model(model, new_vars, x, bn_mode="eval")
    assert not np.allclose(eval_logits2, eval_logits, atol=1e-6)


def test_bn_momentum_and_epsilon_match_pytorch(small):
    """One train step from (mean 0, var 1): running = 0.9 old + 0.1 batch (PyTorch momentum=0.1)."""
    model, variables, x = small
    conv = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    h = conv.apply({"params": variables["params"]["conv1"]}, x)
    _, new_stats = apply_model(model, variables, x, bn_mode="train")
    np.testing.assert_allclose(
        new_stats["bn1"]["mean"], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new_stats["bn1"]["var"], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    assert (BN_MOMENTUM, BN_EPSILON) == (0.9, 1e-5)


def test_invalid_bn_mode(small):
    model, variables, x = small
    with pytest.raises(ValueError, match="train, eval, batch"):
        apply_model(model, variables, x, bn_mode="training")
    with pytest.raises(ValueError, match="valid modes"):
        make_logits_fn(model, variables, bn_mode="running")


# --- masked BN --------------------------------------------------------------------------------


def _check_masked_equals_unpadded(model, variables, x):
    pad = 100.0 * _images(9, (3, *x.shape[1:])) + 5.0  # garbage that would wreck the stats
    x_pad = jnp.concatenate([x, pad])
    mask = jnp.arange(x_pad.shape[0]) < x.shape[0]

    @jax.jit  # one compile for the four applications
    def run(variables, x, x_pad, mask):
        return (
            apply_model(model, variables, x, bn_mode="train"),
            apply_model(model, variables, x_pad, bn_mode="train", mask=mask),
            apply_model(model, variables, x_pad, bn_mode="batch", mask=mask),
            apply_model(model, variables, x_pad, bn_mode="train"),
        )

    (ref_logits, ref_stats), (logits, stats), (batch_logits, batch_stats), (_, unmasked_stats) = (
        run(variables, x, x_pad, mask)
    )
    n = x.shape[0]
    np.testing.assert_allclose(logits[:n], ref_logits, rtol=1e-4, atol=1e-4)
    _assert_trees_close(stats, ref_stats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batch_logits[:n], ref_logits, rtol=1e-4, atol=1e-4)
    _assert_trees_close(batch_stats, variables["batch_stats"], rtol=0, atol=0)
    # without the mask the padding changes the statistics
    _assert_trees_differ(unmasked_stats, ref_stats)


def test_masked_bn_small_cnn(small):
    model, variables, x = small
    _check_masked_equals_unpadded(model, variables, x)


def test_masked_bn_wideresnet_with_shortcuts():
    model = build_model(_cfg("wideresnet", depth=10, width=1), 7)  # same as test_output_shapes
    variables = init_variables(model, _key(3), (8, 8, 3))
    _check_masked_equals_unpadded(model, variables, _images(4, (4, 8, 8, 3)))


def test_masked_apply_under_jit(small):
    model, variables, x = small

    @jax.jit
    def f(variables, x, mask):
        return apply_model(model, variables, x, bn_mode="train", mask=mask)

    mask = jnp.array([True, True, False, True])
    logits, stats = f(variables, x, mask)
    ref_logits, ref_stats = apply_model(model, variables, x[jnp.array([0, 1, 3])], bn_mode="train")
    np.testing.assert_allclose(logits[jnp.array([0, 1, 3])], ref_logits, rtol=1e-4, atol=1e-4)
    _assert_trees_close(stats, ref_stats, rtol=1e-4, atol=1e-5)


# --- logits_fn, dtypes, errors ----------------------------------------------------------------


def test_make_logits_fn_matches_apply_and_differentiates(small):
    model, variables, x = small
    y = jnp.arange(4) % 10
    for mode in ("eval", "batch"):
        fn = make_logits_fn(model, variables, bn_mode=mode)
        np.testing.assert_allclose(fn(x), apply_model(model, variables, x, bn_mode=mode)[0])

    fn = make_logits_fn(model, variables)

    def loss(inp):
        logits = fn(inp)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    g = jax.jit(jax.grad(loss))(x)
    assert g.shape == x.shape and bool(jnp.any(g != 0))


def test_bfloat16_compute(small):
    _, variables, x = small
    model16 = build_model(_cfg("small_cnn", dtype="bfloat16"), 10)
    assert jnp.dtype(model16.dtype) == jnp.bfloat16
    model32 = build_model(_cfg("small_cnn"), 10)

    @jax.jit
    def run(variables, x):
        return [
            (
                apply_model(model16, variables, x, bn_mode=m),
                apply_model(model32, variables, x, bn_mode=m),
            )
            for m in ("eval", "train")
        ]

    for (logits16, stats16), (logits32, _) in run(variables, x):
        assert logits16.dtype == jnp.float32
        assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats16))
        np.testing.assert_allclose(logits16, logits32, rtol=0.1, atol=0.1)
    init16 = jax.eval_shape(lambda k: init_variables(model16, k, (8, 8, 1)), _key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init16))


def test_bfloat16_preact_traces():
    """Abstract evaluation only (bf16 convs are slow on CPU): dtypes are right without FLOPs."""
    model = build_model(_cfg("preact_resnet18", dtype="bfloat16"), 10)
    variables = jax.eval_shape(lambda k: init_variables(model, k, (8, 8, 3)), _key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    fn = lambda v, x: apply_model(model, v, x, bn_mode="train")
    logits, stats = jax.eval_shape(fn, variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        build_model(_cfg("resnet50"), 10)
    for name in ("small_cnn", "preact_resnet18", "wrn34_10", "wideresnet"):
        assert name in str(info.value)
    assert set(model_names()) >= {"small_cnn", "preact_resnet18", "wrn34_10", "wideresnet"}


@pytest.mark.parametrize(
    "cfg", [_cfg("wideresnet", depth=33), _cfg("wideresnet", width=0), _cfg("small_cnn", dtype="x")]
)
def test_invalid_config_raises_config_error(cfg):
    with pytest.raises(ConfigError):
        build_model(cfg, 10)


def test_default_model_config_fields():
    cfg = default_model_config()
    for field in ("name", "dtype", "depth", "width", "mean", "std", "conv_vjp"):
        assert field in cfg
    assert cfg.name in model_names()
