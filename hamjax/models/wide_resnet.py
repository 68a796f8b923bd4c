"""WideResNet as in the TRADES / MART / AWP code (WRN-34-10 by default, dropout 0)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hamjax.models.layers import (
    batch_norm,
    classifier_head,
    compute_dtype,
    normalize,
    torch_padded_conv,
    wrn_conv_init,
)
from hamjax.validation import is_int, require


def _conv(
    features: int, kernel: int, stride: int, dtype: Any, name: str, conv_vjp: str
) -> nn.Conv:
    """Bias-free conv, PyTorch padding, TRADES init N(0, sqrt(2 / (k*k*out)))."""
    return torch_padded_conv(features, kernel, stride, dtype, name, kernel_init=wrn_conv_init,
                             conv_vjp=conv_vjp)


class WideBasicBlock(nn.Module):
    """TRADES BasicBlock: BN-ReLU-conv-BN-ReLU-conv; when channels change, the 1x1 shortcut is
    applied to the pre-activated input (as in the reference code)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_vjp: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        equal_in_out = x.shape[-1] == self.features
        out = nn.relu(batch_norm(x, train, mask, dtype=self.dtype, name="bn1"))
        if equal_in_out:
            shortcut = x
        else:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut",
                             self.conv_vjp)(out)
        out = _conv(self.features, 3, self.stride, self.dtype, "conv1", self.conv_vjp)(out)
        out = nn.relu(batch_norm(out, train, mask, dtype=self.dtype, name="bn2"))
        out = _conv(self.features, 3, 1, self.dtype, "conv2", self.conv_vjp)(out)
        return out + shortcut


def check_wrn_shape(depth: Any, width: Any) -> None:
    """WRN-depth-width exists for depth = 6n + 4 >= 10 and width >= 1: the one check of it,
    used by the config validator, the model builder and the module itself."""
    require(is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0, "model.depth", depth,
            "WideResNet depth must be an int 6n+4 >= 10, e.g. 28 or 34")
    require(is_int(width) and width >= 1, "model.width", width,
            "WideResNet width must be an int >= 1")


class WideResNet(nn.Module):
    """WRN-depth-width (depth = 6n + 4); WRN-34-10 has ~46.16M params at 10 classes.

    Input: float [0,1] NHWC; normalised inside; returns float32 logits. The unused `sub_block1`
    of the TRADES code is omitted (it never runs, so it changes nothing but the param count).
    """

    num_classes: int = 10
    depth: int = 34
    width: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    conv_vjp: str = "auto"  # model.conv_vjp: whose conv derivatives (hamjax.backends.cpu.conv)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        check_wrn_shape(self.depth, self.width)
        n = (self.depth - 4) // 6
        dtype = compute_dtype(self.dtype)
        x = normalize(x, self.mean, self.std).astype(dtype)
        x = _conv(16, 3, 1, dtype, "conv1", self.conv_vjp)(x)
        for i, (channels, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
            for j in range(n):
                x = WideBasicBlock(
                    channels * self.width, stride if j == 0 else 1, dtype, self.conv_vjp,
                    name=f"block{i + 1}_{j}",
                )(x, train, mask)
        x = nn.relu(batch_norm(x, train, mask, dtype=dtype, name="bn"))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # == avg_pool(8) at 32x32, any size
        return classifier_head(x, self.num_classes, bias_init=nn.initializers.zeros)
