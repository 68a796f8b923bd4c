"""Two checkpoints evaluated on the same images, compared image by image.

A worst class measured on 100 test images is uncertain by about +-9 points, as much as many
fairness gains. When two runs were attacked on the same class-stratified images (the same
split, size, sampling seed and eps), much of that uncertainty is shared: an image hard for one
is usually hard for the other. The paired bootstrap here resamples each class's images with
replacement, the same draw for both runs, and reports the gap A - B of the class-balanced
average and of the worst class with a percentile interval. It covers the test sample only;
training seeds are another source of spread, to be reported beside it.

    python -m hamjax.evaluation.paired runs/faal/eval/test_last.json \\
        runs/pgd_at/eval/test_last.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hamjax.evaluation.resume import unbits
from hamjax.paths import resolve

# What must agree for two evaluations to have attacked the same images with the same budget.
SAMPLE_FIELDS = ("split", "num_examples", "sampling", "seed", "eps", "norm")
DEFAULT_RESAMPLES = 2000


def per_example(result: Mapping[str, Any], where: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels int[N], robust bool[N]) of an evaluation JSON, in the sample's order."""
    saved = result.get("per_example")
    if not saved:
        raise ValueError(
            f"{where} has no per-example results (it was written before hamjax recorded them). "
            "Fix: run the same `python -m hamjax.evaluate` command on that checkpoint again; "
            "its resume file (*.partial.json) makes that quick")
    labels = np.asarray(saved["labels"], np.int64)
    robust = unbits(saved["robust"])
    if len(robust) != len(labels):
        raise ValueError(f"{where}: {len(robust)} robust flags for {len(labels)} labels")
    return labels, robust


def check_same_images(a: Mapping[str, Any], b: Mapping[str, Any], where_a: str,
                      where_b: str) -> None:
    """Refuse a pairing of evaluations that did not attack the same images with one budget."""
    differ = [f"{k}: {a.get(k)!r} against {b.get(k)!r}" for k in SAMPLE_FIELDS
              if a.get(k) != b.get(k)]
    if not differ and a.get("per_example", {}).get("labels") != b.get(
            "per_example", {}).get("labels"):
        differ.append("the images' labels differ (another dataset or split)")
    if differ:
        raise ValueError(f"{where_a} and {where_b} were not evaluated on the same images:\n  "
                         + "\n  ".join(differ)
                         + "\nFix: evaluate both with the same --split, --num_examples, --seed "
                           "and --eps")


