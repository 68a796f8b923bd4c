# ruff: noqa: E402  (jax is imported after --devices has set XLA_FLAGS)
"""Wall time of one jitted HAM train step against one PGD-AT step, per hard fraction.

    python benchmarks/ham_cost.py --model small_cnn --batch 128 --image_size 32 --repeats 5
    python benchmarks/ham_cost.py --devices 8    # a data-parallel mesh of 8 (fake CPU) devices

Both are the real `make_train_step` (attack, training pass, optimiser) on the same model, batch
and state. The hard set is forced to a chosen fraction through the batch hook
`hamjax.methods.ham.FORCE_HARD_KEY`, as int8 (`forced_hard_rows`: the mining pass still runs and
is timed; only its decision is replaced; before this hook took int8, a bool set let XLA drop
the mining forward pass, so ratios timed then leave out one forward pass of the batch:
docs/results/ham_cost.md says which).
Compile time is excluded: one warm-up call, then the median of `--repeats` calls,
each ended by block_until_ready, the steps timed in turn within each repeat (ratios are
medians of per-repeat ratios). Prints JSON: per fraction the bucket used (fraction b), the
measured time ratio HAM / PGD-AT, the ideal ratio (M + (K - M) b + b) / (K + 1) (the attack
steps and the update HAM runs, over PGD-AT's), and the ratio of counted example passes
(forward + backward) from the ledger. The masked reference
path (`method.bucketed=False`) is timed at one fraction to show that masking alone saves nothing.

`--devices N` jits both steps over a mesh of N devices (N fake CPU devices when the backend is the
CPU) with the global batch split over them, as the trainer does. HAM then packs each device's
hard rows into a local bucket; the forced hard rows are spread evenly over the devices' blocks
(ceil(f * B/N) per device), so every device holds the same count. Every device does the same work,
so the wall-time ratio is the per-device ratio (on fake CPU devices the N devices share the cores).

`--per_device_batches 32 64 128 256` instead times HAM at small per-device batches, where the
faithful step's buckets are small (issue 26): per per-device batch b (global b x devices), at one
hard fraction (`--hard_fraction`), PGD-AT, the faithful HAM step and the cross-batch variant
(`method.cross_batch_rows`, `--cross_batch_rows` rows per device). The cross-batch step is timed
over a whole cycle (the steps after which its buffer is empty again: one or more flushes, the
other steps mining only), chained from one state; its ratio is the cycle's time per step over
PGD-AT's step, i.e. per example. Its ideal is (M + (K - M + 1) h) / (K + 1): no bucket padding.
On a CPU every step is compute-bound, so these ratios do not show a GPU's idle small buckets.

XLA:CPU note: backward convs inside `lax.switch` / `while` bodies are slow on XLA:CPU
(jax-ml/jax#12868); the models therefore use `hamjax.backends.cpu.conv.canonical_conv` on CPU,
whose VJP is written with canonical NHWC/HWIO convs. These timings include that conv.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

from hamjax.cpu_devices import setting_from_argv, use_cpu_devices

if __name__ == "__main__" and int(_devices := setting_from_argv(sys.argv[1:], "--devices")
                                  or 1) > 1:
    use_cpu_devices(_devices)  # before jax starts

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hamjax.config import base_config, method_config
from hamjax.flops import compiled_flops, cpu_isa, flop_report, jaxpr_flops
from hamjax.methods import get_method
from hamjax.methods.ham import FORCE_HARD_KEY, bucket_sizes, forced_hard_rows
from hamjax.models import build_model
from hamjax.models.layers import conv_impl
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.sharding import make_mesh, put_replicated, shard_batch
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import jit_train_step, make_train_step

FRACTIONS = (0.15, 0.25, 0.35, 0.45, 0.6, 1.0)  # the hard fractions real runs see, and all
NUM_CLASSES = 10


def make_config(model: str, batch: int, method: ml_collections.ConfigDict):
    config = base_config()
    config.model.name = model
    config.method = method
    config.train.batch_size = batch
    config.train.lr_schedule = "constant"
    config.data.augment.crop_pad, config.data.augment.flip = 0, False  # time the method only
    return ml_collections.FrozenConfigDict(config)


def make_step(config, image_size: int, mesh):
    """(train step jitted over the mesh, initial state placed on it) for one config."""
    shape = (image_size, image_size, 3)
    ctx = StepContext(
        model=build_model(config.model, NUM_CLASSES, shape), tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, 1000), config=config, num_classes=NUM_CLASSES,
        class_counts=np.ones(NUM_CLASSES), steps_per_epoch=1000, image_shape=shape, mesh=mesh,
    )
    method = get_method(config.method.name)
    step = jit_train_step(make_train_step(ctx, method), mesh)
    return step, put_replicated(create_train_state(ctx, method, seed=0), mesh)


def interleaved_seconds(cases: dict, repeats: int) -> tuple[dict, dict]:
    """Per case (step, state, batch): the wall times of `repeats` calls, the cases taken in turn
    within each repeat so that load on a shared machine hits them alike; plus each case's
    metrics from its compiling warm-up call. The step donates its state, so every call gets a
    fresh copy, made outside the timed region."""
    fresh = lambda state: jax.block_until_ready(jax.tree.map(jnp.copy, state))
    metrics = {}
    for name, (step, state, batch) in cases.items():
        _, out = jax.block_until_ready(step(fresh(state), batch))
        metrics[name] = {k: float(v) for k, v in out.items()}
    times: dict = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (step, state, batch) in cases.items():
            copy = fresh(state)
            start = time.perf_counter()
            jax.block_until_ready(step(copy, batch))
            times[name].append(time.perf_counter() - start)
    return times, metrics


def median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over repeats of the per-repeat ratio (each against the reference timed beside it)."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def least_ratio(times: list[float], reference: list[float]) -> float:
    """The least call over the reference's least call: load on a shared machine only ever adds
    time, so the minima are the steadier estimate of each step's own cost (medians of per-repeat
    ratios moved by up to 0.1 between two runs of the same command on the 2-core machine)."""
    return min(times) / min(reference)


def ledger_total(step, state, batch: dict) -> float:
    new, _ = step(jax.tree.map(jnp.copy, state), batch)
    return float(new.ledger.forward + new.ledger.backward)


def forced_hard(batch: int, devices: int, fraction: float, rs: np.random.RandomState):
    """bool[batch]: ceil(fraction * B/N) random rows in each of the N devices' blocks."""
    local = batch // devices
    mask = np.zeros((devices, local), bool)
    for block in mask:
        block[rs.permutation(local)[: max(1, int(np.ceil(round(fraction * local, 6))))]] = True
    return mask.reshape(batch)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rs = np.random.RandomState(0)
    mesh = make_mesh(jax.devices()[: args.devices])
    devices = mesh.devices.size
    if args.batch % devices:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {devices} devices")
    shape = (args.batch, args.image_size, args.image_size, 3)
    host_batch = {
        "image": rs.rand(*shape).astype(np.float32),
        "label": rs.randint(0, NUM_CLASSES, args.batch).astype(np.int32),
        "index": np.arange(args.batch, dtype=np.int32),
    }
    batch = shard_batch(host_batch, mesh)

    def forced(fraction: float) -> dict:
        hard = forced_hard(args.batch, devices, fraction, rs)
        return shard_batch({**host_batch, FORCE_HARD_KEY: forced_hard_rows(hard)}, mesh)

    pgd_step, pgd_state = make_step(make_config(args.model, args.batch, _pgd()), args.image_size,
                                    mesh)
    pgd_passes = ledger_total(pgd_step, pgd_state, batch)
    buckets = {"buckets": tuple(args.buckets)} if args.buckets else {}
    method = method_config("ham", warmup_epochs=0, mining_step=args.mining_step, **buckets)
    config = make_config(args.model, args.batch, method)
    steps, m = int(config.attack.steps), args.mining_step
    ham_step, ham_state = make_step(config, args.image_size, mesh)
    masked_config = make_config(args.model, args.batch, method_config(
        "ham", warmup_epochs=0, mining_step=m, bucketed=False))
    masked_step, masked_state = make_step(masked_config, args.image_size, mesh)

    cases = {"pgd_at": (pgd_step, pgd_state, batch)}
    fractions = tuple(args.fractions)
    cases.update({f"ham@{f}": (ham_step, ham_state, forced(f)) for f in fractions})
    cases["masked@0.25"] = (masked_step, masked_state, forced(0.25))
    times, metrics = interleaved_seconds(cases, args.repeats)
    t_pgd = times["pgd_at"]

    rows = []
    for fraction in fractions:
        name = f"ham@{fraction}"
        b = metrics[name]["bucket_fraction"]
        rows.append({
            "hard_fraction": metrics[name]["hard_fraction"],
            "bucket_fraction": b,
            "ham_seconds": round(statistics.median(times[name]), 5),
            "measured_ratio": round(median_ratio(times[name], t_pgd), 3),
            "least_ratio": round(least_ratio(times[name], t_pgd), 3),
            "ideal_ratio": round((m + (steps - m) * b + b) / (steps + 1), 3),
            "ledger_ratio": round(ledger_total(ham_step, ham_state, cases[name][2]) / pgd_passes,
                                  3),
        })

    device = jax.devices()[0]
    pgd_flops, notes = jaxpr_flops(pgd_step, pgd_state, batch)
    return {
        "model": args.model, "batch": args.batch, "image_size": args.image_size,
        "K": steps, "M": m, "devices": devices,
        "buckets_per_device": list(bucket_sizes(tuple(method.buckets), args.batch // devices)),
        "repeats": args.repeats, "device": f"{device.platform}:{device.device_kind}",
        "conv": "hamjax.models.layers.conv_impl() = " + conv_impl().__name__,
        "pgd_at_seconds": round(statistics.median(t_pgd), 5),
        "pgd_at_least_seconds": round(min(t_pgd), 5),
        # HAM's FLOPs depend on the hard set; PGD-AT's fix the scale (HAM's ~ ideal_ratio x these)
        "pgd_at_flops": flop_report(pgd_flops, statistics.median(t_pgd), config.model.dtype,
                                    list(mesh.devices.flat),
                                    xla_flops=compiled_flops(pgd_step.lower(pgd_state, batch)
                                                             .compile()), notes=notes),
        "cpu_isa": cpu_isa() if device.platform == "cpu" else None,
        "ham": rows,
        "masked_reference_at_0.25": {
            "seconds": round(statistics.median(times["masked@0.25"]), 5),
            "measured_ratio": round(median_ratio(times["masked@0.25"], t_pgd), 3),
            "least_ratio": round(least_ratio(times["masked@0.25"], t_pgd), 3),
        },
    }


def cpu_busy_share(seconds: float = 1.0) -> float | None:
    """The share of all CPUs' time spent busy over the next `seconds` (/proc/stat; None where
    there is none): what else is running, where the load average lags by a minute."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return round(1 - (idle1 - idle0) / max(total1 - total0, 1), 3)


def cycle_steps(rows: int, hard: int) -> int:
    """Steps after which a buffer of `rows` that gains `hard` rows a step is empty again."""
    return rows // math.gcd(rows, hard)


def chained_seconds(cases: dict, repeats: int,
                    rs: np.random.RandomState | None = None) -> tuple[dict, dict]:
    """Per case (step, state, batches): seconds per step of running the batches in turn from a
    fresh copy of the state (each call chained on the last), the cases interleaved within each
    repeat (with `rs`, in a new random order each repeat, so that no case always follows the
    same one); plus each case's (final state, updates applied) of the compiling warm-up run."""
    fresh = lambda state: jax.block_until_ready(jax.tree.map(jnp.copy, state))

    def go(step, state, batches):
        applied = 0.0
        for batch in batches:
            state, metrics = step(state, batch)
            applied += metrics["update_applied"]
        return jax.block_until_ready((state, applied))

    ends = {name: go(step, fresh(state), batches)
            for name, (step, state, batches) in cases.items()}
    times: dict = {name: [] for name in cases}
    names = list(cases)
    for _ in range(repeats):
        for i in (range(len(names)) if rs is None else rs.permutation(len(names))):
            name = names[i]
            step, state, batches = cases[name]
            copy = fresh(state)
            start = time.perf_counter()
            go(step, copy, batches)
            times[name].append((time.perf_counter() - start) / len(batches))
    return times, ends


def passes(state) -> float:
    return float(state.ledger.forward + state.ledger.backward)


def random_batch(batch: int, image_size: int, mesh, hard_fraction: float | None,
                 rs: np.random.RandomState) -> dict:
    """A random batch on the mesh; with a hard fraction, the hard set forced to it per device."""
    shape = (batch, image_size, image_size, 3)
    out = {"image": rs.rand(*shape).astype(np.float32),
           "label": rs.randint(0, NUM_CLASSES, batch).astype(np.int32),
           "index": np.arange(batch, dtype=np.int32)}
    if hard_fraction is not None:
        out[FORCE_HARD_KEY] = forced_hard_rows(forced_hard(batch, mesh.devices.size,
                                                           hard_fraction, rs))
    return shard_batch(out, mesh)


def run_small_batches(args: argparse.Namespace) -> dict[str, Any]:
    """Faithful and cross-batch HAM against PGD-AT at each per-device batch (see module doc)."""
    rs = np.random.RandomState(0)
    mesh = make_mesh(jax.devices()[: args.devices])
    devices = mesh.devices.size
    m, h = args.mining_step, args.hard_fraction
    rows = []
    for local in args.per_device_batches:
        batch = local * devices
        hard_local = max(1, int(np.ceil(round(h * local, 6))))
        if hard_local > args.cross_batch_rows:
            raise SystemExit(f"--cross_batch_rows {args.cross_batch_rows} is below the "
                             f"{hard_local} hard rows a device gathers per step at batch {local}")
        cycle = cycle_steps(args.cross_batch_rows, hard_local)

        host_batch = lambda hard, b=batch: random_batch(b, args.image_size, mesh,
                                                        h if hard else None, rs)
        ham = lambda b=batch, **fields: make_config(args.model, b, method_config(
            "ham", warmup_epochs=0, mining_step=m, **fields))

        pgd_step, pgd_state = make_step(make_config(args.model, batch, _pgd()), args.image_size,
                                        mesh)
        faithful_step, faithful_state = make_step(ham(), args.image_size, mesh)
        cross_config = ham(cross_batch_rows=args.cross_batch_rows * devices)
        cross_step, cross_state = make_step(cross_config, args.image_size, mesh)
        steps = int(cross_config.attack.steps)
        cases = {"pgd_at": (pgd_step, pgd_state, [host_batch(False)]),
                 "faithful": (faithful_step, faithful_state, [host_batch(True)]),
                 "cross_batch": (cross_step, cross_state,
                                 [host_batch(True) for _ in range(cycle)])}
        times, ends = chained_seconds(cases, args.repeats)
        t_pgd = times["pgd_at"]
        pgd_passes = passes(ends["pgd_at"][0])
        bucket = next(s for s in bucket_sizes(tuple(method_config("ham").buckets), local)
                      if s >= hard_local) / local
        hard = hard_local / local
        rows.append({
            "per_device_batch": local, "global_batch": batch,
            "pgd_at_seconds_per_step": round(statistics.median(t_pgd), 5),
            "faithful": {
                "bucket_fraction": bucket,
                "seconds_per_step": round(statistics.median(times["faithful"]), 5),
                "measured_ratio": round(median_ratio(times["faithful"], t_pgd), 3),
                "least_ratio": round(least_ratio(times["faithful"], t_pgd), 3),
                "ideal_ratio": round((m + (steps - m) * bucket + bucket) / (steps + 1), 3),
                "ledger_ratio": round(passes(ends["faithful"][0]) / pgd_passes, 3),
            },
            "cross_batch": {
                "rows_per_device": args.cross_batch_rows, "cycle_steps": cycle,
                "flushes_per_cycle": int(ends["cross_batch"][1]),
                "seconds_per_step": round(statistics.median(times["cross_batch"]), 5),
                "measured_ratio": round(median_ratio(times["cross_batch"], t_pgd), 3),
                "least_ratio": round(least_ratio(times["cross_batch"], t_pgd), 3),
                "ideal_ratio": round((m + (steps - m + 1) * hard) / (steps + 1), 3),
                "ledger_ratio": round(passes(ends["cross_batch"][0]) / cycle / pgd_passes, 3),
            },
        })
    device = jax.devices()[0]
    return {
        "mode": "per_device_batches", "model": args.model, "image_size": args.image_size,
        "K": steps, "M": m, "devices": devices, "hard_fraction": h,
        "repeats": args.repeats, "device": f"{device.platform}:{device.device_kind}",
        "conv": "hamjax.models.layers.conv_impl() = " + conv_impl().__name__,
        "cpu_isa": cpu_isa() if device.platform == "cpu" else None,
        "batches": rows,
    }


def _pgd() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "pgd_at"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "preact_resnet18"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mining_step", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1,
                        help="mesh size; on the CPU that many fake host devices (XLA_FLAGS)")
    parser.add_argument("--buckets", type=float, nargs="*", default=None,
                        help="HAM's bucket fractions (method.buckets); default the method's. "
                             "Fewer buckets compile faster on a large model")
    parser.add_argument("--fractions", type=float, nargs="*", default=FRACTIONS,
                        help="the hard fractions to force")
    parser.add_argument("--per_device_batches", type=int, nargs="*", default=None,
                        help="time faithful and cross-batch HAM at these per-device batches")
    parser.add_argument("--hard_fraction", type=float, default=0.25,
                        help="with --per_device_batches: the forced hard fraction")
    parser.add_argument("--cross_batch_rows", type=int, default=128,
                        help="with --per_device_batches: cross-batch buffer rows per device")
    args = parser.parse_args()
    if jax.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} device(s) here")
    busy_before = cpu_busy_share()
    result = run_small_batches(args) if args.per_device_batches else run(args)
    result = {"command": "python benchmarks/ham_cost.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "cpu_busy_before": busy_before, **result}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
