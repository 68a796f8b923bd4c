"""Per-example attack losses: larger means more adversarial.

Every loss maps logits [B, C] to a vector [B], so attacks can take input gradients of the sum
(examples are independent when the model's BatchNorm uses running statistics) and still
report, mask and compare per example.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, *, clean_logits=None, target=None) -> Array:
    """Softmax cross-entropy of the true label (untargeted PGD's objective)."""
    del clean_logits, target
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def targeted_cross_entropy(logits: Array, labels: Array, *, clean_logits=None, target=None):
    """Negative CE of the target class: ascending it pushes towards `target`."""
    del clean_logits, labels
    return -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), target)


def _true_and_best_other(logits: Array, labels: Array) -> tuple[Array, Array]:
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    true = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
    return true, other


def cw_margin(logits: Array, labels: Array, *, clean_logits=None, target=None) -> Array:
    """Carlini-Wagner margin max_{j != y} z_j - z_y: positive once misclassified."""
    del clean_logits, target
    true, other = _true_and_best_other(logits, labels)
    return other - true


def dlr(logits: Array, labels: Array, *, clean_logits=None, target=None) -> Array:
    """Difference-of-logits-ratio (Croce & Hein 2020): scale-invariant margin used by APGD."""
    del clean_logits, target
    logits = logits.astype(jnp.float32)
    true, other = _true_and_best_other(logits, labels)
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted(logits: Array, labels: Array, *, clean_logits=None, target=None) -> Array:
    """Targeted DLR of APGD-T: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    del clean_logits
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    true = jnp.sum(jax.nn.one_hot(labels, num_classes) * logits, axis=-1)
    tgt = jnp.sum(jax.nn.one_hot(target, num_classes) * logits, axis=-1)
    top = jnp.sort(logits, axis=-1)[:, ::-1]
    return -(true - tgt) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def kl_divergence(logits: Array, labels: Array, *, clean_logits=None, target=None) -> Array:
    """KL(p(clean) || p(adv)), the TRADES inner maximisation; labels are not used."""
    del labels, target
    if clean_logits is None:
        raise ValueError("loss='kl' needs clean_logits (the model's logits on the clean input)")
    log_p_clean = jax.nn.log_softmax(clean_logits.astype(jnp.float32))
    log_p_adv = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.sum(jnp.exp(log_p_clean) * (log_p_clean - log_p_adv), axis=-1)


LOSSES: dict[str, Callable[..., Array]] = {
    "ce": cross_entropy,
    "ce_targeted": targeted_cross_entropy,
    "cw": cw_margin,
    "dlr": dlr,
    "dlr_targeted": dlr_targeted,
    "kl": kl_divergence,
}


def per_example_loss(name: str, logits: Array, labels: Array, *, clean_logits=None, target=None):
    """Looks up an attack loss by name and evaluates it per example."""
    if name not in LOSSES:
        raise ValueError(f"unknown attack loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](logits, labels, clean_logits=clean_logits, target=target)
