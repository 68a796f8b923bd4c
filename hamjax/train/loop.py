"""The one generic training loop: data -> jitted step -> validation -> checkpoints -> report.

Methods plug in through the registry (`hamjax.methods`); nothing here knows any method. The run
is assembled by `hamjax.run`, ends early through `hamjax.train.lifecycle` (signals, divergence)
and is reported through `hamjax.train.report`.

A run never loses or poisons its workdir: one run per workdir (`hamjax.workdir_lock`), a
non-finite step stops it before anything of that step is saved, and SIGTERM/SIGINT stop it after
the current step with a checkpoint to resume from. With `train.steps_per_dispatch` > 1 each jitted
call runs several steps (`hamjax.train.dispatch`): all of this then happens at dispatch ends.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from hamjax import workdir_lock
from hamjax.averaging import (
    FAWA,
    averaging_mode,
    averaging_record,
    evaluation_variables,
    fawa_epoch_end,
    weights_tag,
)
from hamjax.checkpoint import BEST, LAST, Checkpointer
from hamjax.config import (
    RESUME_MAY_CHANGE,
    config_changes,
    config_to_json,
    describe_changes,
    holds_checkpoint,
    validate_config,
)
from hamjax.data import iterate_batches, load_splits, meta_batch, stratified_subset
from hamjax.data.prefetch import prefetch
from hamjax.errors import CheckpointError, ConfigError
from hamjax.evaluation.driver import Driver, map_examples
from hamjax.evaluation.pgd import PGDEvaluator
from hamjax.evaluation.selection import selection_evaluator, selection_label
from hamjax.methods import get_method, late_starts
from hamjax.metrics import Ledger, PerClassCounts, format_per_class_table
from hamjax.models import eval_model
from hamjax.paths import resolve
from hamjax.run import build_context, load_branch, load_init_weights
from hamjax.runlog import PER_UPDATE_METRICS, RunLogger
from hamjax.sharding import (
    make_mesh,
    place_like,
    process_rows,
    put_replicated,
    shard_batch,
    stacked_batch_sharding,
)
from hamjax.state import TrainState, create_train_state
from hamjax.train.dispatch import (
    RunAhead,
    add_steps,
    dispatch_spans,
    passes_multiple,
    with_step_axis,
)
from hamjax.train.lifecycle import StopSignals, diverged, first_nonfinite, interrupted
from hamjax.train.report import (
    attack_record,
    epoch_scalars,
    pgd_at_cost,
    report_scalars,
    select_score,
    summarize,
    where_text,
)
from hamjax.train.step import jit_multi_step, jit_train_step, make_multi_step, make_train_step


def _variables(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def epoch_means(metric_sums: dict[str, float], steps: int) -> dict[str, float]:
    """The epoch's mean of each step metric; PER_UPDATE_METRICS averaged over the steps that
    applied an update, so that steps which train nothing do not dilute them."""
    updates = metric_sums.get("update_applied", 0.0)
    means = {k: v / max(steps, 1) for k, v in metric_sums.items()}
    for key in PER_UPDATE_METRICS:
        if key in metric_sums and "update_applied" in metric_sums:
            means[key] = metric_sums[key] / max(updates, 1.0)
    return means


def _fold_sums(epoch_record: dict, sums, steps: int) -> dict:
    """Adds device-side metric sums of `steps` steps into the (JSON-able) epoch record."""
    if sums is None:
        return epoch_record
    totals = dict(epoch_record["metric_sums"])
    for key, value in jax.device_get(sums).items():
        totals[key] = totals.get(key, 0.0) + float(value)
    return dict(epoch_record, metric_sums=totals, steps=epoch_record["steps"] + steps)


class EpochEvaluator:
    """The trainer's evaluation as a method's epoch_end sees it (the method never imports
    evaluation code): call it for (clean, robust) per-class counts on a split (FRL), or
    `map_split` for per-example outputs of the method's own chunk function (WAT's costs)."""

    def __init__(self, counts, map_split):
        self._counts, self.map_split = counts, map_split

    def __call__(self, state: TrainState, split_name: str) -> tuple[PerClassCounts, ...]:
        return self._counts(state, split_name)


class Trainer:
    """Holds a run's pieces; `run()` trains to the end, resuming from the workdir if it can."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 allow_config_change: bool = False, devices: list | None = None):
        """Takes the workdir lock (workdir_lock.acquire_run_lock) before anything reads or writes
        the workdir or loads data, so a second launch on a busy workdir fails at once; `run`
        releases it (a Trainer that never runs leaves a lock the next Trainer of this process,
        or any process once this one has exited, takes over).

        allow_config_change: resume a checkpoint written with another config (launch.py
        --allow_config_change); the differing fields go into the report. devices: the mesh's
        (default: every device; launch.py --mesh_devices).
        """
        # Only looks: a workdir without a checkpoint starts fresh, so its init_from must hold one.
        validate_config(config, fresh_start=not holds_checkpoint(workdir))
        self.config = config
        self.workdir = workdir
        self.allow_config_change = bool(allow_config_change)
        self.devices = devices
        self.is_main = jax.process_index() == 0
        self._lock = workdir_lock.acquire_run_lock(workdir)
        try:
            self._setup(config, workdir)
        except BaseException:
            if getattr(self, "log", None) is not None:
                self.log.close()
            workdir_lock.release(self._lock)
            raise

    def _setup(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        """Loads and checks the data before creating anything in the workdir (logs,
        checkpoint folders): a missing or bad dataset leaves the workdir as it was."""
        self.method = get_method(config.method.name)
        self.splits = load_splits(config.data, seed=config.seed)
        if self.method.needs_meta_batch and self.splits.meta is None:
            raise ConfigError(
                f"method {config.method.name!r} needs a meta set: set config.data.meta_per_class "
                "> 0 (CAAT: 300 for CIFAR-10)"
            )
        self.val = self.splits.val if self.splits.val is not None else None
        self.mesh = make_mesh(self.devices)
        self.ctx = build_context(config, self.splits, self.mesh)
        n_dev = self.mesh.devices.size
        for field in ("train", "eval"):
            if config[field].batch_size % n_dev:
                raise ConfigError(
                    f"config.{field}.batch_size={config[field].batch_size} must be divisible by "
                    f"the {n_dev} devices of the mesh (it is the global batch of all hosts)"
                )
        self.rows = process_rows(self.mesh, config.train.batch_size)  # this host's share
        self.checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints)
        self.log = RunLogger(workdir, enabled=self.is_main)
        train_step = make_train_step(self.ctx, self.method)
        self.per_dispatch = int(config.train.steps_per_dispatch)
        # One step per call: the step itself; k: a scan of it over k stacked batches.
        self.train_step = (jit_train_step(with_step_axis(train_step), self.mesh)
                           if self.per_dispatch == 1 else
                           jit_multi_step(make_multi_step(train_step), self.mesh))
        self.evaluator = PGDEvaluator(eval_model(self.ctx.model, config.eval.dtype),
                                      self.splits.num_classes, config.eval,
                                      self.mesh, config.eval.batch_size)
        self.select_evaluator = selection_evaluator(
            self.evaluator, eval_model(self.ctx.model, config.eval.dtype),
            self.splits.num_classes, config.eval, self.mesh)
        self._eval_cache: dict = {}
        self._map_driver: Driver | None = None
        self.signals = StopSignals()  # a SIGTERM/SIGINT during `run`, agreed by all processes

    # ----------------------------------------------------------------------------- state
    def initial_state(self) -> tuple[TrainState, dict]:
        """A fresh state, the latest checkpoint's, or fine-tuning weights; plus run metadata."""
        # From host arrays onto every device of every process (not a device_put of a
        # single-device array onto a cross-process sharding, which orbax cannot save).
        state = put_replicated(create_train_state(self.ctx, self.method, self.config.seed),
                               self.mesh)
        saved_meta = self.checkpointer.read_meta()  # the config first: cheap, and clearer
        changes = [] if saved_meta is None else self._check_compatible(saved_meta)
        restored = self.checkpointer.restore(state)
        if restored is not None:
            state, meta = restored
            self.log.print(f"resumed from {self.workdir} at step {int(state.step)}")
            if changes:
                self.log.print("resumed with a changed config (--allow_config_change):\n"
                               + describe_changes(changes))
                meta["config_changed_on_resume"] = meta.get("config_changed_on_resume", []) + [
                    dict(change, step=int(state.step)) for change in changes]
            return state, meta
        if self.config.train.branch_from:
            return self._branch(state)
        if self.config.train.init_from:
            init_from, init_epoch = self.config.train.init_from, int(self.config.train.init_epoch)
            state = load_init_weights(state, init_from, init_epoch)
            self.log.print(f"fine-tuning the weights of {init_from} ("
                           + (f"the end of its epoch {init_epoch})" if init_epoch else
                              "its selected, else last, checkpoint)"))
            if self.method.epoch_end is not None:
                # FRL/CAAT scripts refit their class multipliers before every epoch, the first
                # included, from the hot-start model; from scratch that refit would read noise.
                state = self.method.epoch_end(state, self.ctx, self.epoch_evaluator())
        return state, {"best_score": None, "best_step": None, "epochs": []}

    def _branch(self, fresh: TrainState) -> tuple[TrainState, dict]:
        """The state and records of `train.branch_from` at the end of `train.branch_epoch`
        (hamjax.run.load_branch), saved here at once with its selected checkpoint so far: from
        then on this workdir resumes by itself."""
        branch = load_branch(self.config, self.splits, fresh, self.mesh)
        config = config_to_json(self.config)
        if branch.best is not None:
            best_state, best_meta = branch.best
            self.checkpointer.save(int(best_state.step), best_state,
                                   dict(best_meta, config=config), kind=BEST)
        self._save(branch.state, branch.meta)
        source = branch.meta["branched_from"]
        self.log.print(f"branched from {source['workdir']} ({source['method']}) at the end of "
                       f"epoch {source['epoch']} (step {source['step']})")
        self.log.write("branch", int(branch.state.step), workdir=source["workdir"],
                       epoch=source["epoch"], method=source["method"])
        return branch.state, branch.meta

    def _check_compatible(self, meta: dict) -> list[dict]:
        """The fields (outside RESUME_MAY_CHANGE) where the checkpoint's config differs from
        this run's; any such difference is refused unless allow_config_change, since the
        resumed weights and the report would belong to neither config."""
        if "config" not in meta:  # not written by this trainer: nothing to compare
            return []
        changes = config_changes(meta["config"], config_to_json(self.config))
        if changes and not self.allow_config_change:
            raise CheckpointError(
                f"the checkpoint in {resolve(self.workdir) / LAST} was written with another "
                "config; resuming it would report one experiment as another. Differing fields:\n"
                f"{describe_changes(changes)}\n"
                "Fix: use a new --workdir for the new config, or rerun with the checkpoint's "
                "values; to resume anyway pass --allow_config_change (Trainer(..., "
                "allow_config_change=True)): report.json then lists the changes under "
                "config_changed_on_resume. Fields that may always differ: "
                f"{', '.join(RESUME_MAY_CHANGE)}")
        return changes

    # ----------------------------------------------------------------------------- eval
    def _eval_split(self, split_name: str):
        """The examples evaluation runs on: the split, subset to config.eval.num_examples."""
        split = {"val": self.val, "meta": self.splits.meta, "test": self.splits.test}[split_name]
        if split is None:
            raise ConfigError(f"split {split_name!r} is empty (config.data.val_size / "
                              "meta_per_class is 0)")
        return stratified_subset(split, self.config.eval.num_examples, self.config.seed,
                                 self.splits.num_classes)

    def evaluate(self, state: TrainState, split_name: str, averaged: bool = False,
                 evaluator: PGDEvaluator | None = None) -> tuple[PerClassCounts, ...]:
        """(clean, robust) per-class counts on a split under `evaluator` (default: PGD-N);
        cached per (step, split, weights, attack). Methods' epoch_end see the online weights;
        validation and reports the averaged ones (`averaged=True`; the online weights when the
        run averages nothing)."""
        evaluator = evaluator or self.evaluator
        variables = evaluation_variables(state) if averaged else _variables(state)
        key = (int(state.step), split_name, weights_tag(state) if averaged else "online",
               evaluator.name)
        if key not in self._eval_cache:
            split = self._eval_split(split_name)
            rng = evaluator.attack_key(self.config.seed)  # the CLI's pgdN key for PGD
            kept = {k: v for k, v in self._eval_cache.items() if k[0] == key[0]}
            self._eval_cache = {**kept, key: evaluator(variables, split, rng,
                                                       progress=self.is_main,
                                                       label=split_name)}
        return self._eval_cache[key]

    def map_split(self, state: TrainState, split_name: str, fn, key: jax.Array
                  ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(per-example outputs of the chunk function `fn(variables, batch, key)` over the
        evaluation examples of a split, their labels), sharded, padded and unpadded by the
        evaluation driver (each example counted once on any mesh). Keep `fn` to reuse its
        compilation."""
        split = self._eval_split(split_name)
        labels = np.asarray(split.labels, np.int32)
        if self._map_driver is None:
            self._map_driver = Driver(self.mesh, int(self.config.eval.batch_size))
        return map_examples(self._map_driver, fn, _variables(state), split.images, labels,
                            key), labels

    def epoch_evaluator(self) -> EpochEvaluator:
        """What a method's epoch_end gets: `evaluator(state, split)` per-class counts, and
        `evaluator.map_split(state, split, fn, key)` for its own per-example pass."""
        return EpochEvaluator(self.evaluate, self.map_split)

    # ----------------------------------------------------------------------------- train
    def _host_batches(self, epoch: int, start: int):
        """This epoch's batches from step `start` on, as this host's rows of the training batch
        (and of CAAT's meta batch) in host memory."""
        cfg = self.config
        batches = iterate_batches(self.splits.train, cfg.train.batch_size, cfg.seed, epoch, start,
                                  rows=self.rows)
        for i, batch in enumerate(batches, start=start):
            if self.method.needs_meta_batch:
                step = epoch * self.ctx.steps_per_epoch + i
                batch.update(meta_batch(self.splits.meta, cfg.train.batch_size, cfg.seed, step,
                                        rows=self.rows))
            yield batch

    def _device_batches(self, epoch: int, start: int):
        """This epoch's global batches from step `start` on, as sharded device arrays."""
        for batch in self._host_batches(epoch, start):
            yield shard_batch(batch, self.mesh)

    def _dispatches(self, epoch: int, start: int):
        """(first, end, batch) per dispatch of this epoch from step `start` on
        (`dispatch_spans`): one step's batch, or with config.train.steps_per_dispatch > 1 the
        end - first batches stacked on a new leading axis, each split over the devices."""
        spans = dispatch_spans(start, self.ctx.steps_per_epoch, self.per_dispatch)
        if self.per_dispatch == 1:
            for (first, end), batch in zip(spans, self._device_batches(epoch, start),
                                           strict=True):
                yield first, end, batch
            return
        batches = self._host_batches(epoch, start)
        for first, end in spans:
            group = [next(batches) for _ in range(end - first)]
            stacked = {key: np.stack([batch[key] for batch in group]) for key in group[0]}
            yield first, end, shard_batch(stacked, self.mesh, stacked=True)

    def _compile(self, state: TrainState, sample: dict, epoch: int, start: int) -> dict:
        """The compiled train step per dispatch length this run needs from (epoch, start): one
        unless the epoch's steps are not a multiple of config.train.steps_per_dispatch or a
        resume starts off a boundary. Lowered from `sample`'s (one step's batch) shapes."""
        spe = self.ctx.steps_per_epoch
        spans = dispatch_spans(start, spe, self.per_dispatch)
        if epoch + 1 < self.config.train.epochs:
            spans += dispatch_spans(0, spe, self.per_dispatch)
        if self.per_dispatch == 1:
            return {1: self.train_step.lower(state, sample).compile()}
        sharding = stacked_batch_sharding(self.mesh)
        programs = {}
        for length in sorted({end - first for first, end in spans}):
            shapes = {key: jax.ShapeDtypeStruct((length, *value.shape), value.dtype,
                                                sharding=sharding)
                      for key, value in sample.items()}
            programs[length] = self.train_step.lower(state, shapes).compile()
        return programs

    def _save(self, state: TrainState, meta: dict) -> None:
        meta = dict(meta, config=config_to_json(self.config))
        self.checkpointer.save(int(state.step), state, meta)

    def run(self) -> dict:
        """Trains to config.train.epochs and returns the final report (also written as JSON).

        Holds the workdir lock throughout and releases it on the way out, errors included.
        While training, SIGTERM/SIGINT stop the run after the current dispatch (one step by
        default) with a checkpoint (TrainingInterrupted); a non-finite step raises
        TrainingDivergedError. Pending checkpoint writes finish before run returns or raises.
        """
        if self._lock is None and self.is_main:  # a second run() of this Trainer
            self._lock = workdir_lock.acquire(self.workdir)
        try:
            try:
                with self.signals.catching():
                    state, meta = self._train()
                report = self.final_report(state, meta)
            except BaseException:
                self._close(quietly=True)
                raise
            self._close()
        finally:  # after the last checkpoint write: the lock covers it
            workdir_lock.release(self._lock)
            self._lock = None
        return report

    def _close(self, quietly: bool = False) -> None:
        """Finishes checkpoint writes and closes the logs; `quietly` while another error is
        on its way out (it must not be masked by a second one)."""
        try:
            self.checkpointer.close()
        except Exception:
            if not quietly:
                raise
        finally:
            self.log.close()

    def _stop(self, state: TrainState) -> None:
        """Ends an interrupted run once its state is saved."""
        saved = self.checkpointer.latest_step()  # waits for the write
        self.log.write("interrupted", int(state.step), signal=self.signals.name())
        raise interrupted(self.signals, int(state.step), saved,
                          resolve(self.workdir) / "checkpoints")

    def _check_finite(self, pending: list) -> None:
        """Raises TrainingDivergedError on the first non-finite step in `pending` (then
        emptied). Called before every save, so no checkpoint ever holds a diverged state."""
        bad = first_nonfinite(pending) if pending else None
        pending.clear()
        if bad is None:
            return
        step, loss = bad
        self.log.write("diverged", step, loss=loss)
        raise diverged(step, loss, self.config.train.lr, self.checkpointer.latest_step(),
                       resolve(self.workdir) / "checkpoints")

    def _train(self) -> tuple[TrainState, dict]:
        """The training part of `run`: compile, then epochs until config.train.epochs."""
        cfg = self.config
        state, meta = self.initial_state()
        spe = self.ctx.steps_per_epoch
        total_steps = cfg.train.epochs * spe
        self.log.write("run", int(state.step), config=config_to_json(cfg),
                       data=self.splits.info, devices=[str(d) for d in jax.devices()],
                       **attack_record(cfg))
        sample = next(self._device_batches(0, 0))
        t0 = time.perf_counter()
        programs = self._compile(state, sample,
                                 *divmod(min(int(state.step), total_steps - 1), spe))
        meta.setdefault("compile_seconds", []).append(time.perf_counter() - t0)
        per_call = ("" if self.per_dispatch == 1 else
                    f", {self.per_dispatch} steps per dispatch "
                    f"({len(programs)} program{'s' * (len(programs) > 1)})")
        self.log.print(f"compiled the train step in {meta['compile_seconds'][-1]:.1f}s; "
                       f"{spe} steps/epoch, {jax.device_count()} device(s){per_call}")
        for line in late_starts(self.method, cfg):
            self.log.print(f"note: {line}")

        while int(state.step) < total_steps:
            if self.signals.should_stop():  # the state here is already saved
                self._stop(state)
            epoch, start = divmod(int(state.step), spe)
            state, meta = self._train_epoch(programs, state, meta, epoch, start)
        if self.signals.should_stop():
            self._stop(state)
        return state, meta

    def _train_epoch(self, programs: dict, state, meta, epoch: int, start: int):
        """One epoch from step `start`, a dispatch at a time (`programs`: the compiled step per
        dispatch length); logs, finite checks, signals and periodic saves at dispatch ends."""
        cfg, spe = self.config, self.ctx.steps_per_epoch
        epoch_record = meta.pop("partial_epoch", None) or {"seconds": 0.0, "skipped": 0.0,
                                                           "metric_sums": {}, "steps": 0}
        t_last, images, sums, counted_from = time.perf_counter(), 0, None, start
        # (first step, finite flags, losses) per dispatch on device, checked at logs and saves
        pending = []
        dispatches = prefetch(self._dispatches(epoch, start), size=2)
        # Moved every step without a device sync; its values change at the log interval only.
        # Left open by a stop or an error, it is closed with the logs (`_close`).
        bar = self.log.epoch_bar(epoch, cfg.train.epochs, start, spe, cfg.train.batch_size)
        in_flight = RunAhead(depth=1)  # see hamjax.train.dispatch: no unbounded run-ahead
        for first, end, batch in dispatches:
            before, after = epoch * spe + first, epoch * spe + end  # steps done
            state, metrics = programs[end - first](state, batch)  # metrics: (steps, ...)
            in_flight.dispatched(metrics["finite"])
            for _ in range(end - first):
                bar.step()
            pending.append((before + 1, metrics["finite"], metrics["loss"]))
            images += (end - first) * cfg.train.batch_size
            sums = add_steps(sums, metrics)
            last_in_epoch = end == spe
            logged = passes_multiple(before, after, cfg.train.log_every_steps)
            if logged or last_in_epoch:
                last = {k: np.asarray(v[-1]) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                epoch_record["seconds"] += now - t_last
                rate = images / max(now - t_last, 1e-9)
                t_last, images = now, 0
                bar.log(end, rate, last)
                self.log.write("train", after, epoch=epoch, images_per_s=rate, **last)
                self._check_finite(pending)
            # A signal is served like a periodic save: the partial-epoch record makes the resumed
            # epoch's ledger and metrics exactly those of an uninterrupted one. Several processes
            # agree on it at log and checkpoint steps only (a collective); the epoch's end is
            # served by `_train`.
            periodic = (passes_multiple(before, after, cfg.train.checkpoint_every_steps)
                        and not last_in_epoch)
            asked = jax.process_count() == 1 or periodic or logged
            stopping = not last_in_epoch and asked and self.signals.should_stop()
            if periodic or stopping:
                self._check_finite(pending)
                epoch_record = _fold_sums(epoch_record, sums, end - counted_from)
                sums, counted_from = None, end
                jax.block_until_ready(state)
                now = time.perf_counter()
                epoch_record["seconds"] += now - t_last
                t_last = now
                self._save(state, dict(meta, partial_epoch=epoch_record))
                t_last = time.perf_counter()
            if stopping:
                self._stop(state)
        jax.block_until_ready(state)
        bar.close()
        self._check_finite(pending)
        epoch_record = _fold_sums(epoch_record, sums, spe - counted_from)
        return self._end_epoch(state, meta, epoch, epoch_record)

    def _end_epoch(self, state, meta, epoch, epoch_record):
        cfg = self.config
        t_end = time.perf_counter()
        # The state's ledger holds this epoch's passes only and is zeroed here, so its float32
        # counts stay exact integers (< 2**24 per epoch) however long the run; totals are summed
        # on the host in float64 from the per-epoch records.
        ledger = jax.device_get(state.ledger)
        state = state.replace(ledger=put_replicated(Ledger.zeros(), self.mesh))
        examples = self.ctx.steps_per_epoch * cfg.train.batch_size
        cost = {"forward": float(ledger.forward), "backward": float(ledger.backward)}
        cost["relative_to_pgd_at"] = (cost["forward"] + cost["backward"]) / pgd_at_cost(
            cfg, examples)
        record = {"epoch": epoch + 1, "train_seconds": epoch_record["seconds"], "ledger": cost}
        record["train_metrics"] = epoch_means(epoch_record["metric_sums"], epoch_record["steps"])
        if self.method.summarize_state is not None:  # before epoch_end rolls the state over
            record["method"] = self.method.summarize_state(jax.device_get(state.method_state))
        if self.method.epoch_end is not None:
            state = self.method.epoch_end(state, self.ctx, self.epoch_evaluator())
        state, averaging = self._average_epoch(state)
        if averaging:
            record["averaging"] = averaging
        if self.val is not None and (epoch + 1) % cfg.train.eval_every_epochs == 0:
            summary = summarize(*self.evaluate(state, "val", averaged=True,
                                               evaluator=self.select_evaluator),
                                self.splits.class_names)
            summary["attack"] = self.select_evaluator.name  # which attack the robust numbers are
            record["val"] = summary
            score = select_score(summary, cfg.eval.select_on)
            if meta["best_score"] is None or score > meta["best_score"]:
                meta.update(best_score=score, best_step=int(state.step), best_epoch=epoch + 1)
                self.checkpointer.save(int(state.step), state,
                                       dict(meta, config=config_to_json(cfg)), kind=BEST)
            self.log.print(
                f"epoch {epoch + 1}: val clean {summary['clean']['average']:.4f} "
                f"(worst {summary['clean']['worst']:.4f}), "
                f"{selection_label(cfg.eval)} {summary['robust']['average']:.4f} "
                f"(worst {summary['robust']['worst']:.4f}); "
                f"cost {cost['relative_to_pgd_at']:.3f}x PGD-AT; {record['train_seconds']:.1f}s")
        record["epoch_seconds"] = record["train_seconds"] + time.perf_counter() - t_end
        meta["epochs"] = meta["epochs"] + [record]
        self.log.write("epoch", int(state.step), **record)
        self.log.scalars(int(state.step), epoch_scalars(record))
        self._save(state, meta)
        return state, meta

    def _average_epoch(self, state: TrainState) -> tuple[TrainState, dict]:
        """FAWA's end-of-epoch rule (on the online model's validation worst class) and the
        averaging record of the epoch ({} when the run averages nothing)."""
        if averaging_mode(self.config.train) != FAWA:
            return state, averaging_record(state)
        online = summarize(*self.evaluate(state, "val"), self.splits.class_names)
        new, record = fawa_epoch_end(state, self.config.train, online["robust"]["worst"])
        record["val_online"] = {f"{kind}_{stat}": float(online[kind][stat])
                                for kind in ("clean", "robust") for stat in ("average", "worst")}
        return state.replace(averaged=place_like(new.averaged, state.averaged)), record

    # ----------------------------------------------------------------------------- report
    def final_report(self, state, meta) -> dict:
        """Test-set numbers for the last and the validation-selected checkpoint; never selects
        on the test set."""
        cfg = self.config
        results = {"last": self._test_results(state)}
        if meta.get("best_step") is not None:
            restored = self.checkpointer.restore(state, kind=BEST)
            if restored is not None:
                results["best_on_val"] = self._test_results(restored[0])
                results["best_on_val"]["epoch"] = meta.get("best_epoch")
        epochs = meta["epochs"]
        total_passes = sum(e["ledger"]["forward"] + e["ledger"]["backward"] for e in epochs)
        examples = len(epochs) * self.ctx.steps_per_epoch * cfg.train.batch_size
        report = {
            "config": config_to_json(cfg),
            "seed": cfg.seed,
            "data": self.splits.info,
            **attack_record(cfg),
            "robust_definition": self.evaluator.robust_definition,
            "results": results,
            "cost": {
                "forward_passes": sum(e["ledger"]["forward"] for e in epochs),
                "backward_passes": sum(e["ledger"]["backward"] for e in epochs),
                "relative_to_pgd_at": total_passes / max(pgd_at_cost(cfg, examples), 1.0),
                "train_seconds_excluding_compile": sum(e["train_seconds"] for e in epochs),
                "compile_seconds": meta.get("compile_seconds", []),
            },
            "epochs": epochs,
            "config_changed_on_resume": meta.get("config_changed_on_resume", []),
        }
        if "branched_from" in meta:
            report["branched_from"] = meta["branched_from"]
        if self.is_main:
            (resolve(self.workdir) / "report.json").write_text(json.dumps(report, indent=1))
            for name, res in results.items():
                self.log.print(f"\n{name} checkpoint, test split ({res['num_examples']} examples,"
                               f" PGD-{cfg.eval.steps} eps {cfg.eval.eps:.4f}):")
                self.log.print(res["table"])
            self.log.print(f"cost: {report['cost']['relative_to_pgd_at']:.3f}x PGD-AT example "
                           f"passes; {report['cost']['train_seconds_excluding_compile']:.1f}s "
                           "training time excluding compilation")
            self.log.scalars(int(state.step), report_scalars(results))
            best = None
            if "best_on_val" in results:
                best = (meta["best_step"], meta.get("best_epoch"))
            self.log.print(where_text(resolve(self.workdir), best, self.log.metrics_path,
                                      self.log.tensorboard_logdir))
        return report

    def _test_results(self, state) -> dict[str, Any]:
        split = stratified_subset(self.splits.test, self.config.eval.num_examples, self.config.seed,
                       self.splits.num_classes)
        clean, robust = self.evaluator(evaluation_variables(state), split,
                                       self.evaluator.attack_key(self.config.seed),
                                       progress=self.is_main, label="test")
        names = self.splits.class_names
        table = format_per_class_table(
            {"clean": clean, f"pgd{self.config.eval.steps}": robust}, names)
        res = summarize(clean, robust, names)
        res.update(step=int(state.step), num_examples=len(split), table=table)
        if self.splits.train.noise_rate > 0:
            res["note"] = "test labels are clean; training labels were noised"
        return res


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False, devices: list | None = None) -> dict:
    """Trains (or resumes) a run in `workdir` and returns its final report; allow_config_change,
    devices: see `Trainer`."""
    return Trainer(config, workdir, allow_config_change, devices).run()
