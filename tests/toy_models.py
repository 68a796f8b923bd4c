"""A separable toy task and a small MLP trained on it: a real, non-trivial target that attacks
must actually break (shared by the PGD, APGD and AutoAttack tests)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hamjax.attacks import per_example_loss
from hamjax.backends.cpu.conv import conv_impl


def toy_data(n: int = 256, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8x1 images in [0, 1]: one noisy template per class (float32 images, int32 labels)."""
    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(classes, 8, 8, 1))
    y = rng.integers(0, classes, n)
    x = np.clip(0.5 + 0.05 * templates[y] + 0.1 * rng.normal(size=(n, 8, 8, 1)), 0, 1)
    return x.astype(np.float32), y.astype(np.int32)


def train_mlp(x, y, classes: int = 4, steps: int = 200, seed: int = 0):
    """A 64-32-classes ReLU MLP trained with Adam to (near) clean accuracy 1; its logits_fn."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"w1": jax.random.normal(k1, (64, 32)) / 8, "b1": jnp.zeros(32),
              "w2": jax.random.normal(k2, (32, classes)) / 6, "b2": jnp.zeros(classes)}

    def apply(p, xb):
        h = jax.nn.relu(xb.reshape(xb.shape[0], -1) @ p["w1"] + p["b1"])
        return h @ p["w2"] + p["b2"]

    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: per_example_loss("ce", apply(q, x), y).mean())(p)
        u, s = tx.update(g, s)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return functools.partial(apply, params)


class TinyNet(nn.Module):
    """conv4-BN-ReLU-dense: the smallest model with BatchNorm (method steps on 4x4 images).
    conv_vjp: None for flax's conv, else a `model.conv_vjp` mode, as the library's models."""

    num_classes: int = 4
    conv_vjp: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        del mask
        conv = {} if self.conv_vjp is None else {  # explicit SAME padding: a plain conv
            "conv_general_dilated": conv_impl(self.conv_vjp), "padding": ((1, 1), (1, 1))}
        x = nn.Conv(4, (3, 3), **conv)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)
