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


def eval_path(workdir: str, checkpoint: str) -> str:
    """Where `python -m hamjax.evaluate` keeps a checkpoint's test evaluation: its own file, or
    the other checkpoint's when the best checkpoint is the last (the same weights)."""
    path = os.path.join(workdir, "eval", f"test_{checkpoint}.json")
    other = os.path.join(workdir, "eval", f"test_{'best' if checkpoint == 'last' else 'last'}.json")
    if not os.path.exists(path) and os.path.exists(other) and best_is_last(workdir):
        return other
    return path


def sample_record(result: dict) -> dict | None:
    """What a later pairing needs of an evaluation, kept in the suite's JSON so that it outlives
    the workdir: the fields that name the images and budget, the labels (one string) and the
    per-image flags; None for an evaluation without per-image results."""
    from hamjax.evaluation.paired import SAMPLE_FIELDS

    saved = result.get("per_example")
    if not saved:
        return None
    return {**{k: result.get(k) for k in SAMPLE_FIELDS},
            "class_names": list(result.get("class_names") or []),
            "attacks": list(result["combined"]["attacks"]),
            "labels": ",".join(str(int(v)) for v in saved["labels"]),
            **{k: v for k, v in saved.items() if k != "labels"}}


def from_sample_record(sample: dict) -> dict:
    """The evaluation-JSON shape `hamjax.evaluation.paired` reads, rebuilt from a
    `sample_record`."""
    from hamjax.evaluation.paired import SAMPLE_FIELDS

    named = (*SAMPLE_FIELDS, "class_names", "attacks", "labels")
    flags = {k: v for k, v in sample.items() if k not in named}
    return {**{k: sample.get(k) for k in SAMPLE_FIELDS}, "class_names": sample["class_names"],
            "combined": {"attacks": sample["attacks"]},
            "per_example": {"labels": [int(v) for v in sample["labels"].split(",")], **flags}}


def _evaluation(workdir: str, checkpoint: str, kept: dict | None) -> tuple[dict, str] | None:
    """(evaluation JSON, where from) of a checkpoint: its workdir's file, else the sample kept
    in the suite's JSON (`kept`); None where neither has per-image results."""
    path = eval_path(workdir, checkpoint)
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
        if "per_example" in result:
            return result, path
    if kept:
        return from_sample_record(kept), f"the suite JSON's sample of {workdir} ({checkpoint})"
    return None


def paired_with(workdir: str, baseline: str, checkpoint: str,
                baseline_sample: dict | None = None) -> dict | None:
    """The run's AutoAttack against the baseline run's, image by image on the same test images
    (hamjax.evaluation.paired): gaps of the average and the worst class with their 95%
    intervals, in points rounded to 0.1; None where either lacks per-image results. A baseline
    whose workdir is gone is read from `baseline_sample` (its `sample_record`, carried in the
    suite's JSON)."""
    from hamjax.evaluation.paired import compare_results

    found = [_evaluation(workdir, checkpoint, None),
             _evaluation(baseline, checkpoint, baseline_sample)]
    if any(f is None for f in found):
        return None
    (a, where_a), (b, where_b) = found
    comp = compare_results(a, b, where_a, where_b)
    return {"images": comp["images"], **{
        key: {"gap": round(100 * comp[key]["gap"], 1),
              "interval": [round(100 * v, 1) for v in comp[key]["interval"]]}
        for key in ("average", "worst")}}


def autoattack_one(workdir: str, examples: int, checkpoint: str = "last",
                   train: bool = True) -> dict | None:
    """PGD-20 and AutoAttack (standard) on a class-stratified subset of `examples` test images
    of one checkpoint ("last" or "best" on validation), through `python -m hamjax.evaluate`
    (resumable); None when not run. Robust = correct clean and after both attacks."""
    path = eval_path(workdir, checkpoint)
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
            "seconds": round(attack_seconds(result), 1), "epoch": result.get("checkpoint_epoch"),
            **({"sample": sample} if (sample := sample_record(result)) else {})}


def attack_seconds(result: dict) -> float:
    """The attacks' compute seconds, over every piece of a resumed evaluation (an evaluation
    rerun from its resume file, e.g. to record its per-image results, took ~0 s itself)."""
    if "attack_seconds" in result:
        return result["attack_seconds"]
    return sum(a["seconds"] for a in result["attacks"].values())


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
