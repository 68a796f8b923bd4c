"""Real Fashion-MNIST comparisons the README quotes, sized for 2 CPU cores.

    python benchmarks/fashion_mnist_compare.py --suite=ham_full --seeds 0 1 2
                                      # the shipped configs/fashion_mnist_{pgdat,ham}.py on the
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
Writes benchmarks/results/fashion_mnist_<suite>.json and .md, and the README's table between
its `<!-- fashion_mnist_<suite> -->` markers; `--report_only` rewrites them from what the
workdirs hold now (unfinished runs contribute their finished epochs) without training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(config, *, epochs: int, train_size: int, noise: str | None, steps: int,
           seed: int) -> None:
    """The shared budget: same data, model, attack strength, schedule and evaluation."""
    config.seed = seed  # also draws the validation split and the training subset
    config.data.name = "fashion_mnist"
    config.data.train_size = train_size
    config.data.val_size = 1000
    config.data.meta_per_class = 100  # held out for every method, so training pools are equal
    config.data.augment.crop_pad = 2
    config.data.augment.flip = False
    if noise:
        config.data.label_noise.kind, config.data.label_noise.rate = noise, 0.2
    config.model.name = "small_cnn"
    config.attack.eps, config.attack.steps = 0.1, steps
    config.attack.step_size = 2.5 * 0.1 / steps  # 0.025 at K = 10, as eps / 4
    config.eval.eps, config.eval.step_size, config.eval.steps = 0.1, 0.025, 20
    config.eval.num_examples = 1000
    config.eval.select_on = "robust_average"
    config.train.epochs = epochs
    config.train.batch_size = 128
    config.train.lr = 0.05
    config.train.lr_schedule = "piecewise"
    config.train.lr_boundaries = (epochs - 1,)
    config.train.lr_values = (0.005,)
    config.train.weight_decay = 5e-4
    config.train.log_every_steps = 20
    config.train.checkpoint_every_steps = 100


# Suites that train the shipped configs as they are (only the seed and the save interval set).
SHIPPED = {
    "ham_full": {"pgd_at": "configs/fashion_mnist_pgdat.py", "ham": "configs/fashion_mnist_ham.py"},
}


def suite_runs(suite: str) -> dict[str, dict]:
    """Run name -> method name and method overrides (or the shipped config file)."""
    if suite in SHIPPED:
        return {name: {"config_file": path} for name, path in SHIPPED[suite].items()}
    if suite == "ham":
        return {
            "pgd_at": {"method": "pgd_at"},
            "ham": {"method": "ham", "overrides": {"warmup_epochs": 1, "mining_step": 3}},
        }
    if suite == "noisy":
        return {
            "pgd_at": {"method": "pgd_at"},
            "trades": {"method": "trades", "overrides": {"beta": 6.0}},
            "frl_rwrm": {"method": "frl_rwrm"},
            "caat": {"method": "caat"},
            "caat_floor0.5": {"method": "caat", "overrides": {"adv_weight_floor": 0.5}},
            # The official meta_interval (50) counts batches within an epoch: with 46 batches
            # per epoch here the meta step never fires, so this run meta-updates every 10.
            "caat_meta10": {"method": "caat", "overrides": {"meta_interval": 10}},
        }
    if suite == "noisy_full":
        return noisy_full_runs()
    raise SystemExit(f"--suite={suite!r}: choose ham_full, noisy_full, ham or noisy")


NOISY_FULL_VARIANT = "pairflip20"  # 20% pair-flip (Meta-Weight-Net's flip2), CAAT's noisy runs


def noisy_full_runs() -> dict[str, dict]:
    """20% pair-flip noise on the full training split: a PGD-AT warm start (the shipped PGD-AT
    config), then every method fine-tuned from it on the shipped CAAT config's budget (4 epochs
    at lr 0.005, K = 5), as the official CAAT runs start from a robust model. Every run holds
    out the same validation split and clean balanced meta set, so the training pools are
    equal."""
    runs: dict[str, dict] = {"warm_start": {"config_file": "configs/fashion_mnist_pgdat.py",
                                            "first": True}}
    # PGD-AT and the CAAT variant first: with runs side by side, the main comparison lands first.
    for name, method, overrides in (
            ("pgd_at", "pgd_at", {}), ("caat_floor0.5", "caat", {"adv_weight_floor": 0.5}),
            ("caat", "caat", {}),
            # A router initialisation that sends about half of the examples, and most of
            # classes 1, 7, 8 and 9, to the anti-adversary (benchmarks/caat_routing.py).
            ("caat_floor0.5_init1", "caat", {"adv_weight_floor": 0.5, "meta_init_seed": 1}),
            ("trades", "trades", {"beta": 6.0}), ("frl_rwrm", "frl_rwrm", {}),
            ("caat_init1", "caat", {"meta_init_seed": 1})):
        runs[name] = {"config_file": "configs/fashion_mnist_caat.py", "method": method,
                      "overrides": overrides, "init_from": "warm_start"}
    return runs


def shipped_config(path: str, seed: int):
    """A shipped config file's get_config(), at `seed`, saving often enough to resume."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("shipped_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.seed = seed
    config.train.checkpoint_every_steps = 150
    return config


