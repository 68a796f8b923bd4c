"""Per-class accumulators, fairness summaries and the compute ledger.

Robust-fairness papers (FRL, CAAT, ...) report per-class and worst-class numbers, so everything
is accumulated per class as (correct, total) sums that are jittable, shard-summable and mergeable
across batches; Python-float summaries are computed on the host at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Ledger:
    """Compute ledger: example passes *executed* (padded rows included, since they cost compute).

    forward: example forward passes; backward: example backward passes (one PGD step on a batch
    of B rows = B forward + B backward; the weight update's loss = B forward + B backward). Counts
    are float32, exact for integer totals up to 2**24: the trainer's ledger covers one epoch and is
    zeroed at each epoch's end, and run totals are summed on the host.
    """

    forward: jax.Array
    backward: jax.Array

    @classmethod
    def zeros(cls) -> Ledger:
        """An empty ledger (float32 scalars) to start accumulating from."""
        return cls(forward=jnp.zeros((), jnp.float32), backward=jnp.zeros((), jnp.float32))

    @classmethod
    def of(cls, forward: Any = 0.0, backward: Any = 0.0) -> Ledger:
        """A ledger from numbers or traced scalars, cast to float32."""
        return cls(
            forward=jnp.asarray(forward, jnp.float32), backward=jnp.asarray(backward, jnp.float32)
        )

    def __add__(self, other: Ledger) -> Ledger:
        return Ledger(forward=self.forward + other.forward, backward=self.backward + other.backward)

    def total(self) -> jax.Array:
        """forward + backward passes: a hardware-independent cost measure."""
        return self.forward + self.backward


@flax.struct.dataclass
class PerClassCounts:
    """Per-class sums: correct f32[C] (rows classified right) and total f32[C] (valid rows)."""

    correct: jax.Array
    total: jax.Array

    @classmethod
    def zeros(cls, num_classes: int) -> PerClassCounts:
        """Empty counts for num_classes classes."""
        z = jnp.zeros((num_classes,), jnp.float32)
        return cls(correct=z, total=z)

    @property
    def num_classes(self) -> int:
        return int(self.total.shape[-1])

    def add(
        self,
        predictions_correct: jax.Array,
        labels: jax.Array,
        mask: jax.Array | None = None,
    ) -> PerClassCounts:
        """These counts plus one batch (see per_class_counts); jittable."""
        return self.merge(per_class_counts(predictions_correct, labels, self.num_classes, mask))

    def merge(self, other: PerClassCounts) -> PerClassCounts:
        """Sum of two accumulators == counts of the concatenated data."""
        return PerClassCounts(correct=self.correct + other.correct, total=self.total + other.total)

    def __add__(self, other: PerClassCounts) -> PerClassCounts:
        return self.merge(other)

    def to_json(self) -> dict[str, list[int]]:
        """Exact integer counts, so two evaluations can be compared count for count."""
        return {"correct": [int(v) for v in np.asarray(jax.device_get(self.correct))],
                "total": [int(v) for v in np.asarray(jax.device_get(self.total))]}


def per_class_counts(
    predictions_correct: jax.Array,
    labels: jax.Array,
    num_classes: int,
    mask: jax.Array | None = None,
) -> PerClassCounts:
    """Per-class (correct, total) of one batch via one-hot sums (static shapes, jittable).

    predictions_correct: bool[B]; labels: i32[B]; mask: bool[B] or None -- rows with False (batch
    padding) are ignored. Labels outside [0, num_classes) contribute nothing.
    """
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if mask is not None:
        onehot = onehot * jnp.asarray(mask, jnp.float32)[:, None]
    correct = jnp.asarray(predictions_correct, jnp.float32)
    # elementwise sum, not a matmul: TPU default matmul precision is bf16 passes
    return PerClassCounts(
        correct=jnp.sum(correct[:, None] * onehot, axis=0), total=jnp.sum(onehot, axis=0)
    )


def per_class_counts_from_logits(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array | None = None,
) -> PerClassCounts:
    """per_class_counts with correctness = (argmax logits == label); C from the logits."""
    correct = jnp.argmax(logits, axis=-1) == labels
    return per_class_counts(correct, labels, logits.shape[-1], mask)


def _accuracies(counts: PerClassCounts) -> np.ndarray:
    """Per-class accuracy on the host; NaN for classes with no examples."""
    correct = np.asarray(jax.device_get(counts.correct), np.float64)
    total = np.asarray(jax.device_get(counts.total), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.where(total > 0, total, 1.0), np.nan)


# The 97.5% point of the standard normal: two-sided 95% intervals.
Z_95 = 1.959963984540054


def wilson_interval(correct: Any, total: Any, z: float = Z_95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion correct/total, per entry (NaN where total
    is 0). Why: a class's robust accuracy on 100 test images is uncertain by about +-9 points,
    as much as many fairness gains; Wilson's interval stays inside [0, 1] and keeps its
    coverage near 0 and 1, where worst classes live, unlike the normal approximation."""
    k = np.asarray(jax.device_get(correct), np.float64)
    n = np.asarray(jax.device_get(total), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2.0 * n)) / denom
        half = z * np.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    empty = n <= 0
    lo = np.where(empty, np.nan, np.clip(centre - half, 0.0, 1.0))
    hi = np.where(empty, np.nan, np.clip(centre + half, 0.0, 1.0))
    return lo, hi


