"""hamjax's XLA compile options: on the CPU the convolutions leave YNNPACK for Eigen and still
compute the same convolution (against a NumPy reference); the user's XLA_FLAGS and other
backends are left alone; an option this jaxlib lacks is detected, never passed."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hamjax.backends.cpu import compile_options
from hamjax.backends.cpu.compile_options import (
    CPU_OPTIONS,
    YNN_FUSION_OPTION,
    compiler_options,
    jit,
)


@pytest.fixture
def fresh_options():
    compiler_options.cache_clear()
    yield
    compiler_options.cache_clear()


def numpy_conv(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """NHWC x HWIO cross-correlation by explicit sums over the kernel window."""
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = w.shape[0]
    out_h = (xp.shape[1] - k) // stride + 1
    out_w = (xp.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]), np.float64)
    for i in range(k):
        for j in range(k):
            window = xp[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride]
            out += np.einsum("bhwc,co->bhwo", window, w[i, j])
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_jit_runs_the_same_convolution_off_ynnpack(stride):
    rs = np.random.RandomState(stride)
    # channel counts at which this jaxlib's defaults hand the conv to YNNPACK
    x = rs.randn(2, 8, 8, 16).astype(np.float32)
    w = rs.randn(3, 3, 16, 32).astype(np.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    jitted = jit(conv)
    np.testing.assert_allclose(jitted(x, w), numpy_conv(x, w, stride, 1), rtol=1e-4, atol=1e-4)
    if compiler_options() is not None:
        hlo = jitted.lower(x, w).compile().as_text()
        assert "convolution(" in hlo and "__ynn_fusion" not in hlo, hlo


def test_cpu_options_are_used_where_this_jaxlib_accepts_them(fresh_options):
    assert jax.default_backend() == "cpu"
    expected = CPU_OPTIONS if compile_options._accepted(CPU_OPTIONS) else None
    assert compiler_options() == expected


def test_an_option_the_jaxlib_lacks_is_not_accepted():
    assert not compile_options._accepted({"xla_cpu_no_such_option_in_any_jaxlib": ""})


def test_the_users_xla_flags_choice_stands(monkeypatch, fresh_options):
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN_FUSION_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
    assert compiler_options() is None


def test_other_backends_keep_xla_defaults(monkeypatch, fresh_options):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert compiler_options() is None
    jitted = jit(lambda x: x * 2)
    assert float(jitted(np.float32(2.0))) == 4.0