def build_config(suite: str, run: dict, epochs: int, train_size: int, seed: int = 0,
                 root: str | None = None):
    from hamjax.config import base_config, method_config

    if "config_file" in run:
        config = shipped_config(run["config_file"], seed)
        if suite == "noisy_full":
            from hamjax.data.scenarios import apply_scenario

            apply_scenario(config.data, NOISY_FULL_VARIANT)
            config.data.val_size, config.data.meta_per_class = 2000, 100
        if "method" in run:
            config.method = method_config(run["method"], **run.get("overrides", {}))
        if "init_from" in run:
            if root is None:
                raise ValueError(f"run {run} fine-tunes another run: pass root")
            config.train.init_from = workdir_of(root, suite, run["init_from"], seed)
        return config
    config = base_config()
    config.method = method_config(run["method"], **run.get("overrides", {}))
    # HAM's saving depends on K, so its suite keeps the paper's K = 10; the noisy suite uses
    # K = 5 (CAAT runs two attacks per step) to fit 2 CPU cores.
    common(config, epochs=epochs, train_size=train_size,
           noise="flip2" if suite == "noisy" else None, steps=10 if suite == "ham" else 5,
           seed=seed)
    return config


def workdir_of(root: str, suite: str, name: str, seed: int) -> str:
    return os.path.join(root, suite, name) if seed == 0 else os.path.join(
        root, suite, f"seed{seed}", name)