def _summarize(
    per_class: np.ndarray, worst_is_max: bool, class_names: Sequence[str] | None
) -> dict[str, Any]:
    """average / worst / worst_class / std over the classes that have a value (non-NaN)."""
    valid = ~np.isnan(per_class)
    out: dict[str, Any] = {"per_class": [float(v) for v in per_class]}
    if not valid.any():
        out.update(average=float("nan"), worst=float("nan"), worst_class=-1, std=float("nan"))
    else:
        vals = per_class[valid]
        idx = np.flatnonzero(valid)
        w = int(idx[np.argmax(vals) if worst_is_max else np.argmin(vals)])
        out.update(
            average=float(vals.mean()),
            worst=float(per_class[w]),
            worst_class=w,
            std=float(vals.std()),  # population std (ddof=0) over classes
        )
    if class_names is not None:
        if len(class_names) != len(per_class):
            raise ValueError(f"{len(class_names)} class_names for {len(per_class)} classes")
        wc = out["worst_class"]
        out["worst_class_name"] = str(class_names[wc]) if wc >= 0 else None
    return out


def fairness_summary(
    counts: PerClassCounts,
    class_names: Sequence[str] | None = None,
    *,
    as_error: bool = False,
) -> dict[str, Any]:
    """Per-class accuracy (or error = 1 - accuracy when as_error, as FRL/CAAT report) summary.

    Returns Python values: per_class (list), average (class-balanced: mean over classes of the
    per-class value), overall (total correct / total examples: the usual accuracy), worst (min
    accuracy / max error), worst_class (index; worst_class_name too when class_names given), std
    (population std over classes), worst_interval95 (the worst class's 95% Wilson interval from
    its example count: how far sampling alone could move it), kind ("accuracy" | "error").
    Classes with no examples are NaN in per_class and left out of average/worst/std.
    """
    acc = _accuracies(counts)
    per_class = 1.0 - acc if as_error else acc
    out = _summarize(per_class, worst_is_max=as_error, class_names=class_names)
    lo, hi = wilson_interval(counts.correct, counts.total)
    if as_error:
        lo, hi = 1.0 - hi, 1.0 - lo
    w = out["worst_class"]
    out["worst_interval95"] = ([float(lo[w]), float(hi[w])] if w >= 0
                               else [float("nan"), float("nan")])
    correct = float(np.sum(np.asarray(jax.device_get(counts.correct), np.float64)))
    total = float(np.sum(np.asarray(jax.device_get(counts.total), np.float64)))
    overall = correct / total if total > 0 else float("nan")
    out["overall"] = 1.0 - overall if as_error else overall
    out["kind"] = "error" if as_error else "accuracy"
    return out


def boundary_error(
    clean_counts: PerClassCounts,
    robust_counts: PerClassCounts,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class boundary error (FRL): clean accuracy - robust accuracy = robust error - clean
    error, the share of a class that is correct but not robust. Returns per_class, average
    (class-balanced), worst (max), worst_class, std, as Python values."""
    if clean_counts.num_classes != robust_counts.num_classes:
        raise ValueError(
            f"clean has {clean_counts.num_classes} classes, robust {robust_counts.num_classes}"
        )
    per_class = _accuracies(clean_counts) - _accuracies(robust_counts)
    out = _summarize(per_class, worst_is_max=True, class_names=class_names)
    out["kind"] = "boundary_error"
    return out


def _fmt(v: float, percent: bool, precision: int) -> str:
    if np.isnan(v):
        return "-"
    return f"{100.0 * v:.{precision}f}" if percent else f"{v:.{precision}f}"


def _fmt_interval(interval: Sequence[float] | None, percent: bool, precision: int) -> str:
    if interval is None or any(np.isnan(v) for v in interval):
        return "-"
    return "-".join(_fmt(v, percent, precision) for v in interval)


def format_per_class_table(
    results: Mapping[str, PerClassCounts],
    class_names: Sequence[str] | None = None,
    *,
    as_error: bool = False,
    boundary: tuple[str, str] | None | str = "auto",
    percent: bool = True,
    precision: int = 2,
) -> str:
    """Plain-text table: one row per class, one column per result (e.g. clean, pgd20), plus a
    boundary-error column, then average / worst / std / overall rows.

    results: column name -> counts (insertion order = column order). as_error: show errors.
    boundary: (clean_name, robust_name), None for no boundary column, or "auto" (clean vs the
    first other column when a "clean" column exists). Values in percent unless percent=False.
    """
    if not results:
        raise ValueError("results is empty")
    names = list(results)
    num_classes = results[names[0]].num_classes
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = [str(c) for c in class_names]

    columns: list[tuple[str, dict[str, Any]]] = [
        (n, fairness_summary(results[n], class_names, as_error=as_error)) for n in names
    ]
    if boundary == "auto":
        others = [n for n in names if n != "clean"]
        boundary = ("clean", others[0]) if "clean" in results and others else None
    if boundary is not None:
        clean_name, robust_name = boundary  # type: ignore[misc]
        summary = boundary_error(results[clean_name], results[robust_name], class_names)
        summary["overall"] = float("nan")
        columns.append(("boundary", summary))

    rows: list[list[str]] = [["class"] + [n for n, _ in columns]]
    for c, cname in enumerate(class_names):
        rows.append([cname] + [_fmt(s["per_class"][c], percent, precision) for _, s in columns])
    for key in ("average", "worst", "std", "overall"):
        rows.append([key] + [_fmt(s[key], percent, precision) for _, s in columns])
    rows.append(["worst_ci95"] + [_fmt_interval(s.get("worst_interval95"), percent, precision)
                                 for _, s in columns])

    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return "  ".join(
            [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)]
        )

    unit = ("error" if as_error else "accuracy") + (" %" if percent else "")
    rule = "-" * len(line(rows[0]))
    body = [line(r) for r in rows]
    header = (f"per-class {unit} (average = class-balanced mean; worst/std over classes; "
              "worst_ci95 = the worst class's 95% Wilson interval from its example count)")
    return "\n".join(
        [header, body[0], rule, *body[1 : 1 + num_classes], rule, *body[1 + num_classes :]]
    )
