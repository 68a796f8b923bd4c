"""The generic, pure train step, jitted over a device mesh."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hamjax.averaging import EMA, averaging_mode, ema_step
from hamjax.backends.cpu.compile_options import jit
from hamjax.data import augment, images_to_float
from hamjax.optim import set_learning_rate
from hamjax.sharding import batch_sharding, replicated, stacked_batch_sharding
from hamjax.state import StepContext, TrainState

IMAGE_KEYS = ("image", "meta_image")  # batch entries that arrive as uint8 and are scaled here


def _select(pred, new, old):
    """new where pred else old, leaf by leaf (pred is a traced scalar bool)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _all_finite(*trees) -> jax.Array:
    """One traced bool: every element of every leaf is finite (one reduction per leaf)."""
    leaves = [leaf for tree in trees for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def make_train_step(ctx: StepContext, method) -> Callable[[TrainState, dict], tuple]:
    """Builds `train_step(state, batch) -> (state, metrics)`, pure and jittable.

    rng = fold_in(state.rng, step) makes every step's randomness a function of (seed, step), so a
    resumed run draws exactly what an uninterrupted one would.

    metrics["finite"] is 0 when the loss, a gradient or a new weight or BN statistic is not
    finite; that step then keeps the previous weights, optimiser and BN state, so a diverged
    step never reaches the state (the loop stops the run on it, see `Trainer`).
    """
    augment_config = ctx.config.data.augment

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, pre_rng, loss_rng = jax.random.split(rng, 3)
        batch = {k: images_to_float(v) if k in IMAGE_KEYS else v for k, v in batch.items()}
        batch["image"] = augment(
            aug_rng, batch["image"], crop_pad=augment_config.crop_pad, flip=augment_config.flip
        )
        if method.pre_step is not None:
            state = method.pre_step(state, batch, pre_rng, ctx)
        lr = ctx.lr_fn(state.step)
        grad_fn = jax.value_and_grad(method.loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state, batch, loss_rng, ctx)
        opt_state = set_learning_rate(state.opt_state, lr)
        # AWP evaluates weight decay at the perturbed weights it trained at (the official code
        # steps its optimiser there); every other method at the weights themselves.
        decay_at = aux.get("optimizer_params", state.params)
        updates, new_opt_state = ctx.tx.update(grads, opt_state, decay_at)
        new_params = optax.apply_updates(state.params, updates)
        finite = _all_finite(loss, grads, new_params, aux["batch_stats"])
        apply = jnp.logical_and(aux.get("apply_update", jnp.asarray(True)), finite)
        params = _select(apply, new_params, state.params)
        averaged = state.averaged
        if averaging_mode(ctx.config.train) == EMA:
            averaged = ema_step(averaged, state.params, params, state.step,
                                float(ctx.config.train.ema_decay))
        state = state.replace(
            step=state.step + 1,
            params=params,
            averaged=averaged,
            opt_state=_select(apply, new_opt_state, state.opt_state),
            batch_stats=_select(apply, aux["batch_stats"], state.batch_stats),
            method_state=aux.get("method_state", state.method_state),
            ledger=state.ledger + aux["ledger"],
        )
        metrics = {"loss": loss, "lr": jnp.asarray(lr, jnp.float32), **aux["metrics"]}
        metrics["update_applied"] = apply.astype(jnp.float32)
        metrics["finite"] = finite.astype(jnp.float32)
        return state, metrics

    return train_step


def jit_train_step(train_step, mesh: Mesh):
    """jit with the state replicated and the batch split on its leading axis; no pmap."""
    return jit(
        train_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
    )


def make_multi_step(train_step: Callable[[TrainState, dict], tuple]
                    ) -> Callable[[TrainState, dict], tuple]:
    """`multi_step(state, batches) -> (state, metrics)`: `train_step` over the leading axis of
    `batches` (k stacked batches) as one `lax.scan`, so k steps cost one dispatch
    (`config.train.steps_per_dispatch`). Each step is the same pure function of (state, batch),
    so k scanned steps equal k single ones; metrics come back stacked, (k, ...) per entry."""

    def multi_step(state: TrainState, batches: dict):
        return jax.lax.scan(train_step, state, batches)

    return multi_step


def jit_multi_step(multi_step, mesh: Mesh):
    """jit of `make_multi_step`'s function: state replicated and donated, the stacked batches
    split over the devices on their per-step batch axis (axis 1)."""
    return jit(
        multi_step,
        in_shardings=(replicated(mesh), stacked_batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
    )
