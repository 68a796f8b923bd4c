"""A trained workdir: rebuild the run from its checkpoint (`load_run`) and evaluate it.

The run's own config is read back from the checkpoint metadata, so the same data split and
model are rebuilt; nothing has to be passed twice. Checkpoints are found and read by
`hamjax.checkpoint.Checkpointer` (read-only: looking never creates anything).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from hamjax.averaging import evaluation_variables
from hamjax.checkpoint import BEST, LAST, Checkpointer
from hamjax.data import stratified_subset
from hamjax.errors import CheckpointError, ConfigError
from hamjax.evaluation.driver import console
from hamjax.evaluation.inflation import (
    DEFAULT_THRESHOLD,
    chart_margins,
    check_threshold,
    inflation_report,
    pairs,
)
from hamjax.evaluation.report import build_result, chart_title, write_outputs
from hamjax.evaluation.runner import run_attacks
from hamjax.evaluation.specs import check_attack_names, parse_attacks
from hamjax.models import eval_model
from hamjax.paths import resolve
from hamjax.run import restore_run

Log = Callable[[str], None]

CHECKPOINTS = {"best": BEST, "last": LAST}
SPLITS = ("test", "val")


@dataclasses.dataclass
class LoadedRun:
    """A trained run rebuilt from its workdir: config, data splits, model and weights."""

    config: ml_collections.ConfigDict
    splits: Any
    model: Any  # computing in config.eval.dtype, as the trainer's evaluation
    variables: dict
    checkpoint: str  # "best" | "last": what was loaded
    step: int
    epoch: int | None
    meta: dict
    workdir: str


def _find(checkpointer: Checkpointer, workdir: str, checkpoint: str,
          log: Log) -> tuple[str, int]:
    """(checkpoint name, step) to load: "best" falls back to the last checkpoint, with a note."""
    step = checkpointer.latest_step(CHECKPOINTS[checkpoint])
    if step is None and checkpoint == "best":
        step = checkpointer.latest_step(LAST)
        if step is not None:
            log(f"note: {workdir}/{BEST} holds no checkpoint (no validation split, or no epoch "
                "finished yet); evaluating the last checkpoint instead")
            checkpoint = "last"
    if step is None:
        looked = [os.path.join(workdir, CHECKPOINTS[checkpoint])]
        if checkpoint == "best":
            looked.append(os.path.join(workdir, LAST))
        raise CheckpointError(f"no checkpoint found: looked for <step>/ directories in "
                              f"{' and '.join(looked)}; is --workdir a training run's workdir "
                              "(launch.py --workdir)?")
    return checkpoint, step


def load_run(workdir: str, checkpoint: str = "best", log: Log = print) -> LoadedRun:
    """Rebuilds a run from `workdir`: the best-on-validation checkpoint (or the last one when
    there is no best, with a printed note), the config stored with it, its data and model."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint!r}: choose one of {sorted(CHECKPOINTS)}")
    workdir = str(resolve(workdir))  # gs:// kept verbatim (abspath would mangle it)
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        checkpoint, step = _find(checkpointer, workdir, checkpoint, log)
        kind = CHECKPOINTS[checkpoint]
        run = restore_run(checkpointer, kind, step, log)
    finally:
        checkpointer.close()
    meta, state = run.meta, run.state
    epoch = meta.get("best_epoch") if kind == BEST else len(meta.get("epochs", [])) or None
    variables = evaluation_variables(state)  # the averaged weights when the run averaged
    return LoadedRun(run.config, run.splits, eval_model(run.ctx.model, run.config.eval.dtype),
                     variables, checkpoint, int(state.step), epoch, meta, workdir)


def default_step_size(config: ml_collections.ConfigDict, eps: float) -> float:
    """The run's own PGD step at `eps`: config.eval.step_size scaled by eps / config.eval.eps,
    so `--attacks pgdN` repeats the trainer's PGD-N by default (eps/4 for a 0 eps config)."""
    if float(config.eval.eps) <= 0:
        return eps / 4.0
    return float(config.eval.step_size) * eps / float(config.eval.eps)


NAME = re.compile(r"^[A-Za-z0-9_-]*$")


def _check_request(split: str, num_examples: int, name: str = "") -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"name={name!r}: letters, digits, '_' and '-' only (it becomes part "
                          "of the output file names)")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {SPLITS}")
    if num_examples < 0:
        raise ConfigError(f"num_examples={num_examples}: must be >= 0 (0: the whole split)")


def _check_numbers(eps: float, batch_size: int) -> None:
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"eps={eps}: must be in [0, 1] pixel units (8/255 = 0.0314)")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")


