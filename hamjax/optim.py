"""Optimiser and learning-rate schedules, driven by the global step.

The learning rate is injected from `lr_fn(step)` at every step rather than counted inside optax,
so a skipped update (HAM's empty hard set) does not shift the schedule, and a resumed run is at
the same point of it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

from hamjax.errors import ConfigError

SCHEDULES = ("constant", "piecewise", "cosine")


def make_lr_fn(train_config, steps_per_epoch: int) -> Callable:
    """Learning rate as a function of the global step (boundaries are given in epochs)."""
    name = train_config.lr_schedule
    base = float(train_config.lr)
    total = int(train_config.epochs) * steps_per_epoch
    if name == "constant":
        return optax.constant_schedule(base)
    if name == "piecewise":
        boundaries = [int(round(e * steps_per_epoch)) for e in train_config.lr_boundaries]
        values = [base] + [float(v) for v in train_config.lr_values]
        if len(values) != len(boundaries) + 1:
            raise ConfigError(
                "config.train.lr_values needs one value per entry of config.train.lr_boundaries "
                f"(got {len(values) - 1} values for {len(boundaries)} boundaries)"
            )

        def piecewise(step):
            index = jnp.sum(jnp.asarray(boundaries) <= step) if boundaries else 0
            return jnp.asarray(values, jnp.float32)[index]

        return piecewise
    if name == "cosine":
        return optax.cosine_decay_schedule(base, max(total, 1))
    raise ConfigError(f"config.train.lr_schedule={name!r}: choose one of {SCHEDULES}")


def _sgd(learning_rate, momentum, weight_decay):
    # PyTorch SGD semantics: weight decay is added to the gradient before momentum.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum if momentum else None),
    )


def make_optimizer(train_config) -> optax.GradientTransformation:
    """SGD with momentum and weight decay; the lr is a hyperparameter set each step."""
    return optax.inject_hyperparams(_sgd, static_args=("momentum",))(
        learning_rate=float(train_config.lr),
        momentum=float(train_config.momentum),
        weight_decay=float(train_config.weight_decay),
    )


def set_learning_rate(opt_state, lr):
    """Returns opt_state with the injected learning rate replaced."""
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state._replace(hyperparams=hyperparams)
