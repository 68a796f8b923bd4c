"""A 2-D convolution whose derivatives XLA:CPU runs fast and right (`model.conv_vjp`).

`canonical_conv` has the value of `lax.conv_general_dilated` (NHWC/HWIO, explicit padding) and
is a JAX primitive of its own, bilinear like lax's conv, so every transformation works: `grad`,
`jvp`/`jacfwd` (its tangent is the same conv of the tangents), `vmap`, higher orders. Only its
transposes (the input and weight gradients) differ from XLA's; they work around three upstream
XLA:CPU problems (seen on jaxlib 0.10.2, 2-core AVX2 EPYC):

1. Backward convs inside a `while` body (every PGD iteration) or a `lax.switch` branch (HAM's
   buckets) run ~30x slower: XLA:CPU canonicalises conv layouts only in the entry computation,
   and the transposed-kernel / batch-as-feature convs autodiff emits take a naive path
   (jax-ml/jax#12868, open). Here every gradient is a plain NHWC/HWIO conv.
2. A strided conv's input gradient is an lhs-dilated conv that spends (s^2 - 1)/s^2 of its
   multiplies on inserted zeros, 2-3x slower than the forward (same cost class as
   jax-ml/jax#31662). Here it is one stride-1 correlation per output phase (`_input_gradient`).
3. A conv with a negative low padding gets the last output column wrong on f32 Eigen convs
   (openxla/xla#48713, fix proposed in openxla/xla#48748); XLA's own VJP of a conv padded wider
   than the kernel's reach emits such paddings. Here negative paddings crop by slicing.

Delete this module (and `model.conv_vjp`) once a jaxlib fixes jax-ml/jax#12868 and
openxla/xla#48713 and `benchmarks/cpu_choices_ab.py` shows `xla` no slower than `canonical` on
CPU; `tests/test_cpu_conv.py` holds the NumPy reference both must match.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax._src.core import auto_insert_reshard  # what lax's conv calls before binding
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from hamjax.backends.cpu.choices import cpu_choices
from hamjax.backends.cpu.winograd import applies, winograd_conv3x3
from hamjax.errors import ConfigError

# auto: on the CPU backend what this ISA's row of `choices.MEASURED` decided (the canonical conv
# on AVX2, with Winograd on Zen 4's AVX-512), XLA's elsewhere; xla: XLA's everywhere; canonical:
# the canonical conv everywhere; canonical_winograd: the canonical conv whose wide 3x3 stride-1
# convs (forward and input gradient) run as Winograd F(2x2, 3x3) (`winograd.applies`).
CONV_VJP_MODES = ("auto", "xla", "canonical", "canonical_winograd")

_DN = ("NHWC", "HWIO", "NHWC")
_NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x: jax.Array, w: jax.Array, *, strides: tuple[int, int], padding: Padding,
              winograd: bool = False):
    """The conv's value: Winograd F(2x2, 3x3) where `winograd` is on and the conv is one it
    pays on (`winograd.applies`), else XLA's conv."""
    if winograd and applies(x.shape, w.shape, strides, padding, x.dtype):
        return winograd_conv3x3(x, w)
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


def _abstract_eval(x, w, *, strides, padding, winograd):
    """Shape, dtype, sharding and varying axes exactly as lax's conv would give them."""
    return jax.lax.conv_general_dilated_p.abstract_eval(
        x, w, window_strides=strides, padding=padding, lhs_dilation=(1, 1), rhs_dilation=(1, 1),
        dimension_numbers=_NHWC_HWIO, feature_group_count=1, batch_group_count=1,
        precision=None, preferred_element_type=None, out_sharding=None)


