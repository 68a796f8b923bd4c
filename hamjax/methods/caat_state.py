"""CAAT's method state: everything a resumed run needs (multipliers, meta-net weights and Adam
state, running class losses, routing counts), its end-of-epoch roll-over and its summary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.methods.caat_router import init_meta_net, meta_net_rng, meta_optimizer
from hamjax.methods.frl import init_lambdas, margin_bounds, refit_lambdas, summarize_lambdas
from hamjax.sharding import place_like


def caat_init_state(ctx, rng) -> dict:
    """Multipliers at zero, a fresh meta-net and Adam state, empty accumulators."""
    mcfg = ctx.config.method
    c = ctx.num_classes
    variables = init_meta_net(mcfg, meta_net_rng(mcfg, rng))
    meta_params = variables["params"]

    def zeros():  # a fresh buffer per leaf: the jitted step donates the state
        return jnp.zeros((c,), jnp.float32)

    return {
        "lambdas": init_lambdas(c),
        "margin_bounds": margin_bounds(mcfg),
        "meta_params": meta_params,
        "meta_stats": variables["batch_stats"],
        "meta_opt_state": meta_optimizer(mcfg).init(meta_params),
        "meta_updates": jnp.zeros((), jnp.int32),
        "meta_loss": jnp.zeros((), jnp.float32),
        # |dL_meta/dOmega| of the last meta step: ~0 at T = 0.001 unless an example is near a tie
        "meta_grad_norm": jnp.zeros((), jnp.float32),
        "class_loss_last": jnp.full((c,), float(mcfg.initial_class_loss), jnp.float32),
        "class_loss_sum": zeros(),
        "class_count": zeros(),
        "route_adv": zeros(),
        "route_total": zeros(),
    }


def roll_epoch(method_state: dict) -> dict:
    """End of epoch: feature 2 becomes this epoch's class-average clean CE (classes not seen
    keep their old value); the loss and routing accumulators restart."""
    ms = dict(method_state)
    count = ms["class_count"]
    ms["class_loss_last"] = jnp.where(count > 0, ms["class_loss_sum"] / jnp.maximum(count, 1.0),
                                      ms["class_loss_last"])
    for key in ("class_loss_sum", "class_count", "route_adv", "route_total"):
        ms[key] = jnp.zeros_like(ms[key])
    return ms


def caat_epoch_end(state, ctx, evaluator):
    """FRL multipliers refitted on the meta set; class losses and routing counts rolled over."""
    old = state.method_state
    ms = roll_epoch(old)
    ms["lambdas"] = refit_lambdas(old["lambdas"], state, ctx, evaluator, (True, True, True))
    return state.replace(method_state=place_like(ms, old))


def routing_summary(method_state) -> dict:
    """Routing over the epoch so far (the loop reads it before `epoch_end` resets it).

    adv_fraction: share of examples with alpha > beta; per_class_adv_fraction: the same per
    class (None for a class not seen); meta_updates: meta steps taken so far.
    """
    ms = jax.device_get(method_state)
    adv = np.asarray(ms["route_adv"], np.float64)
    total = np.asarray(ms["route_total"], np.float64)
    per_class = [float(a / t) if t > 0 else None for a, t in zip(adv, total, strict=True)]
    return {
        "adv_fraction": float(adv.sum() / total.sum()) if total.sum() > 0 else None,
        "per_class_adv_fraction": per_class,
        "meta_updates": int(ms["meta_updates"]),
    }


def caat_summarize_state(method_state) -> dict:
    """Logged after each epoch: routing, the FRL multipliers, feature 2, the last meta loss."""
    ms = jax.device_get(method_state)
    out = routing_summary(ms)
    out.update(summarize_lambdas(ms["lambdas"], ms["margin_bounds"]))
    count = np.asarray(ms["class_count"], np.float64)
    loss_sum = np.asarray(ms["class_loss_sum"], np.float64)
    out["class_avg_loss"] = [float(s / c) if c > 0 else None
                             for s, c in zip(loss_sum, count, strict=True)]
    out["meta_loss_last"] = float(ms["meta_loss"])
    out["meta_grad_norm_last"] = float(ms["meta_grad_norm"])
    return out