def class_accuracies(labels: np.ndarray, robust: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class robust accuracy, f64[C]."""
    return np.array([robust[labels == c].mean() for c in range(num_classes)])


def paired_gaps(labels: np.ndarray, robust_a: np.ndarray, robust_b: np.ndarray,
                num_classes: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                level: float = 0.95) -> dict[str, Any]:
    """A - B of the class-balanced average and of the worst class, each with the `level`
    percentile interval of a class-stratified paired bootstrap (`resamples` draws).

    The worst class's interval is approximate: a minimum over classes is not a smooth
    statistic, so read it as the scale of the sampling error rather than an exact coverage."""
    labels = np.asarray(labels, np.int64)
    robust_a, robust_b = np.asarray(robust_a, bool), np.asarray(robust_b, bool)
    members = [np.flatnonzero(labels == c) for c in range(num_classes)]
    if any(len(m) == 0 for m in members):
        raise ValueError("every class needs images for a per-class comparison; "
                         f"counts {[len(m) for m in members]}")
    if resamples < 100 or not 0 < level < 1:
        raise ValueError(f"resamples={resamples} (>= 100) and level={level} (in (0, 1))")
    rng = np.random.default_rng(seed)
    boot_a = np.empty((resamples, num_classes))
    boot_b = np.empty((resamples, num_classes))
    for c, idx in enumerate(members):
        draw = idx[rng.integers(0, len(idx), size=(resamples, len(idx)))]  # same for both
        boot_a[:, c] = robust_a[draw].mean(axis=1)
        boot_b[:, c] = robust_b[draw].mean(axis=1)
    acc_a = class_accuracies(labels, robust_a, num_classes)
    acc_b = class_accuracies(labels, robust_b, num_classes)
    tails = [(1 - level) / 2, (1 + level) / 2]

    def gap(point: float, draws: np.ndarray) -> dict[str, Any]:
        return {"gap": float(point), "interval": [float(v) for v in np.quantile(draws, tails)]}

    return {
        "images": int(len(labels)), "resamples": int(resamples), "level": level,
        "a": {"average": float(acc_a.mean()), "worst": float(acc_a.min()),
              "worst_class": int(acc_a.argmin())},
        "b": {"average": float(acc_b.mean()), "worst": float(acc_b.min()),
              "worst_class": int(acc_b.argmin())},
        "average": gap(acc_a.mean() - acc_b.mean(), boot_a.mean(1) - boot_b.mean(1)),
        "worst": gap(acc_a.min() - acc_b.min(), boot_a.min(1) - boot_b.min(1)),
    }


def compare_results(a: Mapping[str, Any], b: Mapping[str, Any], where_a: str = "A",
                    where_b: str = "B", resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> dict[str, Any]:
    """`paired_gaps` of two evaluation JSONs (robust = their combined rule), after checking
    they attacked the same images."""
    check_same_images(a, b, where_a, where_b)
    labels, robust_a = per_example(a, where_a)
    _, robust_b = per_example(b, where_b)
    num_classes = len(a.get("class_names") or []) or int(labels.max()) + 1
    out = paired_gaps(labels, robust_a, robust_b, num_classes, resamples, seed)
    out["attacks"] = {"a": a["combined"]["attacks"], "b": b["combined"]["attacks"]}
    out["class_names"] = list(a.get("class_names") or [])
    return out


def format_comparison(comp: Mapping[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a short table in percent."""
    names = comp.get("class_names") or []

    def cls(i: int) -> str:
        return names[i] if i < len(names) else str(i)

    pct = int(round(100 * comp["level"]))
    rows = [f"{comp['images']} images, robust = correct clean and after "
            f"{' + '.join(comp['attacks']['a'])}; A = {name_a}, B = {name_b}",
            f"{'':12} {'A':>6} {'B':>6} {'A - B':>7}   {pct}% paired interval "
            f"({comp['resamples']} class-stratified resamples)"]
    for key, label in (("average", "average"), ("worst", "worst class")):
        lo, hi = comp[key]["interval"]
        rows.append(f"{label:12} {100 * comp['a'][key]:6.1f} {100 * comp['b'][key]:6.1f} "
                    f"{100 * comp[key]['gap']:+7.1f}   [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    rows.append(f"worst classes: {cls(comp['a']['worst_class'])} (A), "
                f"{cls(comp['b']['worst_class'])} (B)")
    return "\n".join(rows)


def load_evaluation(path: str) -> dict[str, Any]:
    """An evaluation JSON; a ValueError that says what to give when it is missing or not JSON."""
    fix = "python -m hamjax.evaluate writes <workdir>/eval/<split>_<checkpoint>.json"
    try:
        return json.loads(resolve(path).read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path}: no such evaluation JSON ({fix})") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}. Fix: give an evaluation JSON ({fix})") from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hamjax.evaluation.paired",
        description="Compare two evaluations of the same images, image by image (A - B).")
    parser.add_argument("a", help="evaluation JSON of run A")
    parser.add_argument("b", help="evaluation JSON of run B")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES)
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = parser.parse_args(argv)
    try:
        comp = compare_results(load_evaluation(args.a), load_evaluation(args.b), args.a, args.b,
                               args.resamples, args.seed)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    print(json.dumps(comp, indent=1) if args.json else format_comparison(comp, args.a, args.b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
