"""hamjax.backends.cpu.winograd (F(2x2, 3x3)) against the float64 NumPy convolution of
test_cpu_conv and its adjoints: the forward on odd and even sizes, the canonical conv's value,
input and kernel gradients with Winograd on, forward-mode and vmap through it, that it takes the
Winograd path only where `applies` says, and a model with `model.conv_vjp="canonical_winograd"`
against the plain canonical conv."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cpu_conv import DN, numpy_conv, numpy_input_grad, numpy_kernel_grad

from hamjax.backends.cpu import winograd
from hamjax.backends.cpu.conv import canonical_conv, conv_impl
from hamjax.models import build_model, default_model_config, init_variables

SAME = ((1, 1), (1, 1))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(h=st.integers(1, 9), w=st.integers(1, 9), c_in=st.integers(1, 4),
       c_out=st.integers(1, 4), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_forward_matches_the_numpy_conv(h, w, c_in, c_out, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, c_in)).astype(np.float32)
    k = rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(winograd.winograd_conv3x3)(x, k),
                               numpy_conv(x, k, (1, 1), SAME), rtol=1e-4, atol=1e-4)


def test_the_transform_matrices_compute_a_1d_correlation():
    """F(2, 3) itself: A^T [(G g) * (B^T d)] equals the two outputs of correlating d (4) with g
    (3), for every basis d and g (the 2-D transform is this one applied to rows and columns)."""
    for i in range(4):
        for j in range(3):
            d, g = np.eye(4)[i], np.eye(3)[j]
            expected = [d[0:3] @ g, d[1:4] @ g]
            np.testing.assert_array_equal(winograd.A_T @ ((winograd.G @ g) * (winograd.B_T @ d)),
                                          expected)


def test_the_hwoi_kernel_layout_is_the_swapped_kernel():
    """kernel_layout="HWOI" (what the input gradient passes: no swapped copy of the kernel)
    equals HWIO with the channel axes swapped; an unknown layout is refused."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 3)).astype(np.float32)  # (kh, kw, O, I)
    np.testing.assert_allclose(winograd.winograd_conv3x3(x, w, kernel_layout="HWOI"),
                               numpy_conv(x, np.swapaxes(w, 2, 3), (1, 1), SAME), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="kernel_layout"):
        winograd.winograd_conv3x3(x, w, kernel_layout="OIHW")


def _winograd_everywhere():
    """Winograd on every 3x3 stride-1 same-padded float32 conv, however few its channels and
    pixels."""
    return mock.patch.multiple(winograd, MIN_CHANNELS=1, MIN_PIXELS=1)


@pytest.mark.parametrize("hw", [(6, 8), (7, 5)])
def test_canonical_conv_value_and_gradients_with_winograd(hw):
    """Value, dx (itself a Winograd correlation) and dw (Eigen's conv) against the NumPy
    adjoints; the forward's program holds no convolution at all, and the input gradient's
    none either (the weight gradient's one conv is the only one in the full VJP)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
    g = rng.standard_normal((2, *hw, 5)).astype(np.float32)

    def conv(x, w):
        return canonical_conv(x, w, (1, 1), SAME, dimension_numbers=DN, winograd=True)

    with _winograd_everywhere():
        y, pullback = jax.vjp(conv, x, w)
        dx, dw = pullback(g)
        lowered = jax.jit(conv).lower(x, w).as_text()
        dx_text = jax.jit(lambda x, g: jax.vjp(lambda x: conv(x, w), x)[1](g)).lower(
            x, g).as_text()
    np.testing.assert_allclose(y, numpy_conv(x, w, (1, 1), SAME), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, numpy_input_grad(g, w, x.shape, (1, 1), SAME), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(dw, numpy_kernel_grad(g, x, w.shape, (1, 1), SAME), rtol=1e-4,
                               atol=1e-4)
    assert "convolution" not in lowered and "dot_general" in lowered
    assert "convolution" not in dx_text


def test_winograd_applies_only_where_it_pays():
    wide = (3, 3, 128, 256)
    assert winograd.applies((4, 8, 8, 128), wide, (1, 1), SAME, jnp.float32)
    assert not winograd.applies((2, 4, 4, 128), wide, (1, 1), SAME, jnp.float32)  # 32 pixels
    assert not winograd.applies((2, 8, 8, 128), wide, (2, 2), SAME, jnp.float32)
    assert not winograd.applies((2, 8, 8, 128), wide, (1, 1), ((0, 0), (0, 0)), jnp.float32)
    assert not winograd.applies((2, 8, 8, 128), wide, (1, 1), SAME, jnp.bfloat16)
    assert not winograd.applies((2, 8, 8, 64), (3, 3, 64, 256), (1, 1), SAME, jnp.float32)
    assert not winograd.applies((2, 8, 8, 128), (1, 1, 128, 256), (1, 1), SAME, jnp.float32)
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 8))  # below MIN_CHANNELS: XLA's conv
    text = jax.jit(lambda x, w: canonical_conv(x, w, (1, 1), SAME, dimension_numbers=DN,
                                               winograd=True)).lower(x, w).as_text()
    assert "convolution" in text


def test_forward_mode_and_vmap_through_the_winograd_conv():
    """jacfwd equals jacrev in x and in w, and vmap over an extra leading axis equals the loop."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 6, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)

    def loss(x, w):
        y = canonical_conv(x, w, (1, 1), SAME, dimension_numbers=DN, winograd=True)
        return jnp.sum(jnp.sin(y))

    with _winograd_everywhere():
        for argnum in (0, 1):
            np.testing.assert_allclose(jax.jacfwd(loss, argnum)(x, w),
                                       jax.jacrev(loss, argnum)(x, w), rtol=1e-4, atol=1e-4)
        xs = np.stack([x, 2 * x + 1])
        mapped = jax.vmap(lambda x: canonical_conv(x, w, (1, 1), SAME, dimension_numbers=DN,
                                                   winograd=True))(xs)
    for i in range(2):
        np.testing.assert_allclose(mapped[i], numpy_conv(xs[i], w, (1, 1), SAME), rtol=1e-4,
                                   atol=1e-4)


def test_a_model_with_canonical_winograd_matches_the_canonical_conv():
    """small_cnn's logits and parameter gradients with every eligible conv by Winograd equal the
    plain canonical conv's, and `conv_impl` hands the model the Winograd form."""
    assert conv_impl("canonical_winograd").keywords == {"winograd": True}
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1))
    results = {}
    with _winograd_everywhere():
        for mode in ("canonical", "canonical_winograd"):
            cfg = default_model_config()
            cfg.name, cfg.conv_vjp = "small_cnn", mode
            model = build_model(cfg, 3, (8, 8, 1))
            variables = init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))

            def loss(params, model=model, variables=variables):
                return jnp.sum(jnp.sin(model.apply({**variables, "params": params}, x)))

            results[mode] = jax.jit(jax.value_and_grad(loss))(variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 results["canonical"], results["canonical_winograd"])
