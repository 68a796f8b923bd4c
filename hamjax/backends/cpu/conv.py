"""XLA:CPU convolution with a layout-canonical VJP (moved from hamjax/models/layers.py)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------- conv backward on CPU
# XLA:CPU canonicalises conv layouts only in the entry computation: the backward convs autodiff
# emits (transposed kernel, batch-as-feature weight gradient) run on a naive path ~30x slower once
# they sit inside a `while` body (every PGD loop) or a `lax.switch` branch (HAM's buckets); see
# jax-ml/jax#12868. `canonical_conv` has the same value and gradients but writes its VJP with
# plain NHWC/HWIO convs, which stay fast everywhere; a strided conv's input gradient goes by
# output phases (`_phased_input_grad`) instead of an lhs-dilated conv that multiplies zeros.
# Used on CPU only; GPU/TPU keep XLA's own VJP.
_DN = ("NHWC", "HWIO", "NHWC")


def _dilated(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _vjp_paddings(in_hw, k_hw, strides, out_hw, padding):
    """Paddings of the input- and weight-gradient convs (as in jax's conv transpose rules)."""
    lhs, rhs = [], []
    for n, k, s, o, (lo, _) in zip(in_hw, k_hw, strides, out_hw, padding, strict=True):
        out_dilated = _dilated(o, s)
        before = k - lo - 1
        lhs.append((before, n + k - 1 - out_dilated - before))
        rhs.append((lo, (out_dilated - n) + (k - lo - 1)))
    return lhs, rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _canonical_conv_fwd(x, w, strides, padding):
    return _canonical_conv(x, w, strides, padding), (x, w)


def _phase_taps(n: int, k: int, s: int, lo: int, out: int, phase: int):
    """One axis of a strided conv's input gradient, for the inputs j = s*a + phase: the kernel
    taps that reach them (start c, count m: taps c, c+s, ...) and the (low, high) padding of the
    output gradient for a stride-1 correlation with those taps reversed (n/s outputs)."""
    c = (phase + lo) % s
    m = -(-(k - c) // s) if k > c else 0
    low = (m - 1) - (phase + lo) // s
    return c, m, (low, n // s - out - low + m - 1)


def _flips_activations(g_shape, w_shape, padding) -> bool:
    """Whether `_transposed_correlation` reverses g and its result instead of the kernel: when
    the kernel holds more elements than g and the result together (deep layers at small spatial
    size)."""
    out_hw = [n + lo + hi - k + 1 for n, (lo, hi), k in zip(g_shape[1:3], padding, w_shape[:2],
                                                            strict=True)]
    activations = g_shape[0] * g_shape[1] * g_shape[2] * w_shape[3]
    activations += g_shape[0] * out_hw[0] * out_hw[1] * w_shape[2]
    return w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3] > activations


def _transposed_correlation(g, w, padding):
    """Stride-1 correlation of g (B,H,W,O) with w (kh,kw,I,O) reversed in space and with its
    channels swapped: a conv's input gradient. XLA:CPU runs the fused reverse+transpose of a
    3x3x512x512 kernel 5x slower than a plain transpose (6 ms, inside every PGD iteration), so
    when the kernel outweighs the activations the reversal moves onto them:
    corr(g, flip(w)) = flip(corr(flip(g), w)) with the padding mirrored."""
    w_io = jnp.swapaxes(w, 2, 3)
    if not _flips_activations(g.shape, w.shape, padding):
        return _correlate(g, jnp.flip(w_io, (0, 1)), padding)
    mirrored = tuple((hi, lo) for lo, hi in padding)
    return jnp.flip(_correlate(jnp.flip(g, (1, 2)), w_io, mirrored), (1, 2))


def _correlate(g, w, padding):
    """Stride-1 NHWC/HWIO correlation where a negative padding crops g by slicing: XLA:CPU's
    conv with a negative low padding gets the last output column wrong (jaxlib 0.10.2; its own
    VJP of a conv padded wider than the kernel's reach inherits the error)."""
    (lo_h, hi_h), (lo_w, hi_w) = padding
    crop = g[:, max(-lo_h, 0):g.shape[1] - max(-hi_h, 0), max(-lo_w, 0):g.shape[2] - max(-hi_w, 0)]
    pads = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
    return jax.lax.conv_general_dilated(crop, w, (1, 1), pads, dimension_numbers=_DN)


def _phased_input_grad(g, w, x_shape, strides, padding):
    """dx of a conv as s_h * s_w stride-1 correlations of g, one per output phase, interleaved
    (stride 1: one phase): the same sums as the lhs-dilated conv without the
    (s_h s_w - 1)/(s_h s_w) of its multiplies that fall on inserted zeros (XLA:CPU runs that
    conv 2-3x slower than the forward). Needs each input size divisible by its stride."""
    (n_h, n_w), (s_h, s_w) = x_shape[1:3], strides
    rows = []
    for p_h in range(s_h):
        c_h, m_h, pad_h = _phase_taps(n_h, w.shape[0], s_h, padding[0][0], g.shape[1], p_h)
        row = []
        for p_w in range(s_w):
            c_w, m_w, pad_w = _phase_taps(n_w, w.shape[1], s_w, padding[1][0], g.shape[2], p_w)
            shape = (g.shape[0], n_h // s_h, n_w // s_w, x_shape[3])
            if m_h == 0 or m_w == 0:  # no tap reaches this phase (e.g. a 1x1 stride-2 conv)
                row.append(jnp.zeros(shape, g.dtype))
                continue
            taps = w[c_h:c_h + s_h * (m_h - 1) + 1:s_h, c_w:c_w + s_w * (m_w - 1) + 1:s_w]
            row.append(_transposed_correlation(g, taps, (pad_h, pad_w)))
        rows.append(jnp.stack(row, axis=3))  # B, n_h/s_h, n_w/s_w, s_w, C
    phased = jnp.stack(rows, axis=2)  # B, n_h/s_h, s_h, n_w/s_w, s_w, C
    return phased.reshape(x_shape[0], n_h, n_w, x_shape[3])


def _canonical_conv_bwd(strides, padding, res, g):
    x, w = res
    lhs_pad, rhs_pad = _vjp_paddings(x.shape[1:3], w.shape[:2], strides, g.shape[1:3], padding)
    if all(n % s == 0 for n, s in zip(x.shape[1:3], strides, strict=True)):
        dx = _phased_input_grad(g, w, x.shape, strides, padding)
    else:
        w_t = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)
        dx = jax.lax.conv_general_dilated(g, w_t, (1, 1), lhs_pad, lhs_dilation=strides,
                                          dimension_numbers=_DN)
    dw = jax.lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)),
                                      jnp.transpose(g, (1, 2, 0, 3)), (1, 1), rhs_pad,
                                      rhs_dilation=strides, dimension_numbers=_DN)
    return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def canonical_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, **kwargs):
    """`lax.conv_general_dilated` for flax's nn.Conv with a layout-canonical VJP (plain 2-D
    NHWC/HWIO convs with explicit padding; anything else falls through unchanged)."""
    plain = (
        lhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
        and set(lhs_dilation or (1,)) == {1} and set(rhs_dilation or (1,)) == {1}
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
        and not kwargs.get("batch_group_count", 1) != 1
    )
    if plain:
        strides = tuple(int(s) for s in window_strides)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        return _canonical_conv(lhs, rhs, strides, pads)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, **kwargs)


def conv_impl() -> Any:
    """The conv primitive models use: the canonical-VJP conv on CPU, XLA's own elsewhere."""
    return canonical_conv if jax.default_backend() == "cpu" else jax.lax.conv_general_dilated
