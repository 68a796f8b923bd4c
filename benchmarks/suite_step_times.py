# ruff: noqa: E402  (jax is imported after --cpu_devices has set XLA_FLAGS)
"""Seconds per train step of every run of the shipped Fashion-MNIST suites, timed in turn with
no other work on the machine: what prices the runs' epochs into a quiet-machine wall time
(benchmarks/quiet_wall.py), so the results' wall-time ratios and frontier plot do not measure
the load the runs happened to share the cores with.

    python benchmarks/suite_step_times.py      # the evidence and fairness suites, ~6 min here
    python benchmarks/suite_step_times.py --suites evidence fairness noisy_full
                                               # with the noisy suite (the JSON is rewritten
                                               # whole: name every suite to keep)

Every run's step is the trainer's own: its config from `fashion_mnist_suites.build_config`
(configs/fashion_mnist.py plus the suite's fields), the real data pipeline's first training
batch, the step jitted as the trainer jits it (`jit_train_step`) over `--cpu_devices` devices
(default 1, as the suites' runs trained). A method whose own part starts late (HAM's and
DAFA's warm-up, CFA's calibration, AWP's warm-up) is timed in each phase, its state's step
moved to the phase's first step. HAM is timed per bucket (the hard set forced to the bucket's
rows through `FORCE_HARD_KEY`, as int8 so that the mining pass still runs) and with no hard
row; the cross-batch step on a mining-only step and over a buffer's whole cycle
(`flush_extra`: what one flush adds). A HAM run branched from PGD-AT (`branch_from`) trained its
warm-up epochs as that run: they are priced at its step.

Compilation is excluded: a warm-up call, then `--repeats` calls, the cases in a new random
order each repeat (`ham_cost.chained_seconds`); a case's seconds are the least of its calls. A
step's work does not vary, so interference only adds to it: on this 2-core machine one PGD-AT step
took 0.40-0.58 s within one early run with nothing else running, and the medians of 7-9 calls
put TRADES and PGD-AT+EMA below PGD-AT in one run and TRADES above it in the next, while the
least of 15 puts PGD-AT, PGD-AT+EMA and FAAL (the same attack and passes) within 4% of each
other and DAFA beside TRADES, its base. FAAL's three runs have the same step: they timed
within 3% (0.405, 0.409 and 0.418 s in the committed timing); the same step moved by up to 5%
between two such timings on different days (MART 1.21x, then 1.16x PGD-AT's).
The medians, every call's time, the CPU's busy share in the second before the timing and, for
every case but HAM's and CAAT's, the step's FLOPs, FLOP/s and fraction of the CPU's peak are in
the JSON too.

Writes benchmarks/results/fashion_mnist_step_times.json (`--out`, rewritten whole); the compare
driver reads it. Stop other work on the machine first (SIGSTOP a background run): the point is
an idle machine. CAAT (the noisy_full suite) is timed on a plain step and on one that runs its
meta update (every `meta_interval` steps), priced at their shares of an epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

from hamjax.cpu_devices import setting_from_argv, use_cpu_devices

if __name__ == "__main__":
    use_cpu_devices(setting_from_argv(sys.argv[1:]) or "1")  # before jax starts its backend

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.backends.cpu.compile_options import compiler_options
from hamjax.config import config_to_json
from hamjax.data import iterate_batches, load_splits, meta_batch
from hamjax.flops import cpu_isa, flop_report, jaxpr_flops
from hamjax.methods import get_method, start_fields
from hamjax.methods.ham import FORCE_HARD_KEY, bucket_sizes, forced_hard_rows
from hamjax.run import build_context
from hamjax.sharding import make_mesh, put_replicated, shard_batch
from hamjax.state import create_train_state
from hamjax.train.step import jit_train_step, make_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_mnist_suites import build_config, suite_runs, timing_key  # noqa: I001
from ham_cost import chained_seconds, cpu_busy_share, cycle_steps, forced_hard
from quiet_wall import cost_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "fashion_mnist_step_times.json")
NO_ROOT = "/suite_step_times/no-root"  # build_config needs one; nothing is read from it
PRICED_SUITES = ("evidence", "fairness", "noisy_full")


def start_epochs(config, method) -> list[int]:
    """0-based epochs where the step's work changes: 0 and every late start within the run."""
    epochs = int(config.train.epochs)
    return sorted({0} | {int(config.method[f]) for f in start_fields(method, config)
                         if 0 < int(config.method[f]) < epochs})


