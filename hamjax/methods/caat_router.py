"""CAAT's router: the six per-example features and the meta-net g_Omega mapping them to the
branch weights (alpha, beta) = softmax(g(zeta) / T), with a derivative exact at T = 0.001."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hamjax.models.layers import BN_EPSILON, BN_MOMENTUM, torch_default_bias_init
from hamjax.models.layers import torch_default_kernel_init as _kernel_init

Array = jax.Array

NUM_FEATURES = 6


FEATURE_NAMES = ("ce", "class_avg_loss_last_epoch", "grad_norm", "margin", "neg_entropy",
                 "class_proportion")


@jax.custom_jvp
def _sigmoid(x: Array) -> Array:
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    # sigma'(x) = exp(log sigma(x) + log sigma(-x)): exact in the tails and even in x. The usual
    # s (1 - s) is ~ulp(1) wherever s rounds near 1, which divided by T = 0.001 swamps the true
    # slope (XLA's fused softmax gives every clear-cut example ~1e-4 instead of ~0).
    (x,), (t,) = primals, tangents
    slope = jnp.exp(jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))
    return _sigmoid(x), slope * t


def two_way_softmax(z: Array, temperature: float) -> Array:
    """softmax(z / T) over two logits, [B, 2], computed as (sigma(d), sigma(-d)), d = (z0-z1)/T.

    The same function; its derivatives are accurate at T = 0.001 (see `_sigmoid_jvp`).
    """
    d = (z[..., 0] - z[..., 1]) / temperature
    return jnp.stack([_sigmoid(d), _sigmoid(-d)], axis=-1)


class MetaNet(nn.Module):
    """BatchNorm(6) -> Dense(hidden) -> ReLU -> Dense(2) -> softmax(z / T): (alpha, beta).

    PyTorch's BatchNorm1d / Linear defaults (momentum 0.1, eps 1e-5, kaiming-uniform(sqrt 5)).
    The official code never switches it to eval mode, so its BatchNorm always standardises the
    features with the current batch's statistics: routing depends on where an example stands
    within its batch, not on the raw scales (losses ~1-2, proportions ~0.1), which running
    statistics would pass through early on. `method.meta_bn` chooses ("batch" = official).
    """

    hidden: int = 100
    temperature: float = 1e-3

    @nn.compact
    def __call__(self, features: Array, use_running_average: bool = False) -> Array:
        x = nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name="bn")(features)
        x = nn.Dense(self.hidden, kernel_init=_kernel_init,
                     bias_init=torch_default_bias_init(features.shape[-1]), name="hidden")(x)
        x = nn.relu(x)
        z = nn.Dense(2, kernel_init=_kernel_init, bias_init=torch_default_bias_init(self.hidden),
                     name="out")(x)
        return two_way_softmax(z, self.temperature)


def make_meta_net(method_config) -> MetaNet:
    return MetaNet(hidden=int(method_config.meta_hidden),
                   temperature=float(method_config.temperature))


def meta_optimizer(method_config) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay): the decay is L2 added to the gradient (not AdamW)."""
    return optax.chain(
        optax.add_decayed_weights(float(method_config.meta_weight_decay)),
        optax.adam(float(method_config.meta_lr)),
    )


def route(net: MetaNet, meta_params, meta_stats, features: Array, *, batch_stats: bool):
    """Branch weights [B, 2] and the meta-net's updated running statistics.

    batch_stats=True standardises with this batch's statistics (official); False uses the
    running ones (updated with this batch first).
    """
    variables = {"params": meta_params, "batch_stats": meta_stats}
    weights, updates = net.apply(variables, features, use_running_average=False,
                                 mutable=["batch_stats"])
    new_stats = updates["batch_stats"]
    if not batch_stats:
        weights = net.apply({"params": meta_params, "batch_stats": new_stats}, features,
                            use_running_average=True)
    return weights, new_stats


def meta_features(logits: Array, labels: Array, class_loss_last: Array,
                  class_proportion: Array) -> Array:
    """The six per-example features, in the official order (`FEATURE_NAMES`), f32[B, 6]."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits)
    p = jnp.exp(log_p)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    ce = -jnp.sum(onehot * log_p, axis=-1)
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(onehot - p), axis=-1))
    p_true = jnp.sum(onehot * p, axis=-1)
    p_other = jnp.max(jnp.where(onehot > 0, -jnp.inf, p), axis=-1)
    neg_entropy = jnp.sum(p * log_p, axis=-1)
    return jnp.stack(
        [ce, class_loss_last[labels], grad_norm, p_true - p_other, neg_entropy,
         class_proportion[labels]], axis=-1)


def class_proportion(ctx) -> Array:
    """Training-set share of each class (feature 6)."""
    counts = np.asarray(ctx.class_counts, np.float64)
    return jnp.asarray(counts / max(counts.sum(), 1.0), jnp.float32)


def meta_net_rng(method_config, method_rng: Array) -> Array:
    """The meta-net's init key: `method.meta_init_seed` when set (>= 0), else the run's."""
    seed = int(method_config.get("meta_init_seed", -1))
    return jax.random.PRNGKey(seed) if seed >= 0 else method_rng


def init_meta_net(method_config, rng: Array) -> dict:
    """A fresh meta-net's variables (params and BatchNorm statistics)."""
    return make_meta_net(method_config).init(rng, jnp.zeros((2, NUM_FEATURES), jnp.float32),
                                             use_running_average=False)
