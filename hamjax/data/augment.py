"""Training augmentation as a pure, jittable function of (rng, images)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INV_255 = 1.0 / 255.0


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 images (as batches leave the host) -> float32 in [0, 1]; float images pass through.

    The same float32 multiply the host used to do, so results are bit-identical to scaling first.
    """
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) * jnp.float32(_INV_255)
    return images


def augment(rng: jax.Array, images: jax.Array, *, crop_pad: int, flip: bool) -> jax.Array:
    """Random crop with zero padding and optional horizontal flip, independently per example.

    images: [B, H, W, C] (any float dtype, [0, 1]); returns the same shape and dtype. crop_pad
    and flip are static (Python values). Zero padding keeps pixels in [0, 1], as the attacks
    expect; with crop_pad=0 and flip=False this is the identity.
    """
    if crop_pad < 0:
        raise ValueError(f"crop_pad={crop_pad} must be >= 0")
    if crop_pad == 0 and not flip:
        return images
    _, h, w, c = images.shape
    p = crop_pad

    def one(key: jax.Array, image: jax.Array) -> jax.Array:
        k_y, k_x, k_flip = jax.random.split(key, 3)
        if p > 0:
            padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
            dy = jax.random.randint(k_y, (), 0, 2 * p + 1)
            dx = jax.random.randint(k_x, (), 0, 2 * p + 1)
            image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
        if flip:
            image = jnp.where(jax.random.bernoulli(k_flip), image[:, ::-1, :], image)
        return image

    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(one)(keys, images)
