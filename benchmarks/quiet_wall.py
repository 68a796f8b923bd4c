"""Training wall time on a quiet machine: every epoch of a run priced at the seconds its train
step takes, measured with the other runs' steps in turn on an otherwise idle machine
(benchmarks/suite_step_times.py).

Why: the Fashion-MNIST runs share 2 CPU cores with each other (and now and then are paused),
so their logged wall time measures the load as much as the method: one PGD-AT run's epochs took
282-1001 s. The ledger counts passes, which is exact but blind to everything else a step does
(AWP's weight perturbation, EMA, CFA's class-wise terms, HAM's padding to a bucket). A step
timed beside the others, times the steps an epoch ran, is the wall time the run would have
taken alone.

A run's timing (one entry of the step-times JSON) is its steps per epoch and its phases, each
from a 1-based epoch on (a method whose own part starts late has two):
- {"from_epoch": e, "seconds": t}: every step costs t; with "meta_extra": x and
  "meta_steps_per_epoch": n (CAAT), n steps of each epoch also run the meta update and cost x
  more;
- {"from_epoch": e, "buckets": {fraction: t, ...}, "empty": t}: HAM, whose step cost is that of
  the bucket it ran; the epoch's record holds the share of steps per bucket
  (`bucket_share/<fraction>`), and the rest ran none (no hard row: an empty batch for the
  faithful rule, a training pass on the M-step adversaries for `train_at_m`), priced at "empty";
- {"from_epoch": e, "mine": t, "flush_extra": t}: HAM's cross-batch step, which mines every
  step and continues and trains a full buffer on a share of them (`cross_batch_flush`).
"""

from __future__ import annotations

import json
import os


def _bucket_seconds(metrics: dict, phase: dict, where: str) -> float:
    if not any(key.startswith("bucket_share/") for key in metrics):
        raise ValueError(f"{where}: a HAM phase, but the epoch records no bucket_share/* "
                         "metrics to price its steps by")
    shares = {key.split("/", 1)[1]: value for key, value in metrics.items()
              if key.startswith("bucket_share/") and value > 0}
    untimed = sorted(set(shares) - set(phase["buckets"]))
    if untimed:
        raise ValueError(f"{where}: buckets {untimed} ran but were not timed; rerun "
                         "benchmarks/suite_step_times.py")
    bucketed = sum(shares.values())
    if bucketed > 1 + 1e-6:
        raise ValueError(f"{where}: bucket shares add up to {bucketed:.4f} > 1")
    return (sum(share * phase["buckets"][b] for b, share in shares.items())
            + (1 - bucketed) * phase["empty"])


def step_seconds(metrics: dict, phase: dict, where: str = "epoch") -> float:
    """Mean seconds per step of an epoch with these train metrics, in this phase."""
    if "buckets" in phase:
        return _bucket_seconds(metrics, phase, where)
    if "mine" in phase:
        if "cross_batch_flush" not in metrics:
            raise ValueError(f"{where}: a cross-batch phase, but the epoch records no "
                             "cross_batch_flush to price its flushes by")
        return phase["mine"] + metrics["cross_batch_flush"] * phase["flush_extra"]
    return phase["seconds"]


def phase_of(epoch: int, phases: list[dict]) -> dict:
    """The phase a 1-based epoch trains in: the last one that has begun."""
    begun = [p for p in phases if p["from_epoch"] <= epoch]
    if not begun:
        raise ValueError(f"no phase covers epoch {epoch}: {phases}")
    return max(begun, key=lambda p: p["from_epoch"])


def quiet_seconds(epochs: list[dict], timing: dict, where: str = "run") -> float:
    """The run's training seconds on a quiet machine: per finished epoch (records with `epoch`
    and `train_metrics`, as report.json and metrics.jsonl hold them), its steps times the mean
    step seconds of its phase."""
    total = 0.0
    for e in epochs:
        phase = phase_of(e["epoch"], timing["phases"])
        total += timing["steps_per_epoch"] * step_seconds(
            e.get("train_metrics", {}), phase, f"{where} epoch {e['epoch']}")
        total += phase.get("meta_steps_per_epoch", 0) * phase.get("meta_extra", 0.0)
    return total


def read_step_times(path: str) -> dict:
    """suite_step_times.py's JSON (its "runs": run key "suite/run" -> timing); {} when there is
    none."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def cost_config(config: dict) -> dict:
    """The fields of a run's config (as report.json holds it) that set what its step costs, how
    many steps an epoch has and which phases its epochs train in: the model, the method, the
    training attack, the batch, the averaging, the data splits, the epochs and whether it
    branches from another run."""
    train = config["train"]
    return {"model": config["model"], "method": config["method"], "attack": config["attack"],
            "data": {k: config["data"].get(k) for k in ("name", "image_size", "train_size",
                                                         "val_size", "meta_per_class",
                                                         "imbalance_factor")},
            "train": {**{k: train.get(k) for k in ("batch_size", "ema_decay", "fawa_decay",
                                                   "steps_per_dispatch", "epochs")},
                      # a branch's first epochs are its source's steps (the timing's phases)
                      "branches": bool(train.get("branch_from"))}}


def timing_for(runs: dict, key: str, config: dict | None) -> tuple[dict | None, str | None]:
    """(timing, the key it was timed under) for run `key` of the step-times JSON's "runs": its
    own, else that of a timed run whose step is the same (an equal `cost_config`, e.g. a second
    fine-tune with the same method from another start); (None, None) when there is neither."""
    if key in runs:
        return runs[key], key
    if config is not None:
        wanted = cost_config(config)
        for other, timing in sorted(runs.items()):
            if timing.get("cost_config") == wanted:
                return timing, other
    return None, None


def same_cost_config(timed: dict, trained: dict) -> bool:
    """Whether the steps were timed with the config a run trained with (`cost_config` of each).
    A field the run's config lacks (added to hamjax after it started, at its default) is not
    compared; any other difference is (e.g. runs of an earlier model)."""
    if isinstance(timed, dict) and isinstance(trained, dict):
        return all(key not in trained or same_cost_config(value, trained[key])
                   for key, value in timed.items())
    return timed == trained or trained is None


def timed_like(devices: list[str], machine: dict) -> bool:
    """Whether a run that trained on `devices` ("cpu:0", ...) ran as the steps of a timing on
    `machine` (its "device" kind and "devices_per_run"): CPU timings never price a GPU run, nor
    a one-device timing a run on two host devices."""
    kind = str(machine.get("device", "")).split(":")[0]
    return (bool(devices) and len(devices) == machine.get("devices_per_run")
            and all(d.split(":")[0] == kind for d in devices))


def priced_row(r: dict, report: dict, timing: dict | None,
               start: tuple[dict, dict | None] | None = None) -> dict:
    """Row `r` with `quiet_seconds` (its report's epochs priced by `timing`), plus those of the
    run it fine-tunes when its cost counts that run (`start`: its report and timing). Unchanged
    when a timing is missing: a quiet wall time is never half measured."""
    if timing is None or (start is not None and start[1] is None):
        return r
    pairs = [(report, timing)] + ([start] if start is not None else [])
    if not all(same_cost_config(t.get("cost_config", {}), cost_config(rep["config"]))
               for rep, t in pairs if "config" in rep):
        return r
    quiet = quiet_seconds(report["epochs"], timing, r["run"])
    if start is not None:
        quiet += quiet_seconds(start[0]["epochs"], start[1], r.get("cost_includes", "start"))
    return dict(r, quiet_seconds=round(quiet, 1))
