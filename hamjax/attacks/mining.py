"""HAM's hard-example mining on any `logits_fn`, for notebooks and for the HAM method itself.

`mine_hard` runs PGD steps 1..M and one forward pass at x_M: the hard set is the rows still
misclassified there. `ham_mine` then continues only the hard rows for steps M+1..K (the easy
rows stay at x_M), with the whole batch in one masked call: the HAM training step gets the same
examples at lower cost by packing the hard rows into buckets (`hamjax.methods.ham`), which with
BatchNorm in eval mode (the default `attack.bn_mode`) is the same computation.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from hamjax.attacks.pgd_attack import PGDInfo, pgd

Array = jax.Array


@flax.struct.dataclass
class MiningResult:
    """x_mined: the batch after M steps. hard: misclassified at x_mined. mining_loss: per-row CE
    at x_mined (HAM's least-confident ranking). x_adv: hard rows after K steps, easy rows at
    x_mined. kappa: correctly classified iterates over the steps each row ran (GAIRAT)."""

    x_mined: Array
    hard: Array
    mining_loss: Array
    x_adv: Array
    kappa: Array


def mine_hard(
    logits_fn, x: Array, y: Array, key: Array, *, eps, step_size, mining_step: int,
    random_start: bool = True, x_init: Array | None = None,
) -> tuple[Array, Array, PGDInfo]:
    """(x_M, hard set, PGD info at x_M): M L_inf PGD steps (from a random start, or continuing
    from `x_init`) and the mining forward pass."""
    x_mined, info = pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=mining_step,
                        random_start=random_start, x_init=x_init, final_eval=True)
    return x_mined, info.success, info


def ham_mine(
    logits_fn, x: Array, y: Array, key: Array, *, eps, step_size, steps: int, mining_step: int,
    random_start: bool = True, x_init: Array | None = None,
) -> MiningResult:
    """HAM's attack on a batch: the hard set after `mining_step` of `steps` PGD steps and the
    continued attack of the hard rows; jittable (shapes static, the hard set a mask)."""
    if not 1 <= mining_step < steps:
        raise ValueError(f"mining_step={mining_step} needs 1 <= mining_step < steps={steps}")
    x_mined, hard, info = mine_hard(logits_fn, x, y, key, eps=eps, step_size=step_size,
                                    mining_step=mining_step, random_start=random_start,
                                    x_init=x_init)
    x_adv, rest = pgd(logits_fn, x, y, key, eps=eps, step_size=step_size,
                      steps=steps - mining_step, x_init=x_mined, step_mask=hard,
                      final_eval=False)
    kappa = info.kappa + jnp.where(hard, rest.kappa, 0)
    return MiningResult(x_mined=x_mined, hard=hard, mining_loss=info.loss, x_adv=x_adv,
                        kappa=kappa)
