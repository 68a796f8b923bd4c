"""A run rebuilt from its config: the step context (model, optimiser, schedule), a fresh state,
fine-tuning weights (`train.init_from`), a branch of another run (`train.branch_from`), and a
saved run restored from its checkpoint.

The trainer, the workdir evaluator (`hamjax.evaluation.workdir`) and the benchmarks all build a
run here, so a checkpoint is read back by the same code that trained it; nothing here trains.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from hamjax.checkpoint import BEST, LAST, Checkpointer
from hamjax.config import (
    base_config,
    config_changes,
    config_to_json,
    describe_changes,
    method_config,
    validate_config,
)
from hamjax.data import DATASET_STATS, Splits, load_splits, num_batches
from hamjax.errors import CheckpointError, ConfigError
from hamjax.methods import available_methods, get_method
from hamjax.models import build_model
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.sharding import place_like, put_replicated
from hamjax.state import StepContext, TrainState, create_train_state


def build_context(config, splits, mesh=None) -> StepContext:
    """Everything static a step needs, from the config, the loaded data and the device mesh
    the step will be jitted over (None: one device)."""
    name = config.data.name
    mean, std = DATASET_STATS.get(name, (None, None))
    model = build_model(config.model, splits.num_classes, splits.image_shape, mean=mean, std=std)
    steps_per_epoch = num_batches(len(splits.train), config.train.batch_size)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is larger than the training "
            f"split ({len(splits.train)} examples); lower it"
        )
    return StepContext(
        model=model,
        tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, steps_per_epoch),
        config=ml_collections.FrozenConfigDict(config),
        num_classes=splits.num_classes,
        class_counts=splits.train.class_counts(splits.num_classes),
        steps_per_epoch=steps_per_epoch,
        image_shape=tuple(splits.image_shape),
        mesh=mesh,
    )


def load_init_weights(state: TrainState, init_from: str, epoch: int = 0) -> TrainState:
    """Fine-tuning: weights and BN statistics from another run's best (else last) checkpoint,
    or (`epoch` N >= 1) its checkpoint at the end of epoch N.

    Only those two are read, so the source may be a run of another method (a PGD-AT warm start
    for CAAT, whose method state has a different shape); the model must be the same."""
    source = Checkpointer(init_from, read_only=True)  # looking creates nothing there
    try:
        if epoch:
            saved = source.restore_host(kind=LAST, step=epoch_end_step(source, init_from, epoch))
        else:
            kind = BEST if source.latest_step(BEST) is not None else LAST
            saved = source.restore_host(kind=kind)
    finally:
        source.close()
    if saved is None:
        raise CheckpointError(
            f"config.train.init_from={init_from!r} holds no checkpoint (looked in "
            f"{init_from}/best and {init_from}/checkpoints); point it at a finished run's workdir"
        )
    try:
        wanted = {"params": state.params, "batch_stats": state.batch_stats}
        got = {"params": saved["params"], "batch_stats": saved.get("batch_stats", {})}
        shapes = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), got, wanted)
        if not all(jax.tree.leaves(shapes)):
            raise ValueError("array shapes differ")
        params = place_like(got["params"], state.params)
        batch_stats = place_like(got["batch_stats"], state.batch_stats)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"config.train.init_from={init_from!r}: its weights do not fit this run's model "
            f"({type(err).__name__}: {err}); fine-tune from a run of the same config.model"
        ) from err
    return state.replace(params=params, batch_stats=batch_stats)


@dataclasses.dataclass
class RestoredRun:
    """A saved run: the config stored with its checkpoint, its data, step context and state."""

    config: ml_collections.ConfigDict
    splits: Splits
    ctx: StepContext
    state: TrainState
    meta: dict[str, Any]


def with_missing_defaults(saved: Mapping[str, Any],
                          log: Callable[[str], None] | None = None) -> ml_collections.ConfigDict:
    """A saved run's config with the fields added to hamjax since it was written (the trainer's
    and its method's) at their defaults, named in a note, so older runs stay evaluable: a new
    field's default keeps the behaviour from before it; the run's own values never change."""
    added: list[str] = []

    def fill(into: dict, defaults: Mapping[str, Any], prefix: str) -> None:
        for key, value in defaults.items():
            if key not in into:
                into[key] = copy.deepcopy(value)
                added.append(prefix + key)
            elif isinstance(value, Mapping) and isinstance(into[key], dict):
                fill(into[key], value, f"{prefix}{key}.")

    tree = copy.deepcopy(dict(saved))
    defaults = base_config()
    name = tree.get("method", {}).get("name")
    if name in available_methods():
        defaults.method = method_config(name)
    fill(tree, config_to_json(defaults), "")
    if added and log is not None:
        log(f"note: the run's config predates {', '.join(added)}; using the defaults")
    return ml_collections.ConfigDict(tree)


def restore_run(checkpointer: Checkpointer, kind: str, step: int | None = None,
                log: Callable[[str], None] | None = None) -> RestoredRun:
    """The run saved in `checkpointer`'s `kind` folder (BEST or LAST) at `step` (None: the
    latest), rebuilt from the config in that checkpoint's metadata (fields added to hamjax
    since at their defaults, noted through `log`): same data split, model and method state, so
    nothing has to be passed twice."""
    meta = checkpointer.read_meta(kind, step) or {}
    where = f"{checkpointer.workdir}/{kind}" + ("" if step is None else f"/{step}")
    if "config" not in meta:
        raise CheckpointError(f"{where} has no config in its metadata; it was not written by "
                              "hamjax.train")
    config = with_missing_defaults(meta["config"], log)
    validate_config(config)
    splits = load_splits(config.data, seed=config.seed)
    ctx = build_context(config, splits)
    like = create_train_state(ctx, get_method(config.method.name), config.seed)
    restored = checkpointer.restore(like, kind=kind, step=step)
    if restored is None:
        raise CheckpointError(f"{where}: no checkpoint to restore")
    state, meta = restored
    return RestoredRun(config, splits, ctx, state, meta)


# What a branch may change from the run it branches from: the method, and where it branched.
BRANCH_MAY_DIFFER = ("method.", "train.branch_from", "train.branch_epoch")


@dataclasses.dataclass
class Branch:
    """Another run's state at the end of an epoch, with this run's (fresh) method state; its
    run metadata (epoch records, selection so far); and its validation-selected checkpoint up
    to then, as (state, meta), or None if it had selected none."""

    state: TrainState
    meta: dict[str, Any]
    best: tuple[TrainState, dict[str, Any]] | None


def branch_differences(source_config: Mapping[str, Any], config: Mapping[str, Any]
                       ) -> list[dict]:
    """The fields other than the method's (and the branch's own) where two JSON configs differ:
    up to the branch point the branch must be the run it copies, so data, model, optimiser,
    schedule, attack, evaluation and seed must agree."""
    return [c for c in config_changes(source_config, config)
            if not c["field"].startswith(BRANCH_MAY_DIFFER)]


def epoch_end_step(source: Checkpointer, where: str, epoch: int,
                   field: str = "init_from") -> int:
    """The step of `source`'s kept checkpoint saved at the end of epoch `epoch`: the one whose
    records hold exactly `epoch` epochs, not saved mid-epoch (read from each checkpoint's
    metadata, so the source's batch size and split need not be this run's). `field` is the
    config field that named the source (init_from or branch_from), for the error."""
    ends = {}
    for step in source.steps(LAST):
        meta = source.read_meta(LAST, step) or {}
        if meta.get("partial_epoch") is None and "epochs" in meta:
            ends.setdefault(len(meta["epochs"]), step)  # the earliest: the epoch's end
    if epoch not in ends:
        epoch_field = "branch_epoch" if field == "branch_from" else "init_epoch"
        best_else_last = " (0: its best, else last, checkpoint)" if field == "init_from" else ""
        raise CheckpointError(
            f"config.train.{field}={where!r} keeps no checkpoint at the end of epoch {epoch} "
            f"(it keeps the ends of epochs {sorted(ends)}). Fix: set config.train.{epoch_field} "
            f"to one of those{best_else_last}, or rerun the source with more "
            "config.train.keep_checkpoints so that epoch's checkpoint stays")
    return ends[epoch]


def load_branch(config: ml_collections.ConfigDict, splits: Splits, fresh: TrainState,
                mesh) -> Branch:
    """`config.train.branch_from`'s checkpoint at the end of epoch `config.train.branch_epoch`:
    weights, BN statistics, optimiser, step, RNG and averaged weights, with `fresh`'s method
    state (this run's method), placed on `mesh` like `fresh`.

    A branch is what a run whose first epochs are another method's would have trained (HAM's
    recipe: PGD-AT until the lr drops), without training those epochs twice; its records, ledger
    and wall time include them.
    """
    where, epoch = config.train.branch_from, int(config.train.branch_epoch)
    source = Checkpointer(where, read_only=True)  # looking creates nothing there
    try:
        # Found from the records, so a source of another batch size is refused below for its
        # differing config, not for lacking this run's step count.
        step = epoch_end_step(source, where, epoch, field="branch_from")
        meta = source.read_meta(LAST, step) or {}
        if "config" not in meta:
            raise CheckpointError(f"{where}/{LAST}/{step} has no config in its metadata; it was "
                                  "not written by hamjax.train")
        source_config = with_missing_defaults(meta["config"])
        differences = branch_differences(config_to_json(source_config), config_to_json(config))
        if differences:
            raise ConfigError(
                f"config.train.branch_from={where!r} was trained with another setup; a branch "
                "may change only the method. Differing fields:\n"
                f"{describe_changes(differences)}\nFix: branch from a run of this config (or "
                "set these fields to the source's values)")
        state, meta = _restore_as(source, LAST, step, source_config, splits, fresh, mesh)
        best = None
        if meta.get("best_step") is not None:
            if meta["best_step"] not in source.steps(BEST):
                raise CheckpointError(
                    f"config.train.branch_from={where!r}: its checkpoint selected on validation "
                    f"by epoch {epoch} (step {meta['best_step']}) is no longer kept. Fix: rerun "
                    "the source with more config.train.keep_checkpoints")
            best = _restore_as(source, BEST, meta["best_step"], source_config, splits, fresh,
                               mesh)
    finally:
        source.close()
    meta["branched_from"] = {"workdir": str(where), "epoch": epoch, "step": step,
                             "method": source_config.method.name}
    return Branch(state, meta, best)


def _restore_as(source: Checkpointer, kind: str, step: int, source_config, splits,
                fresh: TrainState, mesh) -> tuple[TrainState, dict]:
    """A source checkpoint restored in the source method's state layout, then given `fresh`'s
    method state; its meta without the source's config."""
    source_method = get_method(source_config.method.name)
    like = create_train_state(build_context(source_config, splits, mesh), source_method,
                              source_config.seed)
    restored = source.restore(put_replicated(like, mesh), kind=kind, step=step)
    if restored is None:  # pragma: no cover - the step was listed a moment ago
        raise CheckpointError(f"{source.workdir}/{kind}/{step}: no checkpoint to restore")
    state, meta = restored
    meta = {k: v for k, v in meta.items() if k != "config"}
    return state.replace(method_state=fresh.method_state), meta
