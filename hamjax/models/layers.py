"""Shared building blocks: PyTorch-compatible BatchNorm/initialisers, input normalisation.

The adversarial-training literature (TRADES, MART, AWP, FRL, CAAT) publishes PyTorch numbers, so
BN hyper-parameters and weight initialisers follow PyTorch defaults to keep results comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hamjax.backends.cpu.conv import conv_impl
from hamjax.errors import ConfigError

# flax momentum is the weight of the *old* running stat: 0.9 == PyTorch momentum=0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# PyTorch's default Conv/Linear init (kaiming_uniform(a=sqrt(5))) is U(-1/sqrt(fan_in), +...),
# i.e. variance 1/(3 fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# TRADES/MART WideResNet: conv weight ~ N(0, sqrt(2 / (k*k*out_channels))) (not truncated).
wrn_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch Linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)); fan_in is static."""
    bound = 1.0 / float(fan_in) ** 0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def compute_dtype(dtype: Any, field: str = "model.dtype") -> jnp.dtype:
    """Accepts a jnp dtype or its name ("float32", "bfloat16") as configs store strings.

    float16 is refused: its 5-bit exponent underflows gradients unless the loss is scaled, and
    hamjax has no loss scaling; bfloat16 keeps float32's range and needs none. `field` names the
    config field in the error.
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"{field}={dtype!r} is not a dtype; use 'float32' or 'bfloat16'") from e
    if dt == jnp.dtype(jnp.float16):
        raise ConfigError(
            f"{field}={dtype!r}: float16 without loss scaling is unsupported (gradients "
            "underflow); use 'bfloat16' (same range as float32) or 'float32'"
        )
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ConfigError(f"{field}={dtype!r}: use 'float32' or 'bfloat16'")
    return dt


def normalize(x: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> jax.Array:
    """(x - mean) / std per channel in float32; identity for None (inputs are [0,1] NHWC)."""
    x = jnp.asarray(x, jnp.float32)
    channels = x.shape[-1]
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, channels):
            raise ConfigError(
                f"model.{name} has {len(v)} entries but the input has {channels} channels"
            )
    if mean is not None:
        x = x - jnp.asarray(mean, jnp.float32)
    if std is not None:
        x = x / jnp.asarray(std, jnp.float32)
    return x


def broadcast_mask(mask: jax.Array | None, x: jax.Array) -> jax.Array | None:
    """bool[B] -> bool[B,1,...,1] so it broadcasts against NHWC / NC activations."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    if mask.shape != x.shape[:1]:
        raise ValueError(f"mask must have shape {x.shape[:1]} (batch), got {mask.shape}")
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def batch_norm(
    x: jax.Array,
    train: bool,
    mask: jax.Array | None = None,
    *,
    dtype: Any = jnp.float32,
    name: str | None = None,
) -> jax.Array:
    """nn.BatchNorm with PyTorch momentum/eps whose batch statistics skip masked (padded) rows.

    Call inside a compact method (the BatchNorm becomes a child of the caller). Like flax (unlike
    PyTorch) the running variance is updated with the biased batch variance: a factor N/(N-1),
    N = valid rows x H x W, negligible here. A batch whose mask is all False gives NaN statistics.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x, mask=broadcast_mask(mask, x) if train else None)


def classifier_head(
    features: jax.Array, num_classes: int, *, bias_init: nn.initializers.Initializer | None = None
) -> jax.Array:
    """Final Dense in float32 (call inside a compact method): margin losses (CW, DLR) need
    accurate logit differences, so even bfloat16 models return float32 logits from here."""
    features = jnp.asarray(features, jnp.float32)
    fan_in = features.shape[-1]
    return nn.Dense(
        num_classes,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=torch_default_kernel_init,
        bias_init=bias_init if bias_init is not None else torch_default_bias_init(fan_in),
        name="fc",
    )(features)


def torch_padded_conv(
    features: int, kernel: int, stride: int, dtype: Any, name: str,
    kernel_init: nn.initializers.Initializer, conv_vjp: str = "auto",
) -> nn.Conv:
    """Bias-free square conv with PyTorch padding (k//2 each side; 'SAME' differs at stride 2),
    float32 parameters and the conv primitive `model.conv_vjp` picks (`conv_impl`)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_impl(conv_vjp),
        kernel_init=kernel_init,
        name=name,
    )
