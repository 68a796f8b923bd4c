"""PreAct-ResNet-18 as used by Rice et al. 2020 / Wong et al. 2020 and most AT papers since."""

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
    torch_default_kernel_init,
    torch_padded_conv,
)


def _conv(
    features: int, kernel: int, stride: int, dtype: Any, name: str, conv_vjp: str
) -> nn.Conv:
    """Bias-free conv with PyTorch padding and PyTorch's default init."""
    return torch_padded_conv(
        features, kernel, stride, dtype, name, torch_default_kernel_init, conv_vjp
    )


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the 1x1 shortcut (if any) sees the pre-activated input."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_vjp: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        out = nn.relu(batch_norm(x, train, mask, dtype=self.dtype, name="bn1"))
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut",
                             self.conv_vjp)(out)
        else:
            shortcut = x
        out = _conv(self.features, 3, self.stride, self.dtype, "conv1", self.conv_vjp)(out)
        out = nn.relu(batch_norm(out, train, mask, dtype=self.dtype, name="bn2"))
        out = _conv(self.features, 3, 1, self.dtype, "conv2", self.conv_vjp)(out)
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (CIFAR stem: 3x3 conv 64, stages 64/128/256/512 x 2 blocks, ~11.17M
    params at 10 classes). Input: float [0,1] NHWC; normalised inside; returns float32 logits."""

    num_classes: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: Any = jnp.float32
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    conv_vjp: str = "auto"  # model.conv_vjp: whose conv derivatives (hamjax.backends.cpu.conv)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        dtype = compute_dtype(self.dtype)
        x = normalize(x, self.mean, self.std).astype(dtype)
        x = _conv(64, 3, 1, dtype, "conv1", self.conv_vjp)(x)
        stages = zip((64, 128, 256, 512), self.stage_sizes, strict=True)
        for i, (width, blocks) in enumerate(stages):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                block = PreActBlock(width, stride, dtype, self.conv_vjp, name=f"layer{i + 1}_{j}")
                x = block(x, train, mask)
        x = nn.relu(batch_norm(x, train, mask, dtype=dtype, name="bn"))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # == avg_pool(4) at 32x32, any size
        return classifier_head(x, self.num_classes)
