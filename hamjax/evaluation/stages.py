"""The per-chunk functions every evaluation runs through the driver, and attack chains.

`clean_fn` classifies a chunk (plus AutoAttack's gradient-masking checks); `attack_fn` attacks
it with per-example keys and judges the output (re-evaluated, inside the eps ball and [0, 1]).
`run_chain` runs attacks in order, each only on the examples still robust: an example is
robust only if it is correct clean and no attack of the chain fooled it. The trainer's PGD,
the CLI's attacks and AutoAttack are all chains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks.autoattack_ensemble import Bound
from hamjax.attacks.checks import judge, probability_rows, zero_gradients
from hamjax.attacks.rng import example_keys
from hamjax.data.augment import images_to_float
from hamjax.evaluation.driver import ChunkFn, ChunkReport, Driver, StageRecord
from hamjax.models import make_logits_fn

ROBUST_DEFINITION = "correct clean and after every attack (RobustBench's convention)"
LogitsFn = Callable[[jax.Array], jax.Array]
# params -> logits_fn: what a chunk function evaluates (a model's variables, or nothing)
LogitsOf = Callable[[Any], LogitsFn]


def model_logits(model: Any) -> LogitsOf:
    """Flax variables -> the model's logits in eval mode (running BN statistics)."""
    return lambda variables: make_logits_fn(model, variables, "eval")


def fixed_logits(logits_fn: LogitsFn) -> LogitsOf:
    """A given logits_fn (its parameters closed over): the chunk function's params are unused."""
    return lambda params: logits_fn


def clean_fn(logits_of: LogitsOf, checks: bool = True) -> ChunkFn:
    """Chunk function: "correct" per example, and with `checks` "zero_grad" and
    "probabilities" per example (AutoAttack's gradient-masking checks)."""

    def clean(params, batch, key):
        del key
        logits_fn = logits_of(params)
        x, y = images_to_float(batch["image"]), batch["label"]
        logits = logits_fn(x)
        out = {"correct": jnp.argmax(logits, axis=-1) == y}
        if checks:
            out["zero_grad"] = zero_gradients(logits_fn, x, y)
            out["probabilities"] = probability_rows(logits)
        return out

    return clean


def clean_checks(clean: StageRecord) -> dict[str, Any]:
    """The numeric checks of a clean pass run with checks: zero-gradient count over the
    clean-correct examples and whether every output row looks like probabilities."""
    correct = clean.output("correct")
    return {"n_zero_grad": int(np.sum(clean.output("zero_grad") & correct)),
            "n_grad_checked": int(np.sum(correct)),
            "probabilities": bool(len(correct)) and bool(np.all(clean.output("probabilities")))}


def attack_fn(logits_of: LogitsOf, attack: Bound, norm: str = "linf",
              keep_points: bool = False) -> ChunkFn:
    """Chunk function: `attack` with each example's key folded from its index, judged:
    "fooled" and "valid" per example (and "x_adv" with keep_points)."""

    def run(params, batch, key):
        logits_fn = logits_of(params)
        x, y, eps = images_to_float(batch["image"]), batch["label"], batch["eps"]
        x_adv = attack(logits_fn, x, y, example_keys(key, batch["index"]), eps)
        fooled, valid = judge(logits_fn, x, y, x_adv, eps, norm)
        out = {"fooled": fooled, "valid": valid}
        if keep_points:
            out["x_adv"] = x_adv.astype(x.dtype)
        return out

    return run


@dataclasses.dataclass(frozen=True)
class ChainStage:
    """One attack of a chain: its name, chunk function (from `attack_fn`) and settings."""

    name: str
    fn: ChunkFn
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ChainResult:
    """Per-example outcome of a chain (numpy). robust_after[name]: robust up to that attack;
    fooled_by[name]: its own successes among the examples it attacked; invalid[name]: its
    outputs rejected for leaving the threat model; attacked[name]: how many it attacked."""

    robust: np.ndarray
    robust_after: dict[str, np.ndarray]
    fooled_by: dict[str, np.ndarray]
    invalid: dict[str, int]
    attacked: dict[str, int]
    records: dict[str, StageRecord]
    x_adv: np.ndarray | None = None


def stage_key(key: jax.Array, position: int) -> jax.Array:
    """The root key of a chain's attack `position`: adding attacks after it changes nothing."""
    return jax.random.fold_in(key, position)


def run_chain(
    driver: Driver,
    params: Any,
    arrays: Mapping[str, np.ndarray],
    clean_correct: np.ndarray,
    stages: Sequence[ChainStage],
    key: jax.Array,
    *,
    records: Callable[[ChainStage], StageRecord | None] | None = None,
    on_chunk: Callable[[ChunkReport], None] | None = None,
    on_stage: Callable[[ChainStage, ChainResult], None] | None = None,
    progress: bool = False,
    label: str = "",
) -> ChainResult:
    """Runs `stages` in order, each on the examples still robust after the previous ones.

    records(stage): a saved record to resume from (None: start it). progress: a bar per stage,
    labelled `label` and the stage's name ("val pgd10"). With stages built with
    keep_points (float images), `x_adv` holds each example's first successful point, x
    elsewhere.
    """
    robust = np.asarray(clean_correct, bool).copy()
    result = ChainResult(robust, {}, {}, {}, {}, {})
    for position, stage in enumerate(stages):
        population = np.flatnonzero(robust)
        record = driver.run(stage.fn, params, arrays, population, stage_key(key, position),
                            record=records(stage) if records else None, name=stage.name,
                            on_chunk=on_chunk, progress=progress,
                            desc=f"{label} {stage.name}".strip())
        fooled = record.output("fooled") & robust
        if "x_adv" in record.outputs:
            if result.x_adv is None:
                result.x_adv = np.array(arrays["image"], np.float32)  # float images
            result.x_adv[fooled] = record.outputs["x_adv"][fooled]
        robust &= ~fooled
        result.robust_after[stage.name] = robust.copy()
        result.fooled_by[stage.name] = fooled
        result.invalid[stage.name] = int(np.sum(~record.output("valid", True)[population]))
        result.attacked[stage.name] = len(population)
        result.records[stage.name] = record
        if on_stage is not None:
            on_stage(stage, result)
    return result