class RunSteps:
    """One run's jitted step, fresh state and first real batch on the mesh."""

    def __init__(self, config, mesh, splits_cache: dict):
        config.train.init_from = config.train.branch_from = ""  # timing needs no weights
        config.train.init_epoch = 0
        key = json.dumps(config.data.to_dict(), sort_keys=True, default=str) + str(config.seed)
        if key not in splits_cache:
            splits_cache[key] = load_splits(config.data, seed=config.seed)
        splits = splits_cache[key]
        self.config, self.mesh = config, mesh
        self.ctx = build_context(config, splits, mesh)
        self.method = get_method(config.method.name)
        self.step = jit_train_step(make_train_step(self.ctx, self.method), mesh)
        self.state = put_replicated(create_train_state(self.ctx, self.method, config.seed), mesh)
        host = next(iterate_batches(splits.train, config.train.batch_size, config.seed, 0))
        if self.method.needs_meta_batch:
            host.update(meta_batch(splits.meta, config.train.batch_size, config.seed, 0))
        self.host_batch = host

    def at_epoch(self, epoch: int, offset: int = 0):
        """The fresh state moved to step `offset` of 0-based `epoch`."""
        step = jnp.asarray(epoch * self.ctx.steps_per_epoch + offset, jnp.int32)
        return put_replicated(jax.device_get(self.state).replace(step=step), self.mesh)

    def batch(self, hard_rows: int | None = None, rs=None) -> dict:
        """The batch on the mesh; with `hard_rows`, HAM's hard set forced to that many rows."""
        host = dict(self.host_batch)
        if hard_rows is not None:
            batch = len(host["label"])
            devices = self.mesh.devices.size
            host[FORCE_HARD_KEY] = forced_hard_rows(
                forced_hard(batch, devices, hard_rows / batch, rs) if hard_rows
                else np.zeros(batch, bool))
        return shard_batch(host, self.mesh)


def meta_steps_per_epoch(run: RunSteps) -> int:
    """Steps an epoch that also run CAAT's meta update (hamjax.methods.caat_meta.meta_due: in-epoch
    batch indices interval - 1, 2 interval - 1, ...); 0 for other methods, and for an interval
    of 1, where every step runs it (one case then times them all)."""
    interval = int(run.config.method.get("meta_interval", 0)) if run.method.needs_meta_batch else 0
    if interval <= 1:
        return 0
    return run.ctx.steps_per_epoch // interval


