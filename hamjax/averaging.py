"""Weight averaging for every method: a per-step EMA (`train.ema_decay`) or CFA's fairness-aware
weight averaging (FAWA, `train.fawa_decay` / `train.fawa_threshold`), one slot in the state.

EMA (Gowal et al. 2020, DeepMind's JAX code `ema_update`): after every step
avg <- d avg + (1 - d) params with d = min(tau, (1 + t) / (10 + t)), t the global step (0 for the
first step), avg starting from the weights the run starts with (after `train.init_from`).

FAWA (Wei et al. 2023, CFA's `train.py`): after every epoch, if the online model's worst-class
robust accuracy on the validation split is >= the threshold, the first time avg <- params, later
avg <- d avg + (1 - d) params (d = 0.88); otherwise avg stays. `fawa_threshold=0` averages after
every epoch (CFA's plain per-epoch EMA).

The averaged weights are what the run validates, selects its best checkpoint on, reports and what
`hamjax.evaluate` attacks; until the first average exists (FAWA before the threshold is first met)
the online weights stand in. Only weights are averaged: the averaged model uses the online
model's BatchNorm running statistics, as DeepMind's code does (CFA also averages BN buffers,
which mixes running statistics of different weights and is no better founded; recomputing the
statistics for the average would cost a pass over the training data per evaluation).

State layout (`TrainState.averaged`): {} when averaging is off (no arrays, nothing saved),
else {"params": avg, "count": int32 updates folded in}. Pure functions; the trainer calls
`ema_step` inside the jitted step and `fawa_epoch_end` on the host after each epoch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

OFF, EMA, FAWA = "off", "ema", "fawa"


def averaging_mode(train_config) -> str:
    """Which averaging a run uses ("off", "ema" or "fawa"); validation forbids both."""
    if float(train_config.get("ema_decay", 0.0)) > 0.0:
        return EMA
    if float(train_config.get("fawa_decay", 0.0)) > 0.0:
        return FAWA
    return OFF


def init_averaged(params: Any, train_config) -> dict:
    """The averaging slot of a fresh state: {} when off; else a copy of the weights, count 0."""
    if averaging_mode(train_config) == OFF:
        return {}
    return {"params": jax.tree.map(jnp.copy, params), "count": jnp.zeros((), jnp.int32)}


def ema_decay_at(step, tau: float):
    """DeepMind's warmed-up decay min(tau, (1 + t) / (10 + t)): early averages forget the init."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(tau), (1.0 + step) / (10.0 + step))


def blend(avg: Any, params: Any, decay) -> Any:
    """decay * avg + (1 - decay) * params, leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda a, p: (decay * a + (1.0 - decay) * p).astype(a.dtype), avg, params)


def ema_step(averaged: dict, start_params: Any, new_params: Any, step, tau: float) -> dict:
    """One EMA update after training step `step` (0-based) from `start_params` to `new_params`.

    The first update starts from `start_params` (the weights the run started this step with),
    so a fine-tuned run averages its loaded weights, not the random init of `create_train_state`.
    """
    previous = jax.tree.map(lambda a, s: jnp.where(averaged["count"] > 0, a, s),
                            averaged["params"], start_params)
    return {"params": blend(previous, new_params, ema_decay_at(step, tau)),
            "count": averaged["count"] + 1}


def fawa_update(averaged: dict, params: Any, worst_robust: float, threshold: float,
                decay: float) -> tuple[dict, bool]:
    """CFA's FAWA after one epoch: (new slot, whether it changed). Host-side, eager."""
    if worst_robust < threshold:
        return averaged, False
    count = int(np.asarray(averaged["count"]))
    new = jax.tree.map(jnp.copy, params) if count == 0 else blend(averaged["params"], params,
                                                                  decay)
    return {"params": new, "count": averaged["count"] + 1}, True


def has_average(state) -> bool:
    """Whether the state holds an average to evaluate (not off, and at least one update)."""
    averaged = state.averaged
    return bool(averaged) and int(np.asarray(jax.device_get(averaged["count"]))) > 0


def evaluation_params(state) -> Any:
    """The weights a run evaluates, selects and reports: the average when one exists."""
    return state.averaged["params"] if has_average(state) else state.params


def evaluation_variables(state) -> dict:
    """Model variables to evaluate: `evaluation_params` with the online BN statistics."""
    return {"params": evaluation_params(state), "batch_stats": state.batch_stats}


def weights_tag(state) -> str:
    """Names the evaluated weights for caches: "online" or "average<count>"."""
    if not has_average(state):
        return "online"
    return f"average{int(np.asarray(jax.device_get(state.averaged['count'])))}"


def fawa_epoch_end(state, train_config, worst_robust: float) -> tuple[Any, dict]:
    """FAWA's end-of-epoch rule on a TrainState; also the record logged for the epoch."""
    averaged, updated = fawa_update(state.averaged, state.params, worst_robust,
                                    float(train_config.fawa_threshold),
                                    float(train_config.fawa_decay))
    record = {"mode": FAWA, "worst_robust_online": float(worst_robust), "updated": updated,
              "count": int(np.asarray(jax.device_get(averaged["count"])))}
    return state.replace(averaged=averaged), record


def averaging_record(state) -> dict:
    """The averaging slot's summary for an epoch record (EMA: updates so far)."""
    if not state.averaged:
        return {}
    return {"count": int(np.asarray(jax.device_get(state.averaged["count"])))}