def run_one(suite: str, name: str, epochs: int, train_size: int, root: str, seed: int,
            train: bool = True, cpu_devices: int = 1) -> dict | None:
    """Trains one run in a subprocess (isolates XLA memory; resumable) on `cpu_devices` host
    devices (an XLA_FLAGS device count of the caller's wins) and reads its report (None when it
    has none and `train` is False)."""
    workdir = workdir_of(root, suite, name, seed)
    report_path = os.path.join(workdir, "report.json")
    if train and not os.path.exists(report_path):
        bench_dir = os.path.join(REPO, "benchmarks")
        code = (
            f"import sys; sys.path.insert(0, {bench_dir!r})\n"
            "from fashion_mnist_compare import build_config, suite_runs\n"
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


def child_env(cpu_devices: int) -> dict[str, str]:
    """The environment of a training child: `cpu_devices` host devices, as launch.py's
    --cpu_devices sets them (the device count changes the float sums, so it is part of what
    reproduces a run)."""
    from hamjax.cpu_devices import with_cpu_devices

    return dict(os.environ, XLA_FLAGS=with_cpu_devices(os.environ.get("XLA_FLAGS", ""),
                                                      cpu_devices))


def autoattack_one(workdir: str, examples: int, checkpoint: str = "last",
                   train: bool = True) -> dict | None:
    """PGD-20 and AutoAttack (standard) on a class-stratified subset of `examples` test images
    of one checkpoint ("last" or "best" on validation), through `python -m hamjax.evaluate`
    (resumable); None when not run. Robust = correct clean and after both attacks."""
    path = os.path.join(workdir, "eval", f"test_{checkpoint}.json")
    other = os.path.join(workdir, "eval", f"test_{'best' if checkpoint == 'last' else 'last'}.json")
    if not os.path.exists(path) and os.path.exists(other) and best_is_last(workdir):
        path = other  # the same weights: evaluated once
    if (train and examples > 0 and not os.path.exists(path)
            and os.path.exists(os.path.join(workdir, "report.json"))):
        with open(os.path.join(workdir, "stdout.log"), "a") as log:
            subprocess.run([sys.executable, "-m", "hamjax.evaluate", f"--workdir={workdir}",
                            "--attacks=pgd20,autoattack", f"--num_examples={examples}",
                            f"--checkpoint={checkpoint}", "--cpu_devices=1"],
                           check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    robust = result["combined"]["robust"]
    return {"examples": result["num_examples"], "clean_avg": result["clean"]["average"],
            "clean_worst": result["clean"]["worst"], "robust_avg": robust["average"],
            "robust_worst": robust["worst"], "seconds": round(result["seconds"], 1),
            "epoch": result.get("checkpoint_epoch")}


def diagnose_routing(workdir: str, train: bool = True) -> dict | None:
    """`benchmarks/caat_routing.py` on a finished CAAT run's last checkpoint (cached in
    `<workdir>/routing_diagnosis.json`); None when not run."""
    path = os.path.join(workdir, "routing_diagnosis.json")
    if train and not os.path.exists(path) and os.path.exists(os.path.join(workdir,
                                                                          "report.json")):
        with open(os.path.join(workdir, "stdout.log"), "a") as log:
            subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "caat_routing.py"),
                            f"--workdir={workdir}", f"--out={path}"], check=True, stdout=log,
                           stderr=subprocess.STDOUT, cwd=REPO)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def diagnosis_markdown(rows: list[dict]) -> str:
    """Per diagnosed CAAT run: did the router learn, is it a class decision, does it find the
    mislabelled examples (`hamjax.analysis.caat_routing`)."""
    lines = ["| run | seed | T | floor | meta steps | weight drift | same as initial router "
             "| routed with class majority | same without class features | to adversary "
             "| anti share: mislabelled / correct |", "|---" * 11 + "|"]
    for r in rows:
        d = r.get("routing_diagnosis")
        if not d:
            continue
        lines.append(
            f"| {r['run']} | {r['seed']} | {d['temperature']:g} | {d['adv_weight_floor']:g} | "
            f"{d['meta_updates']} | {d['meta_weight_drift']:.4f} | "
            f"{d['agreement_with_initial_router']:.3f} | {d['class_majority_agreement']:.3f} | "
            f"{d['agreement_without_class_features']:.3f} | {d['adv_fraction']:.3f} | "
            f"{d['anti_share_mislabelled']:.3f} / {d['anti_share_correctly_labelled']:.3f} |")
    if len(lines) == 2:
        return ""
    lottery = next((r["routing_diagnosis"].get("initialisation_lottery") for r in rows
                    if r.get("routing_diagnosis", {}).get("initialisation_lottery")), None)
    if lottery:  # the same examples and model, untrained routers of other seeds
        lines += ["", "| meta-net init seed | to adversary | routed with class majority "
                  "| classes sent >= 90% to the anti-adversary |", "|---|---|---|---|"]
        for e in lottery:
            anti = [str(c) for c, p in enumerate(e["per_class_adv_fraction"])
                    if p is not None and p <= 0.1]
            lines.append(f"| {e['seed']} | {e['adv_fraction']:.3f} | "
                         f"{e['class_majority_agreement']:.3f} | {', '.join(anti) or '-'} |")
    return "\n".join(lines)


def best_is_last(workdir: str) -> bool:
    """Whether the validation-selected checkpoint is the last one (same step)."""
    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        results = json.load(f)["results"]
    best = results.get("best_on_val")
    return best is not None and best.get("step") == results["last"].get("step")