def ham_cases(name: str, run: RunSteps, epoch: int, rs) -> tuple[dict, dict]:
    """(cases, phase template) of HAM after its warm-up: per bucket and an empty batch, or the
    cross-batch step's mining-only step and its buffer cycle."""
    settings = run.config.method
    state = run.at_epoch(epoch)
    batch = int(run.config.train.batch_size)
    local = batch // run.mesh.devices.size
    rows = int(settings.get("cross_batch_rows", 0))
    if rows:
        per_device_rows = rows // run.mesh.devices.size
        hard = max(1, per_device_rows // 4)
        cycle = cycle_steps(per_device_rows, hard)
        hard_batch = run.batch(hard * run.mesh.devices.size, rs)
        return ({f"{name}@mine": (run.step, state, [hard_batch]),
                 f"{name}@cycle": (run.step, state, [hard_batch] * cycle)},
                {"cross_batch": cycle})
    sizes = bucket_sizes(tuple(settings.buckets), local)
    cases = {f"{name}@empty": (run.step, state, [run.batch(0, rs)])}
    for size in sizes:
        cases[f"{name}@{size / local:.4g}"] = (run.step, state,
                                               [run.batch(size * run.mesh.devices.size, rs)])
    return cases, {"buckets": [f"{size / local:.4g}" for size in sizes]}


def plan(suites: list[str], mesh, splits_cache: dict, rs) -> tuple[dict, dict]:
    """(timed cases, per run: steps per epoch and its phases as case names to fill in)."""
    cases, runs = {}, {}
    for suite in suites:
        if suite not in PRICED_SUITES:
            raise SystemExit(f"--suites {suite}: only {', '.join(PRICED_SUITES)} are priced "
                             "(the scaled suites change per invocation)")
        for name, spec in suite_runs(suite).items():
            if "from_suite" in spec:
                continue  # timed with the suite that trains it
            key = f"{suite}/{name}"
            config = build_config(suite, spec, 0, 0, 0, root=NO_ROOT)
            # As the run trains it: RunSteps then blanks init_from and branch_from (no weights).
            timed = cost_config(json.loads(json.dumps(config_to_json(config))))
            run = RunSteps(config, mesh, splits_cache)
            phases = []
            for epoch in start_epochs(run.config, run.method):
                if "branch_from" in spec and epoch == 0:
                    source = timing_key(suite, spec["branch_from"])
                    phases.append({"from_epoch": 1, "case": f"{source}@0",
                                   "branched_from": source})
                elif run.method.name == "ham" and epoch >= int(
                        run.config.method.warmup_epochs) and (
                        run.config.method.bucketed or run.config.method.cross_batch_rows):
                    more, template = ham_cases(f"{key}@{epoch}", run, epoch, rs)
                    cases.update(more)
                    phases.append({"from_epoch": epoch + 1, "prefix": f"{key}@{epoch}",
                                   **template})
                else:
                    cases[f"{key}@{epoch}"] = (run.step, run.at_epoch(epoch), [run.batch()])
                    phases.append({"from_epoch": epoch + 1, "case": f"{key}@{epoch}"})
                    meta = meta_steps_per_epoch(run)
                    if meta:  # CAAT: its meta update runs at in-epoch batch interval - 1, ...
                        interval = int(run.config.method.meta_interval)
                        cases[f"{key}@{epoch}@meta"] = (
                            run.step, run.at_epoch(epoch, interval - 1), [run.batch()])
                        phases[-1].update(meta_case=f"{key}@{epoch}@meta",
                                          meta_steps_per_epoch=meta)
            runs[key] = {"steps_per_epoch": run.ctx.steps_per_epoch, "method": run.method.name,
                         "cost_config": timed, "phases": phases}
    return cases, runs


def priced_phase(phase: dict, seconds: dict, ends: dict) -> dict:
    """A planned phase with its measured seconds (the quiet_wall formats)."""
    out = {k: v for k, v in phase.items() if k not in ("case", "prefix", "buckets",
                                                        "cross_batch")}
    prefix = phase.get("prefix")
    if "case" in phase:
        out["seconds"] = seconds[phase["case"]]
        if "meta_case" in phase:  # what a step with CAAT's meta update adds
            out.pop("meta_case")
            out["meta_extra"] = round(seconds[phase["meta_case"]] - out["seconds"], 5)
    elif "buckets" in phase:
        out["buckets"] = {b: seconds[f"{prefix}@{b}"] for b in phase["buckets"]}
        out["empty"] = seconds[f"{prefix}@empty"]
    else:
        cycle, flushes = phase["cross_batch"], int(ends[f"{prefix}@cycle"][1])
        if flushes != 1:
            raise RuntimeError(f"{prefix}: the timed cycle flushed {flushes} times, not once")
        mine = seconds[f"{prefix}@mine"]
        out.update(mine=mine, flush_extra=round(cycle * (seconds[f"{prefix}@cycle"] - mine), 5),
                   cycle_steps=cycle)
    return out


def case_flops(cases: dict, seconds: dict, mesh) -> dict:
    """Per one-step case with a fixed cost: FLOPs of the step (the jaxpr count, loops multiplied
    out, `hamjax.flops`), achieved FLOP/s at its seconds and the fraction of the CPU's peak.
    HAM's and CAAT's cases are left out: their FLOPs depend on the branch the step runs (HAM's
    bucket, CAAT's meta update or not), and the count takes the most expensive one (a plain
    CAAT step would read 126% of the peak)."""
    out = {}
    for name, (step, state, batches) in cases.items():
        if (len(batches) != 1 or FORCE_HARD_KEY in batches[0] or name.endswith("@meta")
                or f"{name}@meta" in cases):
            continue
        flops, notes = jaxpr_flops(step, state, batches[0])
        dtype = str(np.dtype(jax.tree.leaves(state.params)[0].dtype))
        out[name] = flop_report(flops, seconds[name], dtype, list(mesh.devices.flat),
                                notes=notes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", nargs="+", default=["evidence", "fairness"],
                        choices=PRICED_SUITES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cpu_devices", default="1",
                        help="host devices on the CPU (the suites' runs used 1)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    rs = np.random.RandomState(0)
    mesh = make_mesh()
    busy_before = cpu_busy_share()
    cases, runs = plan(args.suites, mesh, {}, rs)
    # In a new random order each repeat: a fixed order put ~10% on the first case here.
    times, ends = chained_seconds(cases, args.repeats, rs)
    # The least of the repeats: a step's work does not vary, interference only adds to it.
    seconds = {name: round(min(t), 5) for name, t in times.items()}
    priced = {key: dict(run, phases=[priced_phase(p, seconds, ends) for p in run["phases"]])
              for key, run in runs.items()}
    device = jax.devices()[0]
    result = {
        "command": "python benchmarks/suite_step_times.py --suites " + " ".join(args.suites)
                   + f" --repeats {args.repeats} --cpu_devices {args.cpu_devices}",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "device": f"{device.platform}:{device.device_kind}",
                    "devices_per_run": mesh.devices.size,
                    "cpu_isa": cpu_isa() if device.platform == "cpu" else None,
                    "compiler_options": compiler_options(),
                    "cpu_busy_before": busy_before},
        "repeats": args.repeats,
        "seconds_per_case": seconds,
        "median_per_case": {name: round(statistics.median(t), 5) for name, t in times.items()},
        "times_per_case": {name: [round(x, 5) for x in t] for name, t in times.items()},
        "flops_per_case": case_flops(cases, seconds, mesh),
        "runs": priced,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
