"""How far PGD-N overstates robustness against a stronger attack, per class, and why.

Whenever an evaluation runs PGD-N (cross-entropy) beside AutoAttack or any APGD stage, each pair
gets: per class, PGD-N's robust accuracy, the strong attack's and their gap (points); for the
examples PGD-N missed and the strong attack broke, which of its stages broke them (counts per
stage per class); the examples PGD-N broke and the strong attack missed ("pgd_only"), so
gap = (broken after PGD - pgd_only) / class size exactly; and a flag with a warning line when the
gap exceeds a threshold on the average or on any class. Methods that reweight or drop examples by
the training attack's outcome are known to defend PGD and not other attacks (GAIRAT, LRAT); a
large gap is that symptom. The clean logit margin (correct-class logit minus the best other) is
charted per class: margins piled up just above zero are what PGD-N reads as robust and a
targeted or margin-based attack breaks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks.losses import cw_margin
from hamjax.data.augment import images_to_float
from hamjax.errors import ConfigError
from hamjax.evaluation.driver import ChunkFn
from hamjax.evaluation.specs import AttackSpec
from hamjax.evaluation.stages import LogitsOf
from hamjax.paths import save_figure

DEFAULT_THRESHOLD = 5.0  # accuracy points
APGD_KINDS = ("apgd-ce", "apgd-dlr", "apgd-t")
MAX_PANELS = 20  # more classes than this: the largest- and smallest-gap classes only


def logit_margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Correct-class logit minus the largest other logit, per example (< 0: misclassified)."""
    return -cw_margin(logits, labels)


def margin_fn(logits_of: LogitsOf) -> ChunkFn:
    """Chunk function: each example's clean logit margin ("margin", float32)."""

    def margins(params, batch, key):
        del key
        logits = logits_of(params)(images_to_float(batch["image"]))
        return {"margin": logit_margins(logits, batch["label"]).astype(jnp.float32)}

    return margins


def is_pgd(spec: AttackSpec) -> bool:
    """PGD-N on cross-entropy (the attack whose numbers may be inflated)."""
    return spec.settings.get("attack") == "pgd" and spec.settings.get("loss") == "ce"


def is_strong(spec: AttackSpec) -> bool:
    """AutoAttack or any attack with an APGD stage."""
    return any(stage.kind in APGD_KINDS for stage in spec.stages)


def pairs(specs: Sequence[AttackSpec]) -> list[tuple[AttackSpec, AttackSpec]]:
    """(PGD-N, strong attack) for every such pair among `specs`, in the order given."""
    return [(p, s) for p in specs if is_pgd(p) for s in specs if is_strong(s)]


def check_threshold(threshold: float) -> float:
    """The threshold as a float; ConfigError unless a finite number of points >= 0."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value < 0:
        raise ConfigError(f"inflation_threshold={threshold!r}: must be a number of accuracy "
                          f"points >= 0 (--inflation_threshold; default {DEFAULT_THRESHOLD:g})")
    return value


def stage_label(stage_id: str) -> str:
    """A chain stage's id as a column name: "autoattack/apgd-t" -> "apgd-t"."""
    return stage_id.rsplit("/", 1)[-1]


def _per_class(selected: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, weights=np.asarray(selected, np.float64), minlength=num_classes)