def _phase_taps(n: int, k: int, s: int, lo: int, out: int, phase: int):
    """One axis of a strided conv's input gradient, for the inputs j = s*a + phase: the kernel
    taps that reach them (start c, count m: taps c, c+s, ...) and the (low, high) padding of the
    output gradient for a stride-1 correlation with those taps reversed (n/s outputs)."""
    c = (phase + lo) % s
    m = -(-(k - c) // s) if k > c else 0
    low = (m - 1) - (phase + lo) // s
    return c, m, (low, n // s - out - low + m - 1)


def _transposed_correlation(g, w, padding, winograd=False):
    """Stride-1 correlation of g (B,H,W,O) with w (kh,kw,I,O) reversed in space and with its
    channels swapped: a conv's input gradient; by Winograd (with w's channels left in place)
    where on and it applies. (Reversing the activations instead where the kernel outweighs them
    did not pay in an interleaved A/B: benchmarks/cpu_choices_ab.py.)"""
    reversed_w = jnp.flip(w, (0, 1))
    if winograd and applies(g.shape, (*w.shape[:2], w.shape[3], w.shape[2]), (1, 1), padding,
                            g.dtype):
        return winograd_conv3x3(g, reversed_w, kernel_layout="HWOI")
    return _correlate(g, jnp.swapaxes(reversed_w, 2, 3), padding)


def _crop_negative(x, padding, axes=(1, 2)):
    """x with the rows a negative padding removes sliced off, and the padding left >= 0."""
    index = [slice(None)] * x.ndim
    for axis, (lo, hi) in zip(axes, padding, strict=True):
        index[axis] = slice(max(-lo, 0), x.shape[axis] - max(-hi, 0))
    return x[tuple(index)], tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)


def _correlate(g, w, padding):
    """Stride-1 NHWC/HWIO correlation where a negative padding crops g by slicing (never a
    negative padding in the conv: openxla/xla#48713)."""
    crop, pads = _crop_negative(g, padding)
    return jax.lax.conv_general_dilated(crop, w, (1, 1), pads, dimension_numbers=_DN)


def _phased_input_grad(g, w, x_shape, strides, padding, winograd=False):
    """dx of a conv as s_h * s_w stride-1 correlations of g, one per output phase, interleaved
    (stride 1: one phase): the same sums as the lhs-dilated conv without the
    (s_h s_w - 1)/(s_h s_w) of its multiplies that fall on inserted zeros. Needs each input
    size divisible by its stride."""
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
            row.append(_transposed_correlation(g, taps, (pad_h, pad_w), winograd))
        rows.append(jnp.stack(row, axis=3))  # B, n_h/s_h, n_w/s_w, s_w, C
    phased = jnp.stack(rows, axis=2)  # B, n_h/s_h, s_h, n_w/s_w, s_w, C
    return phased.reshape(x_shape[0], n_h, n_w, x_shape[3])


def _input_gradient(g, w, x_shape, strides, padding, winograd=False):
    """dx of the conv. An input size not divisible by its stride is extended with zero rows at
    the end (and its high padding shortened to match: the same conv), so every case goes by
    phases; the extra rows' gradient is sliced off."""
    ext = [-(-n // s) * s for n, s in zip(x_shape[1:3], strides, strict=True)]
    dx = _phased_input_grad(g, w, (x_shape[0], *ext, x_shape[3]), strides, padding, winograd)
    return dx[:, :x_shape[1], :x_shape[2]]


def _dilated(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _weight_gradient(g, x, w_shape, strides, padding):
    """dw of the conv as one NHWC/HWIO conv of x with the batch as its feature axis and g as
    the kernel (rhs-dilated by the stride); input rows no output reads are cropped away."""
    pads = []
    for n, k, s, o, (lo, _) in zip(x.shape[1:3], w_shape[:2], strides, g.shape[1:3], padding,
                                   strict=True):
        pads.append((lo, (_dilated(o, s) - n) + (k - lo - 1)))
    x, pads = _crop_negative(x, pads)
    dw = jax.lax.conv_general_dilated(jnp.transpose(x, (3, 1, 2, 0)),
                                      jnp.transpose(g, (1, 2, 0, 3)), (1, 1), pads,
                                      rhs_dilation=strides, dimension_numbers=_DN)
    return jnp.transpose(dw, (1, 2, 0, 3))


def _input_transpose(g, x, w, *, strides, padding, winograd):
    return _input_gradient(g, w, x.aval.shape, strides, padding, winograd).astype(x.aval.dtype)


def _weight_transpose(g, x, w, *, strides, padding, winograd):
    return _weight_gradient(g, x, w.aval.shape, strides, padding).astype(w.aval.dtype)


def _batch(args, dims, *, strides, padding, winograd):
    """vmap: a batch axis on x alone folds into the conv's batch; otherwise lax's own rule."""
    (x, w), (bx, bw) = args, dims
    if bw is None:  # not mapped
        x = jnp.moveaxis(x, bx, 0)
        y = canonical_conv_p.bind(x.reshape(-1, *x.shape[2:]), w, strides=strides,
                                  padding=padding, winograd=winograd)
        return y.reshape(*x.shape[:2], *y.shape[1:]), 0
    conv = jax.vmap(lambda a, b: _xla_conv(a, b, strides=strides, padding=padding), (bx, bw))
    return conv(x, w), 0


canonical_conv_p = Primitive("hamjax_canonical_conv")
canonical_conv_p.def_impl(_xla_conv)
canonical_conv_p.def_effectful_abstract_eval(_abstract_eval)
mlir.register_lowering(canonical_conv_p, mlir.lower_fun(_xla_conv, multiple_results=False))
ad.defbilinear(canonical_conv_p, _input_transpose, _weight_transpose)
batching.primitive_batchers[canonical_conv_p] = _batch


def _is_plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, batch_group_count) -> bool:
    """A 2-D NHWC/HWIO conv with explicit padding and no dilation or grouping."""
    return (
        lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
        and not isinstance(padding, str)
        and set(lhs_dilation or (1,)) == {1} and set(rhs_dilation or (1,)) == {1}
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
    )


def canonical_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, *, winograd: bool = False,
                   **kwargs):
    """`lax.conv_general_dilated` for flax's nn.Conv with XLA:CPU-friendly derivatives (plain
    2-D NHWC/HWIO convs with explicit padding; anything else falls through to lax unchanged);
    `winograd`: its wide 3x3 stride-1 convs by Winograd F(2x2, 3x3)."""
    if _is_plain(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, kwargs.get("batch_group_count", 1)):
        strides = tuple(int(s) for s in window_strides)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        # inside shard_map, replicated weights become varying like the rows, as in lax's conv
        lhs, rhs = auto_insert_reshard(lhs, rhs)
        return canonical_conv_p.bind(lhs, rhs, strides=strides, padding=pads,
                                     winograd=bool(winograd))
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, **kwargs)


def resolved_conv_vjp(mode: str = "auto") -> str:
    """The concrete mode `model.conv_vjp` = mode stands for here ("auto" resolved: this ISA's
    row of `choices.MEASURED` on the CPU backend, "xla" elsewhere)."""
    if mode not in CONV_VJP_MODES:
        raise ConfigError(f"model.conv_vjp={mode!r}: choose one of {CONV_VJP_MODES} (auto: the "
                          "canonical conv on CPU, XLA's elsewhere)")
    if mode != "auto":
        return mode
    if jax.default_backend() != "cpu":
        return "xla"
    choices = cpu_choices()
    return ("canonical_winograd" if choices.conv_vjp == "canonical" and choices.winograd
            else choices.conv_vjp)


def conv_impl(mode: str = "auto") -> Any:
    """The conv primitive a model's nn.Conv uses for `model.conv_vjp` = mode (CONV_VJP_MODES)."""
    mode = resolved_conv_vjp(mode)
    if mode == "canonical":
        return canonical_conv
    if mode == "canonical_winograd":
        return functools.partial(canonical_conv, winograd=True)
    return jax.lax.conv_general_dilated
