"""A small conv net for CPU-sized runs (8x8 sklearn digits, 28x28 Fashion-MNIST)."""

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
    conv_impl,
    normalize,
    torch_default_bias_init,
    torch_default_kernel_init,
)


class SmallCNN(nn.Module):
    """conv32-BN-ReLU, conv64/2-BN-ReLU, conv128/2-BN-ReLU, global avg pool, dense128-ReLU, dense.

    Global pooling makes it size-agnostic (8x8 -> 2x2, 28x28 -> 7x7 before pooling) and cheap:
    ~0.11M params at 10 classes. Input: float [0,1] NHWC; returns float32 logits.
    """

    num_classes: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    widths: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    conv_vjp: str = "auto"  # model.conv_vjp: whose conv derivatives (hamjax.backends.cpu.conv)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        dtype = compute_dtype(self.dtype)
        x = normalize(x, self.mean, self.std).astype(dtype)
        for i, width in enumerate(self.widths):
            stride = 1 if i == 0 else 2
            x = nn.Conv(
                width,
                (3, 3),
                strides=(stride, stride),
                padding=((1, 1), (1, 1)),
                use_bias=False,  # followed by BN
                dtype=dtype,
                param_dtype=jnp.float32,
                conv_general_dilated=conv_impl(self.conv_vjp),
                kernel_init=torch_default_kernel_init,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(batch_norm(x, train, mask, dtype=dtype, name=f"bn{i + 1}"))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(
            self.hidden,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(x.shape[-1]),
            name="dense",
        )(x)
        x = nn.relu(x)
        return classifier_head(x, self.num_classes)
