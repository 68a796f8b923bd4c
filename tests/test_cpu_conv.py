"""hamjax.backends.cpu.conv against references independent of XLA's conv gradients: a float64
NumPy convolution with its input and kernel gradients written as the adjoint scatter (hypothesis
over sizes, kernels, strides and paddings), a brute-force adjoint check
(the matrix of the conv built column by column from its forward), the XLA:CPU negative-padding
bug class (openxla/xla#48713), forward-mode differentiation through a model, and
`model.conv_vjp`."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hamjax.backends.cpu.conv import CONV_VJP_MODES, canonical_conv, conv_impl
from hamjax.config import base_config, validate_config
from hamjax.errors import ConfigError
from hamjax.models import build_model, default_model_config, init_variables

DN = ("NHWC", "HWIO", "NHWC")


def _padded(x: np.ndarray, padding) -> np.ndarray:
    return np.pad(x, ((0, 0), *padding, (0, 0)))


def _window(a: np.ndarray, tap: tuple[int, int], strides, out_hw) -> np.ndarray:
    """a[:, tap + stride * i, ...] for every output position i (one kernel tap's inputs)."""
    (i, j), (s_h, s_w), (o_h, o_w) = tap, strides, out_hw
    return a[:, i:i + s_h * (o_h - 1) + 1:s_h, j:j + s_w * (o_w - 1) + 1:s_w]


def _out_hw(x_shape, w_shape, strides, padding) -> tuple[int, int]:
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi)
                 in zip(x_shape[1:3], w_shape[:2], strides, padding, strict=True))


def numpy_conv(x, w, strides, padding) -> np.ndarray:
    """float64 NHWC/HWIO cross-correlation: a sum over kernel taps of strided windows."""
    xp = _padded(np.float64(x), padding)
    out_hw = _out_hw(x.shape, w.shape, strides, padding)
    out = np.zeros((x.shape[0], *out_hw, w.shape[3]))
    for tap in np.ndindex(*w.shape[:2]):
        out += _window(xp, tap, strides, out_hw) @ np.float64(w[tap])
    return out


def numpy_input_grad(g, w, x_shape, strides, padding) -> np.ndarray:
    """The adjoint of numpy_conv in x: every output's cotangent scattered back onto the inputs
    its window read, then the padding cut off."""
    (lo_h, _), (lo_w, _) = padding
    dxp = np.zeros(_padded(np.zeros(x_shape), padding).shape)
    for tap in np.ndindex(*w.shape[:2]):
        _window(dxp, tap, strides, g.shape[1:3])[...] += np.float64(g) @ np.float64(w[tap]).T
    return dxp[:, lo_h:lo_h + x_shape[1], lo_w:lo_w + x_shape[2]]


def numpy_kernel_grad(g, x, w_shape, strides, padding) -> np.ndarray:
    """The adjoint of numpy_conv in w: per tap, its inputs contracted with the cotangent."""
    xp = _padded(np.float64(x), padding)
    dw = np.zeros(w_shape)
    for tap in np.ndindex(*w_shape[:2]):
        dw[tap] = np.einsum("bhwi,bhwo->io", _window(xp, tap, strides, g.shape[1:3]), np.float64(g))
    return dw


def _ours(strides, padding):
    return lambda x, w: canonical_conv(x, w, strides, padding, dimension_numbers=DN)


def _vjp(strides, padding):
    """(value, dx, dw) of canonical_conv at cotangent g, jitted."""
    def vjp(x, w, g):
        y, pullback = jax.vjp(_ours(strides, padding), x, w)
        return (y, *pullback(g))

    return jax.jit(vjp)


def _check_against_numpy(x, w, strides, padding, seed=0):
    out_hw = _out_hw(x.shape, w.shape, strides, padding)
    g = np.random.default_rng(seed).standard_normal((x.shape[0], *out_hw, w.shape[3]))
    g = g.astype(np.float32)
    y, dx, dw = _vjp(strides, padding)(x, w, g)
    np.testing.assert_allclose(y, numpy_conv(x, w, strides, padding), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, numpy_input_grad(g, w, x.shape, strides, padding),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, numpy_kernel_grad(g, x, w.shape, strides, padding),
                               rtol=1e-4, atol=1e-4)


@st.composite
def conv_cases(draw):
    """Sizes 1-9 (non-square), kernels 1-4, strides 1-3, paddings 0-6 per side (wider than the
    kernel's reach included), with at least one output position."""
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    padding = tuple((draw(st.integers(0, 6)), draw(st.integers(0, 6))) for _ in range(2))
    hw = tuple(draw(st.integers(max(1, kk - lo - hi), 9))
               for kk, (lo, hi) in zip(k, padding, strict=True))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    batch, c_in, c_out = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((batch, *hw, c_in)).astype(np.float32)
    w = rng.standard_normal((*k, c_in, c_out)).astype(np.float32)
    return x, w, strides, padding


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=conv_cases())
def test_value_and_gradients_match_the_numpy_reference(case):
    x, w, strides, padding = case
    _check_against_numpy(x, w, strides, padding)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "padding", [((0, 0), (4, 0)), ((0, 0), (0, 4)), ((1, 1), (5, 1)), ((5, 0), (1, 5))])
def test_wide_padding_is_cropped_not_passed_to_xla(padding, stride):
    """Paddings wider than the kernel's reach make the input gradient's correlation pad
    negatively on one side; XLA:CPU's f32 conv with a negative low padding and a small positive
    high one reads the wrong columns (openxla/xla#48713). 8 channels keep XLA on that (Eigen)
    path; without the crop in `_correlate` these cases fail."""
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    _check_against_numpy(x, w, (stride, stride), padding)


