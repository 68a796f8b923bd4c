"""Real Fashion-MNIST comparisons the README quotes, sized for 2 CPU cores: the orchestration.

    python benchmarks/fashion_mnist_compare.py --suite=evidence --seeds 0 1 2 \
        --autoattack_examples 1000     # PGD-AT, TRADES, HAM and HAM train_at_m (branched from
                                       # PGD-AT at epoch 6) on fmnist_cnn, APGD selection,
                                       # AutoAttack on 1000 stratified test images
    python benchmarks/fashion_mnist_compare.py --suite=fairness --seeds 0 \
        --autoattack_examples 1000     # MART, AWP, EMA, CFA, WAT, DAFA, FAAL, against the
                                       # evidence suite's PGD-AT (run that suite first)
    python benchmarks/fashion_mnist_compare.py --suite=ham_full --seeds 0 1 2
                                      # configs/fashion_mnist.py's PGD-AT and HAM runs on the
                                      # full training split (58,000 images), 8 epochs each
    python benchmarks/fashion_mnist_compare.py --suite=noisy_full --seeds 0
                                      # 20% pair-flip noise, full split: one PGD-AT warm start,
                                      # then PGD-AT, TRADES, FRL, CAAT (faithful and floored)
                                      # fine-tuned from it; per-class accuracy and routing
    python benchmarks/fashion_mnist_compare.py --suite=ham    # PGD-AT vs HAM, same budget
    python benchmarks/fashion_mnist_compare.py --suite=noisy  # 20% flip2 noise: PGD-AT, TRADES,
                                                              # FRL, CAAT (faithful and floored)

Every run is a normal `train_and_evaluate` run in its own workdir (resumable: rerun the same
command after a stop; finished runs are skipped). The runs of one seed train side by side
(`--parallel`, one process each on the shared cores), so their per-epoch wall times are measured
in the same window and their ratio is the realised saving. Results are test-split numbers (clean
labels) of the last checkpoint and of the checkpoint selected on the validation split; PGD-20 at
the training eps. Per epoch: hard fraction, bucket histogram, ledger ratio and wall ratio.

The jobs, one module each: the suites (`fashion_mnist_suites`: runs read from
configs/fashion_mnist.py), this orchestration, the follow-ups on finished runs
(`fashion_mnist_followups`: AutoAttack, CAAT's routing), reading the workdirs
(`fashion_mnist_logs`), the tables (`fashion_mnist_tables`) and the results
(`fashion_mnist_results`): benchmarks/results/fashion_mnist_<suite>.json and
docs/results/fashion_mnist_<suite>.md; `--report_only` rewrites them from what the workdirs hold
now (unfinished runs contribute their finished epochs) without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from fashion_mnist_followups import autoattack_one, diagnose_routing, paired_with
from fashion_mnist_logs import (
    best_is_last,
    epoch_records,
    epoch_row,
    report_until_epoch,
    row,
    run_devices,
    train_windows,
    with_start_cost,
    with_wall_ratios,
)
from fashion_mnist_results import (
    EARLIER,
    carry_over,
    frontier_path,
    frontier_plot,
    kept_sample,
    read_previous,
    results_text,
    suite_order,
    write_results,
)
from fashion_mnist_suites import build_config, is_shipped, suite_runs, timing_key, workdir_of
from quiet_wall import priced_row, read_step_times, timed_like, timing_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(suite: str, name: str, epochs: int, train_size: int, root: str, seed: int,
            train: bool = True, cpu_devices: int = 1) -> dict | None:
    """Trains one run in a subprocess (isolates XLA memory; resumable) on `cpu_devices` host
    devices (an XLA_FLAGS device count of the caller's wins) and reads its report (None when it
    has none and `train` is False)."""
    workdir = workdir_of(root, suite, name, seed)
    report_path = os.path.join(workdir, "report.json")
    if train and not os.path.exists(report_path):
        wait_for_branch_point(build_config(suite, suite_runs(suite)[name], epochs, train_size,
                                           seed, root), workdir)
        bench_dir = os.path.join(REPO, "benchmarks")
        code = (
            f"import sys; sys.path.insert(0, {bench_dir!r})\n"
            "from fashion_mnist_suites import build_config, suite_runs\n"
            "from hamjax.train import train_and_evaluate\n"
            f"run = suite_runs({suite!r})[{name!r}]\n"
            f"train_and_evaluate(build_config({suite!r}, run, {epochs}, {train_size}, {seed}, "
            f"{root!r}), {workdir!r})\n"
        )
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "stdout.log"), "a") as log:
            subprocess.run([sys.executable, "-c", code], check=True, stdout=log,
                           stderr=subprocess.STDOUT, cwd=REPO, env=child_env(cpu_devices))
    if not os.path.exists(report_path):
        return None
    with open(report_path) as f:
        return json.load(f)


def wait_for_branch_point(config, workdir: str, poll_s: float = 30.0) -> None:
    """A branch (train.branch_from) starts once its source has saved the end of the epoch it
    branches at; the source trains in another job (started before it), so this waits for it."""
    source = config.train.branch_from
    if not source or os.path.exists(os.path.join(workdir, "checkpoints")):
        return
    from hamjax.data import load_splits, num_batches

    splits = load_splits(config.data, seed=config.seed)
    step = config.train.branch_epoch * num_batches(len(splits.train), config.train.batch_size)
    done = os.path.join(source, "checkpoints", str(step))  # orbax renames it in when complete
    while not os.path.isdir(done):
        if os.path.exists(os.path.join(source, "report.json")):
            raise SystemExit(f"{source} finished without keeping {done} to branch {workdir} from")
        time.sleep(poll_s)


def child_env(cpu_devices: int) -> dict[str, str]:
    """The environment of a training child: `cpu_devices` host devices, as launch.py's
    --cpu_devices sets them (the device count changes the float sums, so it is part of what
    reproduces a run)."""
    from hamjax.cpu_devices import with_cpu_devices

    return dict(os.environ, XLA_FLAGS=with_cpu_devices(os.environ.get("XLA_FLAGS", ""),
                                                      cpu_devices))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", default="ham")
    parser.add_argument("--epochs", type=int, default=4, help="(not for the shipped suites)")
    parser.add_argument("--train_size", type=int, default=10000,
                        help="(not for the shipped suites, which use the full training split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per method and seed (seed 0 keeps the original workdirs)")
    parser.add_argument("--root", default=os.path.join(REPO, "runs", "fmnist_compare"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--autoattack_examples", type=int, default=500,
                        help="AutoAttack (and PGD-20) on this many test images of every "
                             "finished run's checkpoints below; 0: none")
    parser.add_argument("--autoattack_checkpoints", nargs="+", default=["last", "best"],
                        choices=["last", "best"], help="evaluated in this order")
    parser.add_argument("--cpu_devices", default="auto",
                        help="host devices per training run: a count, or 'auto' (one per core, "
                             "as launch.py; the most that divides the batch sizes)")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="train (and attack) only these runs of the suite, in this order; "
                             "the others are reported from their workdirs or carried over from "
                             "the suite's JSON")
    parser.add_argument("--report_only", action="store_true",
                        help="write the tables from what the workdirs hold now; train nothing")
    parser.add_argument("--tag", default="",
                        help="results as fashion_mnist_<suite>_<tag> (JSON, .md), beside the "
                             "suite's own, e.g. for another machine")
    parser.add_argument("--trained_elsewhere", default="",
                        help="with --report_only: what trained the workdirs under --root, and "
                             "on what (a command and a machine); replaces this machine in the "
                             "JSON and the caption")
    parser.add_argument("--step_times", default=None,
                        help="suite_step_times.py's JSON, to price every run's epochs into a "
                             "quiet-machine wall time (default: benchmarks/results/"
                             "fashion_mnist_step_times.json, unless --trained_elsewhere: steps "
                             "timed here do not price another machine's runs; '' for none)")
    return parser


def step_times_path(args: argparse.Namespace) -> str:
    """The step-times JSON that prices this invocation's runs ('' for none)."""
    if args.step_times is not None:
        return args.step_times
    return "" if args.trained_elsewhere else os.path.join(
        REPO, "benchmarks", "results", "fashion_mnist_step_times.json")


