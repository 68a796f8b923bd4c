"""Reading the Fashion-MNIST comparison's workdirs: reports, per-epoch records, logged training
intervals (for same-window wall-time ratios) and the devices a run trained on."""

from __future__ import annotations

import json
import os
import statistics


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
        attack = record["val"].get("attack", "PGD-20")  # the selection attack's name
        out["val_attack"] = {"apgd": "APGD-CE+T"}.get(attack, attack)
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


def report_until_epoch(report: dict, epoch: int) -> dict:
    """A finished run's report cut to its first `epoch` epochs, for a fine-tune that started
    from the end of that epoch (`train.init_epoch`): its epochs, and its cost summed over them.
    `relative_to_pgd_at` stays against the whole run's PGD-AT equivalent, the baseline a
    fine-tune's total cost reads against (`with_start_cost`): 6 of 12 PGD-AT epochs are 0.5."""
    epochs = report["epochs"][:epoch]
    if len(epochs) < epoch:
        raise ValueError(f"the start run has {len(report['epochs'])} epochs, not {epoch}")
    whole = report["cost"]
    baseline = (whole["forward_passes"] + whole["backward_passes"]) / whole["relative_to_pgd_at"]
    forward = sum(e["ledger"]["forward"] for e in epochs)
    backward = sum(e["ledger"]["backward"] for e in epochs)
    cost = dict(whole, forward_passes=forward, backward_passes=backward,
                relative_to_pgd_at=(forward + backward) / baseline,
                train_seconds_excluding_compile=sum(e["train_seconds"] for e in epochs))
    return dict(report, epochs=epochs, cost=cost)


def with_start_cost(r: dict, report: dict, start: dict, start_name: str) -> dict:
    """Row `r` of a run that fine-tunes another (`report` its own, `start` the other's) with that
    run's training counted in: train seconds added, and `cost_vs_pgd_at` the passes of both
    against the PGD-AT equivalent of the start's whole run (`passes / relative_to_pgd_at`; for a
    start cut by `report_until_epoch`, still the whole run's). FAAL's true cost is a robust model
    plus its fine-tune. The fine-tune's own numbers stay under `*_own`."""
    own, src = report["cost"], start["cost"]
    own_passes = own["forward_passes"] + own["backward_passes"]
    src_passes = src["forward_passes"] + src["backward_passes"]
    pgd_at_passes = src_passes / src["relative_to_pgd_at"]
    return dict(r, cost_vs_pgd_at=(src_passes + own_passes) / pgd_at_passes,
                train_seconds=r["train_seconds"] + src["train_seconds_excluding_compile"],
                cost_vs_pgd_at_own=r["cost_vs_pgd_at"], train_seconds_own=r["train_seconds"],
                cost_includes=start_name)


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