def _accuracy(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _min(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.min()) if len(finite) else float("nan")


def compare(pgd_name: str, strong_name: str, clean_correct: np.ndarray,
            pgd_robust: np.ndarray, strong_robust: np.ndarray,
            fooled_by: Mapping[str, np.ndarray], labels: np.ndarray,
            class_names: Sequence[str], threshold: float) -> dict[str, Any]:
    """One PGD-N vs strong-attack comparison from per-example bools (numpy bool[N]).

    fooled_by: the strong attack's chain stages in order, stage id -> the examples that stage
    broke (each broken example by exactly one stage). Accuracies are fractions; gaps and the
    threshold are points (100x); averages are class-balanced (the mean over classes, as the
    report's). A class with no examples has NaN accuracies, is left out, and never flags.
    """
    labels = np.asarray(labels, np.int64)
    names = [str(n) for n in class_names]
    c = len(names)
    clean_correct = np.asarray(clean_correct, bool)
    pgd_robust = np.asarray(pgd_robust, bool) & clean_correct
    strong_robust = np.asarray(strong_robust, bool) & clean_correct
    total = np.bincount(labels, minlength=c).astype(np.float64)
    missed = pgd_robust & ~strong_robust  # PGD-N called them robust; the strong attack did not
    pgd_acc = _accuracy(_per_class(pgd_robust, labels, c), total)
    strong_acc = _accuracy(_per_class(strong_robust, labels, c), total)
    gap = 100.0 * (pgd_acc - strong_acc)
    avg_pgd, avg_strong = _mean(pgd_acc), _mean(strong_acc)  # class-balanced, as the report's
    avg_gap = 100.0 * (avg_pgd - avg_strong)
    over = [names[k] for k in range(c) if np.isfinite(gap[k]) and gap[k] > threshold]
    flagged = bool((np.isfinite(avg_gap) and avg_gap > threshold) or over)
    warning = None
    if flagged:
        parts = []
        if avg_gap > threshold:
            parts.append(f"{avg_gap:.1f} points on average")
        if over:
            listed = ", ".join(f"{names[k]} ({gap[k]:+.1f})" for k in np.argsort(-np.nan_to_num(
                gap, nan=-np.inf)) if names[k] in over)
            parts.append(f"more than {threshold:g} points on {listed}")
        warning = (f"{pgd_name} overstates robustness against {strong_name} by "
                   f"{' and by '.join(parts)}; select and report with the strong attack")
    broken = {stage_label(k): _per_class(missed & np.asarray(v, bool), labels, c).astype(int)
              for k, v in fooled_by.items()}
    pgd_only = (~pgd_robust & strong_robust)
    return {
        "pgd": pgd_name, "strong": strong_name, "threshold_points": float(threshold),
        "class_names": names,
        "average": {"pgd": avg_pgd, "strong": avg_strong, "gap_points": float(avg_gap)},
        "worst": {"pgd": _min(pgd_acc), "strong": _min(strong_acc),
                  "gap_points": 100.0 * (_min(pgd_acc) - _min(strong_acc))},
        "per_class": {"pgd": pgd_acc.tolist(), "strong": strong_acc.tolist(),
                      "gap_points": gap.tolist(), "examples": total.astype(int).tolist()},
        "broken_after_pgd": {k: v.tolist() for k, v in broken.items()},
        "broken_after_pgd_total": {k: int(v.sum()) for k, v in broken.items()},
        "pgd_only": _per_class(pgd_only, labels, c).astype(int).tolist(),
        "exceeds_threshold": flagged,
        "classes_over_threshold": over,
        "warning": warning,
    }


def format_comparison(comp: Mapping[str, Any]) -> str:
    """The per-class gap table: robust accuracy (%) of both attacks, the gap (points), the
    examples PGD missed by the stage that broke them, and those only PGD broke."""
    stages = list(comp["broken_after_pgd"])
    names = comp["class_names"]
    width = max([len("average"), *(len(n) for n in names)])
    cols = [comp["pgd"], comp["strong"], "gap", *stages, "pgd-only"]
    widths = [max(len(col), 7) for col in cols]

    def row(label: str, values: Sequence[str]) -> str:
        cells = [v.rjust(w) for v, w in zip(values, widths, strict=True)]
        return f"{label:<{width}}  " + "  ".join(cells)

    def pct(v: float) -> str:
        return "-" if not np.isfinite(v) else f"{100 * v:.1f}"

    per = comp["per_class"]
    lines = [f"{comp['pgd']} vs {comp['strong']}: robust accuracy (%), gap (points), and the "
             f"examples {comp['pgd']} missed by the {comp['strong']} stage that broke them",
             row("class", cols)]
    for k, name in enumerate(names):
        gap = per["gap_points"][k]
        lines.append(row(name, [pct(per["pgd"][k]), pct(per["strong"][k]),
                                "-" if not np.isfinite(gap) else f"{gap:+.1f}",
                                *(str(comp["broken_after_pgd"][s][k]) for s in stages),
                                str(comp["pgd_only"][k])]))
    avg = comp["average"]
    lines.append(row("average", [pct(avg["pgd"]), pct(avg["strong"]), f"{avg['gap_points']:+.1f}",
                                 *(str(comp["broken_after_pgd_total"][s]) for s in stages),
                                 str(sum(comp["pgd_only"]))]))
    return "\n".join(lines)


def margin_summary(margins: np.ndarray, labels: np.ndarray,
                   class_names: Sequence[str]) -> dict[str, Any]:
    """Per class: the median clean margin over the class's examples and over its correctly
    classified ones (NaN where there are none)."""
    margins, labels = np.asarray(margins, np.float64), np.asarray(labels, np.int64)

    def median(values: np.ndarray) -> float:
        return float(np.median(values)) if len(values) else float("nan")

    return {"definition": "correct-class logit minus the largest other logit, clean inputs",
            "median": [median(margins[labels == k]) for k in range(len(class_names))],
            "median_correct": [median(margins[(labels == k) & (margins > 0)])
                               for k in range(len(class_names))]}


def inflation_report(specs: Sequence[AttackSpec], outcome, labels: np.ndarray,
                     class_names: Sequence[str], threshold: float) -> dict[str, Any] | None:
    """The `inflation` record of an evaluation (None when no PGD-N runs beside a strong
    attack): every comparison, the overall flag, warnings, and per-class margin medians."""
    found = pairs(specs)
    if not found:
        return None
    comps = []
    for pgd_spec, strong in found:
        fooled = {s.stage_id: outcome.fooled_by[s.stage_id] for s in strong.stages}
        comps.append(compare(pgd_spec.name, strong.name, outcome.clean_correct,
                             outcome.robust[pgd_spec.name], outcome.robust[strong.name], fooled,
                             labels, class_names, threshold))
    out = {"threshold_points": float(threshold),
           "flag": any(c["exceeds_threshold"] for c in comps),
           "comparisons": comps,
           "warnings": [c["warning"] for c in comps if c["warning"]],
           "table": "\n\n".join(format_comparison(c) for c in comps)}
    if outcome.margins is not None:
        out["margins"] = margin_summary(outcome.margins, labels, class_names)
    return out


def panel_classes(gaps: np.ndarray) -> list[int]:
    """Classes to chart: all of them up to MAX_PANELS, else the 5 largest-gap and the 5
    smallest-gap classes (largest first)."""
    c = len(gaps)
    if c <= MAX_PANELS:
        return list(range(c))
    order = [int(k) for k in np.argsort(-np.nan_to_num(gaps, nan=-np.inf), kind="stable")]
    return order[:5] + order[-5:]


def margin_groups(clean_correct: np.ndarray, pgd_robust: np.ndarray, strong_robust: np.ndarray,
                  pgd_name: str, strong_name: str) -> dict[str, np.ndarray]:
    """Each example's fate, for colouring the margin histograms: robust to both, broken only by
    the strong attack (what PGD-N inflates), broken by PGD-N, misclassified clean."""
    clean_correct = np.asarray(clean_correct, bool)
    pgd_robust = np.asarray(pgd_robust, bool) & clean_correct
    strong_robust = np.asarray(strong_robust, bool) & clean_correct
    return {"robust to both": pgd_robust & strong_robust,
            f"broken only by {strong_name}": pgd_robust & ~strong_robust,
            f"broken by {pgd_name}": clean_correct & ~pgd_robust,
            "misclassified clean": ~clean_correct}


def save_margin_chart(path: str, margins: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str], gaps: np.ndarray | None, title: str,
                      groups: Mapping[str, np.ndarray] | None = None) -> None:
    """One histogram panel per class (see `panel_classes`) of the clean logit margin, a line at
    0 (left of it: misclassified), titled with the class name and its PGD-N minus strong-attack
    gap; shared bins; stacked by `groups` (label -> bool[N], see `margin_groups`) when given.
    Agg canvas: never touches a notebook's matplotlib backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    margins, labels = np.asarray(margins, np.float64), np.asarray(labels, np.int64)
    gaps = np.full(len(class_names), np.nan) if gaps is None else np.asarray(gaps, np.float64)
    shown = panel_classes(gaps)
    finite = margins[np.isfinite(margins)]
    lo, hi = (np.percentile(finite, [1, 99]) if len(finite) else (-1.0, 1.0))
    lo, hi = min(lo, -1e-3), max(hi, 1e-3)
    bins = np.linspace(lo, hi, 41)
    cols = min(5, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(3.0 * cols, 2.4 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    groups = dict(groups) if groups else {"examples": np.ones(len(labels), bool)}
    colours = ["tab:blue", "tab:red", "tab:orange", "tab:gray"]
    for ax, k in zip(axes.flat, shown, strict=False):
        mine = labels == k
        ax.hist([np.clip(margins[mine & g], lo, hi) for g in groups.values()], bins=bins,
                stacked=True, label=list(groups), color=colours[: len(groups)])
        ax.axvline(0.0, color="tab:red", linewidth=1)
        gap = "" if not np.isfinite(gaps[k]) else f", gap {gaps[k]:+.1f}"
        ax.set_title(f"{class_names[k]}{gap}", fontsize="small")
        ax.tick_params(labelsize="x-small")
    for ax in axes[-1]:
        ax.set_xlabel("clean logit margin", fontsize="small")
    for ax in axes[:, 0]:
        ax.set_ylabel("examples", fontsize="small")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=100)


def chart_margins(path: str, report: Mapping[str, Any], outcome, labels: np.ndarray,
                  subtitle: str) -> None:
    """The margin chart of an `inflation_report`: its first comparison's per-class gaps in the
    panel titles, each example coloured by its fate under that pair (`margin_groups`)."""
    first = report["comparisons"][0]
    pgd_name, strong_name = first["pgd"], first["strong"]
    groups = margin_groups(outcome.clean_correct, outcome.robust[pgd_name],
                           outcome.robust[strong_name], pgd_name, strong_name)
    save_margin_chart(path, outcome.margins, labels, first["class_names"],
                      np.asarray(first["per_class"]["gap_points"], np.float64),
                      f"clean logit margins per class ({pgd_name} - {strong_name} gap in "
                      f"points); {subtitle}", groups)