def run_devices(workdir: str) -> list[str]:
    """The devices a run trained on, from its metrics.jsonl `run` record ([] if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "run":
                return list(record.get("devices", []))
    return []


def epoch_records(workdir: str) -> list[dict]:
    """The finished epochs' records of a run, finished or not (the last record of each epoch:
    a resumed run may have logged an epoch again)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_epoch = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "epoch":
                by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def epoch_row(record: dict) -> dict:
    """Per epoch: wall time, ledger ratio, hard fraction, bucket histogram, validation."""
    metrics = record.get("train_metrics", {})
    out = {"epoch": record["epoch"], "train_seconds": round(record["train_seconds"], 1),
           "ledger_ratio": round(record["ledger"]["relative_to_pgd_at"], 4)}
    for key in ("warmup", "hard_fraction", "train_fraction", "bucket_fraction", "empty_batch"):
        if key in metrics:
            out[key] = round(metrics[key], 4)
    shares = {k.split("/", 1)[1]: round(v, 4) for k, v in metrics.items()
              if k.startswith("bucket_share/") and v > 0}
    if shares:
        out["bucket_histogram"] = shares
    method = record.get("method") or {}
    if "per_class_adv_fraction" in method:  # CAAT: the share routed to the adversary, per class
        out["adv_fraction"] = method.get("adv_fraction")
        out["adv_fraction_per_class"] = method["per_class_adv_fraction"]
    if "val" in record:
        out["val_robust_avg"] = record["val"]["robust"]["average"]
        out["val_robust_worst"] = record["val"]["robust"]["worst"]
    return out