# Options that shape no run or table: where the workdirs are is given as a placeholder instead.
_NOT_REPRODUCED = {"suite", "seeds", "report_only", "trained_elsewhere", "root"}


def reproducing_command(args: argparse.Namespace, shipped: bool) -> str:
    """The command line that reproduces this invocation's tables: the suite, every option given
    a value other than its default (--runs, the AutoAttack options, ...) and the seeds. Shipped
    suites train on the full split, so --epochs/--train_size are left out for them."""
    defaults = vars(make_parser().parse_args([]))
    parts = ["python benchmarks/fashion_mnist_compare.py", f"--suite={args.suite}"]
    for key, value in vars(args).items():
        if key in _NOT_REPRODUCED or (shipped and key in ("epochs", "train_size")):
            continue
        if value == defaults[key] and (shipped or key not in ("epochs", "train_size")):
            continue
        parts += ([f"--{key}", *map(str, value)] if isinstance(value, list)
                  else [f"--{key}={value}"])
    parts += ["--seeds", *map(str, args.seeds)]
    if args.trained_elsewhere:
        parts += ["--report_only", "--root=<the workdirs>"]
    elif args.root != defaults["root"]:
        parts.append("--root=<the workdirs>")
    return " ".join(parts)


def main() -> None:
    args = make_parser().parse_args()
    if args.trained_elsewhere and not args.report_only:
        raise SystemExit("--trained_elsewhere describes workdirs trained elsewhere: it needs "
                         "--report_only (training here would make it untrue)")
    runs = suite_runs(args.suite)
    names = list(runs)
    unknown = sorted(set(args.runs or []) - set(names))
    if unknown:
        raise SystemExit(f"--runs: {unknown} are not runs of --suite={args.suite}: {names}")
    # Runs others start from (init_from) go first, e.g. noisy_full's warm start.
    # --runs trains in the order given (the one that matters most first); the others follow.
    queue = [*(args.runs or []), *(n for n in names if n not in (args.runs or []))]
    jobs = sorted(((name, seed) for seed in args.seeds for name in queue),
                  key=lambda job: not runs[job[0]].get("first", False))
    firsts = sum(1 for name, _ in jobs if runs[name].get("first"))

    def selected(name: str) -> bool:
        """Trained (and attacked) here: not a run another suite trains (`from_suite`)."""
        return (not args.report_only and (args.runs is None or name in args.runs)
                and "from_suite" not in runs.get(name, {}))

    from hamjax.cpu_devices import cpu_device_count

    first = build_config(args.suite, runs[names[0]], args.epochs, args.train_size)
    cpu_devices = cpu_device_count(args.cpu_devices, os.cpu_count() or 1,
                                   (first.train.batch_size, first.eval.batch_size))

    failed: list[str] = []

    def guarded(what: str, fn, *fn_args, **fn_kwargs):
        """fn(...), or None when its child process fails (a run stopped by a signal, a crash):
        the other runs go on and are reported, and the driver exits non-zero at the end."""
        try:
            return fn(*fn_args, **fn_kwargs)
        except subprocess.CalledProcessError as error:
            failed.append(f"{what} (exit status {error.returncode})")
            print(f"{what} failed with exit status {error.returncode}; its stdout.log says why",
                  file=sys.stderr, flush=True)
            return None

    # A run whose best checkpoint is its last is attacked once (the same weights).
    both = {"last", "best"} <= set(args.autoattack_checkpoints)

    def attack(name: str, seed: int, checkpoint: str) -> dict | None:
        """AutoAttack on one checkpoint of a finished run (cached in its workdir)."""
        return guarded(f"AutoAttack on {name} seed {seed} ({checkpoint})", autoattack_one,
                       workdir_of(args.root, args.suite, name, seed), args.autoattack_examples,
                       checkpoint, train=selected(name))

    def checkpoints(name: str, seed: int) -> list[str]:
        last_is_best = best_is_last(workdir_of(args.root, args.suite, name, seed))
        return [c for c in args.autoattack_checkpoints
                if not (both and c == "best" and last_is_best)]

    def train(job):
        report = guarded(f"training {job[0]} seed {job[1]}", run_one, args.suite, job[0],
                         args.epochs, args.train_size, args.root, job[1],
                         train=selected(job[0]), cpu_devices=cpu_devices)
        if report is not None and not runs[job[0]].get("first"):
            # Attacked as soon as it is trained, so that a queue of trainings behind it does not
            # hold its numbers back (a warm start waits: the runs fine-tuned from it go first).
            for checkpoint in checkpoints(*job):
                attack(job[0], job[1], checkpoint)
        return report

    with ThreadPoolExecutor(args.parallel) as pool:
        reports = list(pool.map(train, jobs[:firsts]))
        reports += list(pool.map(train, jobs[firsts:]))
    rows = [row(name, seed, r) for (name, seed), r in zip(jobs, reports, strict=True)
            if r is not None]
    step_json = read_step_times(step_times_path(args)) if is_shipped(args.suite) else {}

    def timing_of(suite: str, name: str, seed: int, report: dict) -> dict | None:
        """The run's step timing (its own, else a timed run's with the same step), where it
        trained as the timed steps ran (device kind and count): CPU timings price no GPU run."""
        devices = run_devices(workdir_of(args.root, suite, name, seed))
        if not timed_like(devices, step_json.get("machine", {})):
            return None
        key = timing_key(suite, name)
        timing, timed_as = timing_for(step_json.get("runs", {}), key, report.get("config"))
        if timing is not None and timed_as != key:
            timing = dict(timing, timed_as=timed_as)
        return timing
    for i, r in enumerate(rows):
        spec = runs[r["run"]]
        own_report = reports[jobs.index((r["run"], r["seed"]))]
        start = None
        if spec.get("cost_includes_start"):
            start_suite, start_name = (spec["init_from"] if isinstance(spec["init_from"], tuple)
                                       else (args.suite, spec["init_from"]))
            start_report = run_one(start_suite, start_name, args.epochs, args.train_size,
                                   args.root, r["seed"], train=False)
            label = f"{start_suite}/{start_name}"
            if start_report is not None and spec.get("init_epoch"):  # only what it started from
                start_report = report_until_epoch(start_report, spec["init_epoch"])
                label += f" (epochs 1-{spec['init_epoch']})"
            if start_report is not None:
                r = rows[i] = with_start_cost(r, own_report, start_report, label)
                start = (start_report,
                         timing_of(start_suite, start_name, r["seed"], start_report))
        timing = timing_of(args.suite, r["run"], r["seed"], own_report)
        rows[i] = priced_row(r, own_report, timing, start)
        borrowed = [t["timed_as"] for t in (timing, start and start[1])
                    if t is not None and "timed_as" in t]
        if borrowed and "quiet_seconds" in rows[i]:
            rows[i]["quiet_timed_as"] = " and ".join(borrowed)
    table = f"{args.suite}_{args.tag}" if args.tag else args.suite
    previous = read_previous(table)

    def workdir_row(r: dict) -> str:
        return workdir_of(args.root, args.suite, r["run"], r["seed"])

    evals = [(r, c) for c in args.autoattack_checkpoints for r in rows
             if c in checkpoints(r["run"], r["seed"])]
    with ThreadPoolExecutor(args.parallel) as pool:
        attacked = list(pool.map(lambda job: attack(job[0]["run"], job[0]["seed"], job[1]),
                                 evals))
    for (r, checkpoint), a in zip(evals, attacked, strict=True):
        if a is not None:
            r.setdefault("autoattack", {})[checkpoint] = a
    for r in rows:
        if both and "last" in r.get("autoattack", {}) and best_is_last(workdir_row(r)):
            r["autoattack"]["best"] = dict(r["autoattack"]["last"])
        for checkpoint, a in r.get("autoattack", {}).items():
            if r["run"] != "pgd_at":  # image by image against PGD-AT of the same seed
                baseline = workdir_of(args.root, args.suite, "pgd_at", r["seed"])
                # A baseline trained on an earlier machine is read from the sample its row
                # keeps in the suite's JSON; one trained here, only from its own workdir.
                kept = (None if os.path.exists(os.path.join(baseline, "report.json")) else
                        kept_sample(previous, "pgd_at", r["seed"], checkpoint))
                paired = paired_with(workdir_row(r), baseline, checkpoint, kept)
                if paired is not None:
                    a["paired_vs_pgd_at"] = paired
        if "per_class_adv_fraction" in r.get("method_state_last_epoch", {}):  # a CAAT run
            diagnosis = diagnose_routing(workdir_row(r), train=selected(r["run"]))
            if diagnosis is not None:
                r["routing_diagnosis"] = diagnosis
    per_seed = {}
    batch = first.train.batch_size  # every run and seed of a suite
    for seed in args.seeds:
        dirs = {name: workdir_of(args.root, args.suite, name, seed) for name in names}
        per_run = {name: [epoch_row(e) for e in epoch_records(d)] for name, d in dirs.items()}
        with_wall_ratios(per_run, windows={n: train_windows(d, batch) for n, d in dirs.items()})
        per_seed[seed] = per_run
    carried = carry_over(previous, rows, per_seed, args.seeds)
    order = suite_order(names)
    rows.sort(key=lambda r: (r["seed"], order(r["run"])))
    for seed in per_seed:
        per_seed[seed] = {n: per_seed[seed][n] for n in sorted(per_seed[seed], key=order)}
    finished = sum(not r["run"].endswith(EARLIER) for r in rows)  # an "(earlier)" row is extra
    shipped = is_shipped(args.suite)  # the setup's own budget, full split
    command = reproducing_command(args, shipped)
    machine = ({"trained_elsewhere": args.trained_elsewhere} if args.trained_elsewhere else
               {"platform": platform.platform(), "cpus": os.cpu_count(),
                "parallel_runs": args.parallel, "cpu_devices_per_run": cpu_devices})
    machine["devices_per_run"] = sorted({", ".join(d) for d in
                                         (run_devices(workdir_row(r)) for r in rows) if d})
    accelerators = [d for d in machine["devices_per_run"] if "cpu" not in d.lower()]
    where = (args.trained_elsewhere if args.trained_elsewhere else
             f"{accelerators[0]}, {args.parallel} runs side by side" if accelerators else
             f"{os.cpu_count()} CPU cores, {args.parallel} runs side by side")
    result = {"suite": args.suite, "command": command, "machine": machine,
              "epochs": None if shipped else args.epochs,
              "train_size": "full" if shipped else args.train_size, "seeds": args.seeds,
              "finished_runs": finished, "planned_runs": len(jobs),
              "carried_over_from_earlier_json": carried, "rows": rows,
              "per_epoch": {str(k): v for k, v in per_seed.items()}}
    if step_json:
        result["step_times"] = {"path": os.path.relpath(step_times_path(args), REPO),
                                "command": step_json["command"],
                                "machine": step_json["machine"]}
    plot = frontier_path(table)
    plotted = frontier_plot(rows, plot)
    text = results_text(args.suite, rows, per_seed, command, finished, len(jobs), where,
                        carried, os.path.basename(plot) if plotted else None,
                        step_json.get("command"), step_json.get("machine"))
    print(json.dumps(result, indent=1))
    print(text)
    for path in write_results(table, result, text):
        print(f"wrote {path}")
    if failed:
        raise SystemExit(f"failed: {'; '.join(failed)} (rerun the same command to resume them)")



if __name__ == "__main__":
    main()