def _conv_matrix(fn, shape) -> np.ndarray:
    """The matrix of the linear map fn, one column per basis input (forward only)."""
    basis = jnp.eye(int(np.prod(shape)), dtype=jnp.float32).reshape(-1, *shape)
    return np.asarray(jax.vmap(fn)(basis)).reshape(len(basis), -1).T


@pytest.mark.parametrize("strides, padding", [
    ((1, 1), ((1, 1), (1, 1))), ((2, 2), ((1, 1), (1, 1))), ((3, 2), ((0, 2), (3, 0))),
    ((2, 1), ((4, 0), (0, 0)))])
def test_gradients_are_the_adjoint_of_the_forward(strides, padding):
    """Brute force: dx = A_w^T g and dw = B_x^T g with A_w, B_x built column by column from the
    conv's forward on basis vectors (the vmap goes through the primitive's batching rule)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 4, 2)).astype(np.float32)
    w = rng.standard_normal((3, 2, 2, 3)).astype(np.float32)
    f = _ours(strides, padding)
    y = f(x, w)
    g = rng.standard_normal(y.shape).astype(np.float32)
    a_w = _conv_matrix(lambda e: f(e[None], w)[0], x.shape[1:])
    b_x = _conv_matrix(lambda e: f(x, e), w.shape)
    dx, dw = jax.vjp(f, x, w)[1](g)
    np.testing.assert_allclose(np.ravel(dx), a_w.T @ np.ravel(g), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.ravel(dw), b_x.T @ np.ravel(g), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a_w @ np.ravel(x), np.ravel(y), rtol=1e-4, atol=1e-4)


def test_forward_and_reverse_jacobians_agree():
    """jacfwd (the primitive's tangent: the conv of the tangents) equals jacrev (its custom
    transposes), and a second derivative goes through the transposes too."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 5, 2)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
    f = _ours((2, 2), ((1, 1), (1, 1)))

    def loss(x, w):
        return jnp.sum(jnp.sin(f(x, w)))

    for argnum in (0, 1):
        forward, reverse = jax.jit(jax.jacfwd(loss, argnum)), jax.jit(jax.jacrev(loss, argnum))
        np.testing.assert_allclose(forward(x, w), reverse(x, w), rtol=1e-4, atol=1e-4)
    xla = lambda x, w: jnp.sum(jnp.sin(  # noqa: E731
        jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DN)))
    hvp = jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(loss)(x, w) ** 2)))(w)
    hvp_xla = jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(xla)(x, w) ** 2)))(w)
    np.testing.assert_allclose(hvp, hvp_xla, rtol=1e-3, atol=1e-3)


def _model(mode: str):
    cfg = default_model_config()
    cfg.name, cfg.conv_vjp = "small_cnn", mode
    model = build_model(cfg, 3, (8, 8, 1))
    return model, init_variables(model, jax.random.PRNGKey(0), (8, 8, 1))


def test_jvp_through_a_model_on_cpu():
    """jax.jvp through small_cnn with the canonical conv (the default on CPU) equals XLA's conv's
    jvp and a central finite difference, in the input and in the parameters."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 1))
    dx = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    results = {}
    for mode in ("auto", "xla"):
        model, variables = _model(mode)
        params = variables["params"]

        @jax.jit
        def logits(x, params, model=model, variables=variables):
            return model.apply({**variables, "params": params}, x)

        dparams = jax.tree.map(jnp.ones_like, params)
        results[mode] = jax.jit(lambda x, params, dparams, logits=logits: (
            jax.jvp(lambda x: logits(x, params), (x,), (dx,))[1],
            jax.jvp(lambda p: logits(x, p), (params,), (dparams,))[1]))(x, params, dparams)
        if mode == "auto":
            eps = 1e-2
            finite = (logits(x + eps * dx, params) - logits(x - eps * dx, params)) / (2 * eps)
            np.testing.assert_allclose(results[mode][0], finite, rtol=2e-2, atol=2e-3)
    for ours, xla in zip(results["auto"], results["xla"], strict=True):
        np.testing.assert_allclose(ours, xla, rtol=1e-4, atol=1e-5)


def _uses_canonical_conv(mode: str) -> bool:
    model, variables = _model(mode)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(model.apply(variables, x))))(
        jnp.zeros((1, 8, 8, 1)))
    return "hamjax_canonical_conv" in str(jaxpr)


def test_conv_vjp_field_picks_the_conv():
    assert base_config().model.conv_vjp == "auto"
    assert jax.default_backend() == "cpu"
    assert _uses_canonical_conv("auto") and _uses_canonical_conv("canonical")
    assert not _uses_canonical_conv("xla")
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        assert conv_impl("auto") is jax.lax.conv_general_dilated
        assert conv_impl("canonical") is canonical_conv


def test_unknown_conv_vjp_is_a_config_error():
    config = base_config()
    config.model.conv_vjp = "fast"
    with pytest.raises(ConfigError, match="model.conv_vjp"):
        validate_config(config)
    cfg = default_model_config()
    cfg.name, cfg.conv_vjp = "small_cnn", "fast"
    with pytest.raises(ConfigError, match=r"model\.conv_vjp.*" + str(CONV_VJP_MODES[0])):
        build_model(cfg, 3)