def train_windows(workdir: str, batch: int) -> list[tuple[int, float, float, float]]:
    """(0-based epoch, start, end, images/s) of every logged training interval of a run, in
    wall-clock seconds: each `train` record's rate covers the steps since the previous record
    of its epoch, since the epoch began, or since the step a resumed run restarted from."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    if not epochs:
        return []
    steps_per_epoch = epochs[0]["step"] // epochs[0]["epoch"]
    windows, last_step = [], 0
    for r in records:
        if r.get("kind") == "run":  # a (re)start: intervals count from the restored step
            last_step = r["step"]
        if r.get("kind") != "train":
            continue
        epoch = r["epoch"]
        begin = max(last_step, epoch * steps_per_epoch)  # a rate never spans an epoch's end
        last_step = r["step"]
        if r["images_per_s"] <= 0 or r["step"] <= begin:
            continue
        seconds = (r["step"] - begin) * batch / r["images_per_s"]
        windows.append((epoch, r["time"] - seconds, r["time"], r["images_per_s"]))
    return windows


def same_window_ratios(runs: list, reference: list, min_cover: float = 0.9) -> dict[int, float]:
    """Per 1-based epoch of `runs`: the median over its logged intervals of (its seconds per
    image) / (the reference's seconds per image over the same wall-clock interval), using only
    intervals the reference was training through (>= `min_cover` of it): the two processes
    shared the cores then, so load hits both alike."""
    by_epoch: dict[int, list[float]] = {}
    for epoch, start, end, rate in runs:
        covered, images = 0.0, 0.0
        for _, r_start, r_end, r_rate in reference:
            overlap = min(end, r_end) - max(start, r_start)
            if overlap > 0:
                covered += overlap
                images += overlap * r_rate
        if covered >= min_cover * (end - start):
            by_epoch.setdefault(epoch + 1, []).append((images / covered) / rate)
    return {e: round(statistics.median(v), 3) for e, v in sorted(by_epoch.items())}


def with_wall_ratios(per_run: dict[str, list[dict]], reference: str = "pgd_at",
                     windows: dict[str, list] | None = None) -> None:
    """Adds to every epoch row its wall time over the reference run's same epoch, its median
    same-window ratio to the reference (`same_window_ratios`, when `windows` are given: the
    honest one once the runs drift apart in epochs) and, for HAM, its wall time over the mean
    of its own warm-up epochs (which are PGD-AT steps)."""
    ref = {r["epoch"]: r["train_seconds"] for r in per_run.get(reference, [])}
    for name, rows in per_run.items():
        if windows and name != reference and windows.get(reference):
            same = same_window_ratios(windows.get(name, []), windows[reference])
            for r in rows:
                if r["epoch"] in same:
                    r["wall_ratio_same_window"] = same[r["epoch"]]
        warm = [r["train_seconds"] for r in rows if r.get("warmup") == 1.0]
        for r in rows:
            if r["epoch"] in ref:
                r["wall_ratio_vs_pgd_at"] = round(r["train_seconds"] / ref[r["epoch"]], 3)
            if warm and r.get("warmup") == 0.0:
                r["wall_ratio_vs_own_warmup"] = round(r["train_seconds"] / (sum(warm) / len(warm)),
                                                      3)


def row(name: str, seed: int, report: dict) -> dict:
    """The headline numbers of one run (test split, clean labels)."""
    out = {"run": name, "seed": seed}
    for key in ("last", "best_on_val"):
        res = report["results"].get(key)
        if res is None:
            continue
        out[key] = {
            "clean_avg": res["clean"]["average"], "clean_worst": res["clean"]["worst"],
            "robust_avg": res["robust"]["average"], "robust_worst": res["robust"]["worst"],
            "epoch": res.get("epoch"), "clean_per_class": res["clean"].get("per_class"),
            "robust_per_class": res["robust"].get("per_class"),
        }
    out["cost_vs_pgd_at"] = report["cost"]["relative_to_pgd_at"]
    out["train_seconds"] = report["cost"]["train_seconds_excluding_compile"]
    last_epoch = report["epochs"][-1]
    if "method" in last_epoch:
        out["method_state_last_epoch"] = last_epoch["method"]
    metrics = last_epoch.get("train_metrics", {})
    for key in ("hard_fraction", "adv_fraction", "routed_adv_fraction"):
        if key in metrics:
            out[f"last_epoch_{key}"] = metrics[key]
    return out


HEADLINE = ("clean_avg", "clean_worst", "robust_avg", "robust_worst")


def table_line(label: str, m: dict, cost: float, seconds: float) -> str:
    cells = " | ".join(f"{100 * m[k]:.1f}" for k in HEADLINE)
    return f"| {label} | {cells} | {cost:.2f} | {seconds:.0f} |"


def spread_line(label: str, results: list[dict]) -> tuple[str, dict]:
    """Mean over seeds of the headline numbers, with their spread (max - min) in the label."""
    m = {k: sum(r[k] for r in results) / len(results) for k in HEADLINE}
    spread = " / ".join(f"{100 * (max(r[k] for r in results) - min(r[k] for r in results)):.1f}"
                        for k in HEADLINE)
    return label.format(n=len(results), spread=spread), m


def mean_rows(rows: list[dict]) -> list[str]:
    """Per run and checkpoint, the mean and spread (max - min) over seeds."""
    lines = []
    for name in dict.fromkeys(r["run"] for r in rows):
        for key in ("last", "best_on_val"):
            mine = [r for r in rows if r["run"] == name and key in r]
            if len(mine) < 2:
                continue
            label, m = spread_line(f"{name} ({key}, mean of {{n}} seeds; spread {{spread}})",
                                   [r[key] for r in mine])
            lines.append(table_line(label, m, sum(r["cost_vs_pgd_at"] for r in mine) / len(mine),
                                    sum(r["train_seconds"] for r in mine) / len(mine)))
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| run | clean avg | clean worst | PGD-20 avg | PGD-20 worst | cost vs PGD-AT "
             "| train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("last", "best_on_val"):
            if key in r:
                lines.append(table_line(f"{r['run']} seed {r['seed']} ({key})", r[key],
                                        r["cost_vs_pgd_at"], r["train_seconds"]))
    return "\n".join(lines + mean_rows(rows))


def autoattack_markdown(rows: list[dict]) -> str:
    """Per run, seed and evaluated checkpoint; then per run and checkpoint the mean over seeds
    with its spread."""
    lines = ["| run | seed | checkpoint (epoch) | test images | clean avg | clean worst "
             "| AutoAttack avg | AutoAttack worst |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for checkpoint, a in sorted(r.get("autoattack", {}).items(), reverse=True):
            lines.append(f"| {r['run']} | {r['seed']} | {checkpoint} ({a['epoch']}) | "
                         f"{a['examples']} | "
                         + " | ".join(f"{100 * a[k]:.1f}" for k in HEADLINE) + " |")
    for name in dict.fromkeys(r["run"] for r in rows):
        for checkpoint in ("last", "best"):
            mine = [r["autoattack"][checkpoint] for r in rows
                    if r["run"] == name and checkpoint in r.get("autoattack", {})]
            if len(mine) < 2:
                continue
            label, m = spread_line(f"| {name} | mean of {{n}} (spread {{spread}}) | {checkpoint} "
                                   f"| {mine[0]['examples']} |", mine)
            lines.append(label + " " + " | ".join(f"{100 * m[k]:.1f}" for k in HEADLINE) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def epochs_markdown(per_seed: dict[int, dict[str, list[dict]]]) -> str:
    """One line per run and epoch: the per-epoch record the issue asks for."""
    lines = ["| seed | run | epoch | train s | wall / PGD-AT, same window | ledger / PGD-AT "
             "| hard frac | buckets run (share of steps) | val PGD-20 avg / worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed, per_run in per_seed.items():
        for name, rows in per_run.items():
            for r in rows:
                hist = ", ".join(f"{k}: {v:.2f}" for k, v in r.get("bucket_histogram", {}).items())
                if r.get("warmup") == 1.0:
                    hist = "warm-up (PGD-AT)"
                val = (f"{100 * r['val_robust_avg']:.1f} / {100 * r['val_robust_worst']:.1f}"
                       if "val_robust_avg" in r else "")
                hard = f"{r['hard_fraction']:.3f}" if r.get("warmup") == 0.0 else ""
                wall = r.get("wall_ratio_same_window")
                lines.append(
                    f"| {seed} | {name} | {r['epoch']} | {r['train_seconds']:.0f} | "
                    f"{'' if wall is None else f'{wall:.2f}'} | {r['ledger_ratio']:.2f} | "
                    f"{hard} | {hist} | {val} |")
    return "\n".join(lines)


def per_class_markdown(rows: list[dict], key: str = "last") -> str:
    """Per run and seed, test clean / PGD-20 accuracy of every class (`key` checkpoint)."""
    lines = []
    for r in rows:
        res = r.get(key) or {}
        if not res.get("clean_per_class"):
            continue
        if not lines:
            n = len(res["clean_per_class"])
            lines = [f"| run | seed | {' | '.join(f'class {c}' for c in range(n))} |",
                     "|---|---|" + "---|" * n]
        cells = " | ".join(f"{100 * c:.0f} / {100 * p:.0f}" for c, p in
                           zip(res["clean_per_class"], res["robust_per_class"], strict=True))
        lines.append(f"| {r['run']} | {r['seed']} | {cells} |")
    return "\n".join(lines)


def routing_markdown(per_seed: dict[int, dict[str, list[dict]]]) -> str:
    """Per CAAT run and epoch, the share of each class's examples routed to the adversary."""
    lines = []
    for seed, per_run in per_seed.items():
        for name, epochs in per_run.items():
            for e in epochs:
                if "adv_fraction_per_class" not in e:
                    continue
                if not lines:
                    n = len(e["adv_fraction_per_class"])
                    lines = [f"| seed | run | epoch | all | "
                             f"{' | '.join(f'class {c}' for c in range(n))} |",
                             "|---|---|---|---|" + "---|" * n]
                cells = " | ".join("" if v is None else f"{v:.2f}"
                                   for v in e["adv_fraction_per_class"])
                overall = e.get("adv_fraction")
                lines.append(f"| {seed} | {name} | {e['epoch']} | "
                             f"{'' if overall is None else f'{overall:.2f}'} | {cells} |")
    return "\n".join(lines)


EARLIER = " (earlier)"  # the label of a carried row whose run was trained again here


def carry_over(previous: dict | None, rows: list[dict], per_seed: dict[int, dict[str, list]],
               seeds: list[int]) -> list[str]:
    """Adds to `rows` and `per_seed` the runs of `seeds` that the suite's earlier JSON holds and
    this machine's workdirs do not (run on an earlier machine whose `runs/` is gone); returns
    their names ("run/seed"). A run trained here again that ended with other numbers keeps its
    earlier row too, as "<run> (earlier)": runs fine-tuned from the earlier warm start are then
    read against the baselines that came from it. Carried rows keep their numbers, routing
    diagnosis and per-epoch records as they were written."""
    if not previous:
        return []
    here = {(r["run"], r["seed"]): r for r in rows}
    carried = []
    for r in previous.get("rows", []):
        if r["seed"] not in seeds:
            continue
        key = (r["run"], r["seed"])
        if key in here and here[key].get("last") == r.get("last"):
            continue  # the same run (its workdir is here): nothing to carry
        name = r["run"] if key not in here else r["run"] + EARLIER
        if (name, r["seed"]) in here:
            continue
        rows.append(dict(r, run=name))
        carried.append(f"{name}/{r['seed']}")
        old_epochs = previous.get("per_epoch", {}).get(str(r["seed"]), {}).get(r["run"])
        mine = per_seed.setdefault(r["seed"], {})
        if old_epochs and not mine.get(name):
            mine[name] = old_epochs
    return carried


def suite_order(names: list[str]):
    """Sort key of a run name: the suite's order, each "<run> (earlier)" right after its run."""
    order = {name: i for i, name in enumerate(names)}

    def key(name: str) -> tuple[int, bool]:
        base = name.removesuffix(EARLIER)
        return order.get(base, len(order)), name.endswith(EARLIER)
    return key


def write_readme_table(suite: str, text: str, readme: str = os.path.join(REPO, "README.md")
                       ) -> bool:
    """Replaces the README's text between `<!-- fashion_mnist_<suite> -->` and
    `<!-- /fashion_mnist_<suite> -->`; False when the README has no such markers."""
    begin, end = f"<!-- fashion_mnist_{suite} -->", f"<!-- /fashion_mnist_{suite} -->"
    with open(readme) as f:
        body = f.read()
    if begin not in body or end not in body:
        return False
    head, rest = body.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")
    return True


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
                        help="train (and attack) only these runs of the suite; the others are "
                             "reported from their workdirs or carried over from the suite's JSON")
    parser.add_argument("--report_only", action="store_true",
                        help="write the tables from what the workdirs hold now; train nothing")
    parser.add_argument("--tag", default="",
                        help="results as fashion_mnist_<suite>_<tag> (JSON, .md, README "
                             "markers), beside the suite's own, e.g. for another machine")
    parser.add_argument("--trained_elsewhere", default="",
                        help="with --report_only: what trained the workdirs under --root, and "
                             "on what (a command and a machine); replaces this machine in the "
                             "JSON and the caption")
    return parser


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
    jobs = sorted(((name, seed) for seed in args.seeds for name in names),
                  key=lambda job: not runs[job[0]].get("first", False))
    firsts = sum(1 for name, _ in jobs if runs[name].get("first"))

    def selected(name: str) -> bool:
        return not args.report_only and (args.runs is None or name in args.runs)

    from hamjax.cpu_devices import cpu_device_count

    first = build_config(args.suite, runs[names[0]], args.epochs, args.train_size)
    cpu_devices = cpu_device_count(args.cpu_devices, os.cpu_count() or 1,
                                   (first.train.batch_size, first.eval.batch_size))

    def train(job):
        return run_one(args.suite, job[0], args.epochs, args.train_size, args.root, job[1],
                       train=selected(job[0]), cpu_devices=cpu_devices)

    with ThreadPoolExecutor(args.parallel) as pool:
        reports = list(pool.map(train, jobs[:firsts]))
        reports += list(pool.map(train, jobs[firsts:]))
    rows = [row(name, seed, r) for (name, seed), r in zip(jobs, reports, strict=True)
            if r is not None]
    def workdir_row(r: dict) -> str:
        return workdir_of(args.root, args.suite, r["run"], r["seed"])

    # A run whose best checkpoint is its last is attacked once (the same weights).
    both = {"last", "best"} <= set(args.autoattack_checkpoints)
    evals = [(r, c) for c in args.autoattack_checkpoints for r in rows
             if not (both and c == "best" and best_is_last(workdir_row(r)))]
    with ThreadPoolExecutor(args.parallel) as pool:
        attacked = list(pool.map(lambda job: autoattack_one(
            workdir_row(job[0]), args.autoattack_examples, job[1], train=selected(job[0]["run"])),
            evals))
    for (r, checkpoint), a in zip(evals, attacked, strict=True):
        if a is not None:
            r.setdefault("autoattack", {})[checkpoint] = a
    for r in rows:
        if both and "last" in r.get("autoattack", {}) and best_is_last(workdir_row(r)):
            r["autoattack"]["best"] = r["autoattack"]["last"]
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
    table = f"{args.suite}_{args.tag}" if args.tag else args.suite
    out = os.path.join(REPO, "benchmarks", "results", f"fashion_mnist_{table}")
    previous = None
    if os.path.exists(out + ".json"):
        with open(out + ".json") as f:
            previous = json.load(f)
    carried = carry_over(previous, rows, per_seed, args.seeds)
    order = suite_order(names)
    rows.sort(key=lambda r: (r["seed"], order(r["run"])))
    for seed in per_seed:
        per_seed[seed] = {n: per_seed[seed][n] for n in sorted(per_seed[seed], key=order)}
    finished = sum(not r["run"].endswith(EARLIER) for r in rows)  # an "(earlier)" row is extra
    shipped = all("config_file" in r for r in runs.values())  # shipped configs, full split
    command = reproducing_command(args, shipped)
    machine = ({"trained_elsewhere": args.trained_elsewhere} if args.trained_elsewhere else
               {"platform": platform.platform(), "cpus": os.cpu_count(),
                "parallel_runs": args.parallel, "cpu_devices_per_run": cpu_devices})
    machine["devices_per_run"] = sorted({", ".join(d) for d in
                                         (run_devices(workdir_row(r)) for r in rows) if d})
    where = (args.trained_elsewhere if args.trained_elsewhere else
             f"{os.cpu_count()} CPU cores, {args.parallel} runs side by side")
    result = {"suite": args.suite, "command": command, "machine": machine,
              "epochs": None if shipped else args.epochs,
              "train_size": "full" if shipped else args.train_size, "seeds": args.seeds,
              "finished_runs": finished, "planned_runs": len(jobs),
              "carried_over_from_earlier_json": carried, "rows": rows,
              "per_epoch": {str(k): v for k, v in per_seed.items()}}
    aa = autoattack_markdown(rows)
    per_class = per_class_markdown(rows) if args.suite.startswith("noisy") else ""
    routing = routing_markdown(per_seed)
    diagnosis = diagnosis_markdown(rows)
    text = (f"{markdown(rows)}\n\n"
            + (f"AutoAttack (standard; last and best-on-validation checkpoints; robust = "
               f"correct clean and after PGD-20 and AutoAttack; spread = max - min over seeds "
               f"of the four numbers):\n\n{aa}\n\n" if aa else "")
            + f"Per epoch:\n\n{epochs_markdown(per_seed)}\n\n"
            + (f"Per class, last checkpoint, test clean / PGD-20 (%):\n\n{per_class}\n\n"
               if per_class else "")
            + (f"Share of each class's examples CAAT routed to the adversary, per epoch:\n\n"
               f"{routing}\n\n" if routing else "")
            + (f"CAAT's router on 20,000 training-pool examples, last checkpoint "
               f"(`benchmarks/caat_routing.py`):\n\n{diagnosis}\n\n" if diagnosis else "")
            + f"`{command}` ({finished} of {len(jobs)} runs finished; {where})."
            + (f" Carried over from the earlier JSON (their workdirs were on an earlier "
               f"machine; \"(earlier)\": a run trained again here): {', '.join(carried)}."
               if carried else ""))
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    print(json.dumps(result, indent=1))
    print(text)
    if not write_readme_table(table, text):
        print(f"(README.md has no <!-- fashion_mnist_{table} --> markers: not updated)")


if __name__ == "__main__":
    main()
