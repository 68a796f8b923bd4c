"""Follow-ups on finished runs of the Fashion-MNIST comparison, each cached in the run's workdir:
PGD-20 + AutoAttack through `python -m hamjax.evaluate`, and CAAT's routing diagnosis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fashion_mnist_logs import best_is_last

from hamjax.metrics import wilson_interval

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
            "robust_worst": robust["worst"], **worst_interval(result),
            "seconds": round(result["seconds"], 1), "epoch": result.get("checkpoint_epoch")}


def worst_interval(result: dict) -> dict:
    """The robust worst class's 95% Wilson interval from its images, as
    {"robust_worst_ci95": [lo, hi]} (nothing for an evaluation without counts)."""
    counts = result.get("counts", {}).get("combined")
    worst = result["combined"]["robust"]["worst_class"]
    if not counts or worst < 0:
        return {}
    lo, hi = wilson_interval([counts["correct"][worst]], [counts["total"][worst]])
    return {"robust_worst_ci95": [round(float(lo[0]), 4), round(float(hi[0]), 4)]}


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
