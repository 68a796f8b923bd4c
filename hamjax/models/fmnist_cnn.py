"""The CNN the adversarial-training literature uses for MNIST-family data (28x28 grey images).

Two conv3x3-BN-ReLU-maxpool2 blocks (32 and 64 channels), a 256-unit dense layer and the
classifier: 0.82M parameters, 4.6M multiply-adds per 28x28 image (fewer than `small_cnn`'s 7.5M).
Unlike `small_cnn`'s global mean pool, the dense layer sees where on the image a feature is, which
is what keeps Fashion-MNIST's shirt class apart from T-shirt, pullover and coat under PGD-AT
(`small_cnn` gives the shirt class up: clean worst class 3-8%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hamjax.models.layers import (
    batch_norm,
    classifier_head,
    compute_dtype,
    normalize,
    torch_default_bias_init,
    torch_default_kernel_init,
    torch_padded_conv,
)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, by reshape: same values as `nn.max_pool`, but its gradient is an
    elementwise mask instead of XLA's select-and-scatter (slow on CPU inside PGD's while loop).
    Odd sizes drop the last row/column, as PyTorch's `max_pool2d` does."""
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class FashionMNISTCNN(nn.Module):
    """conv32-BN-ReLU-pool, conv64-BN-ReLU-pool, flatten, dense256-ReLU, dense.

    Input: float [0,1] NHWC (28x28x1 for Fashion-MNIST; any size divisible by 4 works, the dense
    layer's fan-in follows it); returns float32 logits.
    """

    num_classes: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    widths: Sequence[int] = (32, 64)
    hidden: int = 256
    conv_vjp: str = "auto"  # model.conv_vjp: whose conv derivatives (hamjax.backends.cpu.conv)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        dtype = compute_dtype(self.dtype)
        x = normalize(x, self.mean, self.std).astype(dtype)
        for i, width in enumerate(self.widths):
            x = torch_padded_conv(width, 3, 1, dtype, f"conv{i + 1}", torch_default_kernel_init,
                                  self.conv_vjp)(x)
            x = nn.relu(batch_norm(x, train, mask, dtype=dtype, name=f"bn{i + 1}"))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.hidden,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]),
            name="dense",
        )(x)
        return classifier_head(nn.relu(x), self.num_classes)
