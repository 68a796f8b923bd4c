"""The record of an evaluation (per-class numbers, settings, timings) and its bar chart."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hamjax.evaluation.driver import class_counts
from hamjax.evaluation.resume import bits, json_default
from hamjax.evaluation.specs import AttackSpec
from hamjax.evaluation.stages import ROBUST_DEFINITION
from hamjax.metrics import PerClassCounts, boundary_error, fairness_summary, format_per_class_table
from hamjax.paths import save_figure, write_text_atomic

COMBINED_RULE = "robust only if clean-correct and robust to every listed attack"


def _attack_entry(spec: AttackSpec, outcome, clean: PerClassCounts, robust: PerClassCounts,
                  names: Sequence[str], n: int) -> dict[str, Any]:
    stages = {s.stage_id: outcome.stages[s.stage_id] for s in spec.stages}
    seconds = sum(t["seconds"] for t in stages.values())
    return {"settings": spec.settings, "robust": fairness_summary(robust, names),
            "boundary_error": boundary_error(clean, robust, names), "seconds": seconds,
            "compile_seconds": sum(t["compile_seconds"] for t in stages.values()),
            "examples_per_s": n / seconds if seconds else None, "stages": stages}


def per_class_columns(specs: Sequence[AttackSpec], outcome, labels: np.ndarray,
                      num_classes: int, combined: np.ndarray) -> dict[str, PerClassCounts]:
    """clean, one column per attack, and "combined" (`combined_robust`'s flags: robust to
    all) when several were run."""
    columns = {"clean": class_counts(outcome.clean_correct, labels, num_classes)}
    for spec in specs:
        columns[spec.name] = class_counts(outcome.robust[spec.name], labels, num_classes)
    columns["combined"] = class_counts(combined, labels, num_classes)
    return columns


def combined_robust(specs: Sequence[AttackSpec], outcome) -> np.ndarray:
    """bool[N]: each example correct clean and robust to every attack in `specs`."""
    combined = np.asarray(outcome.clean_correct, bool).copy()
    for spec in specs:
        combined &= np.asarray(outcome.robust[spec.name], bool)
    return combined


def build_result(run, specs: Sequence[AttackSpec], outcome, labels: np.ndarray, *, split: str,
                 eps: float, seed: int, batch_size: int, fast: bool, requested: tuple[str, int],
                 sampled: bool, seconds: float) -> dict[str, Any]:
    """The JSON-able record of `evaluate_workdir` (without the file paths)."""
    names = list(run.splits.class_names)
    robust_flags = combined_robust(specs, outcome)
    columns = per_class_columns(specs, outcome, labels, run.splits.num_classes, robust_flags)
    clean, combined = columns["clean"], columns["combined"]
    shown = {k: v for k, v in columns.items() if k != "combined" or len(specs) > 1}
    n = len(labels)
    attacks = {s.name: _attack_entry(s, outcome, clean, columns[s.name], names, n) for s in specs}
    return {
        "workdir": run.workdir,
        "split": split,
        "checkpoint": run.checkpoint,
        "checkpoint_requested": requested[0],
        "checkpoint_step": run.step,
        "checkpoint_epoch": run.epoch,
        "num_examples": n,
        "num_examples_requested": int(requested[1]),
        "sampling": f"class-stratified subset, seed {seed}" if sampled else "whole split",
        "eps": eps,
        "norm": "linf",
        "seed": seed,
        "batch_size": batch_size,
        "fast": bool(fast),
        "bn_mode": "eval",
        "robust_definition": ROBUST_DEFINITION,
        "attacks": attacks,
        "clean": fairness_summary(clean, names),
        "combined": {"attacks": [s.name for s in specs], "rule": COMBINED_RULE,
                     "robust": fairness_summary(combined, names),
                     "boundary_error": boundary_error(clean, combined, names)},
        "gradient_masking_warnings": outcome.warnings,
        "class_names": names,
        "table": format_per_class_table(shown, names, boundary=("clean", list(shown)[-1])),
        "per_class_accuracy": {k: fairness_summary(v)["per_class"] for k, v in shown.items()},
        "counts": {k: v.to_json() for k, v in columns.items()},
        # Per image, in the sample's order: what a paired comparison of two checkpoints on the
        # same images needs (hamjax.evaluation.paired).
        "per_example": {"labels": [int(v) for v in labels],
                        "clean_correct": bits(outcome.clean_correct),
                        "robust": bits(robust_flags)},
        "progress": {"computed_chunks": outcome.computed_chunks,
                     "resumed_examples": outcome.resumed_examples},
        "seconds": seconds,  # this invocation's; a resumed evaluation's is short
        # The attacks' compute over every piece of a resumed evaluation (resume files keep it).
        "attack_seconds": sum(a["seconds"] for a in attacks.values()),
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "config": dict(run.meta.get("config", {})),
    }


def chart_title(result: Mapping[str, Any]) -> str:
    """What was evaluated, naming the epoch (not just the optimiser step)."""
    epoch = result.get("checkpoint_epoch")
    which = f"epoch {epoch}, step {result['checkpoint_step']}" if epoch else \
        f"step {result['checkpoint_step']}"
    return (f"{result['split']} split ({result['num_examples']} examples), "
            f"{result['checkpoint']} checkpoint ({which}), L_inf eps {result['eps']:.4f}")


def save_chart(path: str, columns: Mapping[str, Sequence[float]], class_names: Sequence[str],
               title: str) -> None:
    """Grouped per-class bars (accuracy %), one colour per column, the legend beside the plot
    so it never covers a bar; Agg canvas, so it never touches a notebook's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, c = len(columns), len(class_names)
    fig = Figure(figsize=(max(6.0, 0.9 * c + 2.0) + 1.8, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(k, 1)
    x = np.arange(c)
    for i, (name, values) in enumerate(columns.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, 100.0 * np.nan_to_num(np.asarray(values)), width,
               label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([str(n) for n in class_names], rotation=45 if c > 10 else 0,
                       ha="right" if c > 10 else "center")
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize="medium")
    ax.legend(title="evaluation", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, bbox_inches="tight")


def write_outputs(result: dict[str, Any], stem: str, log: Callable[[str], None]) -> None:
    """`stem`.json (atomic) and `stem`.png; the paths are added to `result`."""
    result["json_path"], result["chart_path"] = stem + ".json", stem + ".png"
    result["partial_path"] = stem + ".partial.json"
    save_chart(stem + ".png", result["per_class_accuracy"], result["class_names"],
               chart_title(result))
    write_text_atomic(stem + ".json", json.dumps(result, indent=1, default=json_default))
    log(f"wrote {stem}.json and {stem}.png")