def evaluate_workdir(
    workdir: str,
    attacks: Sequence[str] | str = ("pgd20", "autoattack"),
    split: str = "test",
    num_examples: int = 0,
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    seed: int | None = None,
    eps: float | None = None,
    step_size: float | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fast: bool = False,
    resume: bool = True,
    write: bool = True,
    log: Log = console,
    inflation_threshold: float = DEFAULT_THRESHOLD,
    name: str = "",
) -> dict[str, Any]:
    """Per-class clean/robust accuracy of a trained workdir under `attacks`; returns the record
    also written to `<workdir>/eval/<split>_<checkpoint>.json` (with a `.png` chart), or to
    `<split>_<checkpoint>_<name>.*` with a `name`, so several evaluations of one checkpoint (say
    PGD-20 on the whole test set beside AutoAttack on a subset) keep their own files.

    Defaults come from the run's config: eps = config.eval.eps, batch_size = eval.batch_size,
    seed = config.seed, step_size (pgdN, cwN; a number or "eps/K") = the run's eval step at
    this eps, so `pgd{config.eval.steps}` gives the counts of the trainer's report. num_examples:
    the trainer's seeded class-stratified subset (0: the whole split). fast: fewer steps/queries
    for smoke tests (recorded; not comparable with published numbers). resume: reuse the
    examples finished by an earlier call with the same settings. Files are named after the
    checkpoint actually evaluated (`<split>_last.*` when "best" fell back to the last one).
    With PGD-N beside AutoAttack or an APGD attack, `result["inflation"]` holds the per-class
    gap (`hamjax.evaluation.inflation`; warned above `inflation_threshold` points) and
    `<stem>_margins.png` the clean logit-margin histograms.
    """
    _check_request(split, num_examples, name)  # before loading anything
    inflation_threshold = check_threshold(inflation_threshold)
    check_attack_names(attacks)
    run = load_run(workdir, checkpoint, log)
    cfg, splits = run.config, run.splits
    eps = float(cfg.eval.eps if eps is None else eps)
    seed = int(cfg.seed if seed is None else seed)
    batch_size = int(batch_size or cfg.eval.batch_size)
    _check_numbers(eps, batch_size)
    n_dev = jax.device_count()
    batch_size = -(-batch_size // n_dev) * n_dev
    step_size = default_step_size(cfg, eps) if step_size is None else step_size
    specs = parse_attacks(attacks, eps=eps, num_classes=splits.num_classes, step_size=step_size,
                          overrides=overrides, fast=fast)
    compared = bool(pairs(specs))
    data = splits.test if split == "test" else splits.val
    if data is None:
        raise ConfigError(f"split {split!r} is empty: the run has data.val_size=0")
    full_size = len(data)
    data = stratified_subset(data, num_examples, seed, splits.num_classes)

    stem = str(resolve(workdir) / "eval" / "_".join(filter(None, (split, run.checkpoint, name))))
    if write:
        resolve(workdir).joinpath("eval").mkdir(parents=True, exist_ok=True)
    log(f"evaluating {resolve(workdir)} ({run.checkpoint} checkpoint, step {run.step}) on "
        f"{split}: {len(data)} examples, eps {eps:.5f}, attacks {', '.join(s.name for s in specs)}"
        f", chunks of {batch_size}, seed {seed}{' [FAST settings]' if fast else ''}")
    fingerprint = {"split": split, "checkpoint": run.checkpoint, "step": run.step,
                   "num_examples": int(num_examples)}
    t0 = time.time()
    outcome = run_attacks(run.model, run.variables, data.images, data.labels, splits.num_classes,
                          specs, eps=eps, seed=seed, batch_size=batch_size,
                          partial_path=stem + ".partial.json" if write else None,
                          fingerprint=fingerprint, resume=resume, log=log, margins=compared)
    result = build_result(run, specs, outcome, data.labels, split=split, eps=eps, seed=seed,
                          batch_size=batch_size, fast=fast, requested=(checkpoint, num_examples),
                          sampled=len(data) < full_size, seconds=time.time() - t0)
    log(result["table"])
    for w in outcome.warnings:
        log(f"warning: {w}")
    inflation = inflation_report(specs, outcome, data.labels, result["class_names"],
                                 inflation_threshold)
    if inflation is not None:
        result["inflation"] = inflation
        log(inflation["table"])
        for w in inflation["warnings"]:
            log(f"warning: {w}")
    if write:
        if inflation is not None:
            inflation["margin_chart_path"] = stem + "_margins.png"
            chart_margins(stem + "_margins.png", inflation, outcome, data.labels,
                          chart_title(result))
        write_outputs(result, stem, log)
    return result
