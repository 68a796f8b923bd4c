"""The Fashion-MNIST CNN: its size by hand, its pooling against NumPy, all BN modes, masks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hamjax.models import BN_MODES, FashionMNISTCNN, apply_model, build_model, init_variables
from hamjax.models.fmnist_cnn import max_pool_2x2


def _model(**kw) -> nn.Module:
    cfg = ml_collections.ConfigDict({"name": "fmnist_cnn", "dtype": "float32", **kw})
    return build_model(cfg, 10, (28, 28, 1))


def test_registered_and_parameter_count_by_hand():
    model = _model()
    assert isinstance(model, FashionMNISTCNN)
    variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    sizes = [int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"])]
    # conv 3*3*1*32, BN 2*32, conv 3*3*32*64, BN 2*64, dense 7*7*64*256+256, classifier 256*10+10
    expected = 288 + 64 + 18432 + 128 + (3136 * 256 + 256) + (2560 + 10)
    assert sum(sizes) == expected == 824_554
    running = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["batch_stats"]))
    assert running == 2 * (32 + 64)


def test_multiply_adds_by_hand_match_xla_cost():
    """4.6M multiply-adds an image (fewer than small_cnn's 7.5M): convs at 28x28 and 14x14."""
    by_hand = 28 * 28 * 9 * 1 * 32 + 14 * 14 * 9 * 32 * 64 + 3136 * 256 + 256 * 10
    assert by_hand == 4_643_840
    model = _model()
    variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    x = jnp.zeros((1, 28, 28, 1))
    fn = jax.jit(lambda v, x: apply_model(model, v, x, bn_mode="eval")[0])
    cost = fn.lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    if flops <= 0:
        pytest.skip("this backend reports no FLOP count")
    # XLA counts only the taps that land inside the image (a 3x3 kernel sliding over an n x n
    # zero-padded image hits (3n - 2)^2 real pixels), 2 FLOPs a multiply-add; BN, ReLU and
    # pooling add a few percent.
    inside = (82**2) * 1 * 32 + (40**2) * 32 * 64 + 3136 * 256 + 256 * 10
    assert 2 * inside <= flops <= 2 * inside * 1.05


@pytest.mark.parametrize("shape", [(3, 6, 8, 2), (2, 7, 5, 1)])
def test_max_pool_matches_numpy_and_flax(shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    b, h, w, c = shape
    ref = np.full((b, h // 2, w // 2, c), -np.inf, np.float32)
    for i in range(h // 2):
        for j in range(w // 2):
            ref[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
    out = np.asarray(max_pool_2x2(jnp.asarray(x)))
    np.testing.assert_array_equal(out, ref)
    flax_out = nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2), padding="VALID")
    np.testing.assert_array_equal(out, np.asarray(flax_out))


def test_max_pool_gradient_goes_to_the_maximum():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 1)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(max_pool_2x2(x)))(x)
    expected = (x == jnp.repeat(jnp.repeat(max_pool_2x2(x), 2, 1), 2, 2)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(expected))


def test_all_bn_modes_and_masked_rows():
    model = _model()
    variables = init_variables(model, jax.random.PRNGKey(0), (28, 28, 1))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 28, 28, 1))

    @jax.jit
    def run(variables, x, mask):
        out = [apply_model(model, variables, x, bn_mode=m) for m in BN_MODES]
        return out, apply_model(model, variables, x, bn_mode="batch", mask=mask)[0]

    mask = jnp.array([True, True, False, False])
    outs, masked = run(variables, x, mask)
    for logits, stats in outs:
        assert logits.shape == (4, 10) and logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))
        assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    # masked rows do not enter the batch statistics: the valid rows equal a batch of just them
    alone = apply_model(model, variables, x[:2], bn_mode="batch")[0]
    np.testing.assert_allclose(np.asarray(masked[:2]), np.asarray(alone), rtol=1e-4, atol=1e-5)
