"""What a run reports: per-class summaries, TensorBoard scalars, the attacks and cost baseline
written with every result, and the closing lines saying where everything is."""

from __future__ import annotations

from etils import epath

from hamjax.checkpoint import BEST, LAST
from hamjax.config import config_to_json
from hamjax.evaluation.selection import selection_record
from hamjax.metrics import PerClassCounts, boundary_error, fairness_summary


def select_score(summary: dict, select_on: str) -> float:
    """The number model selection maximises (`config.eval.select_on`) of a `summarize` dict."""
    key = {"robust_average": ("robust", "average"), "robust_worst": ("robust", "worst"),
           "clean_average": ("clean", "average")}[select_on]
    return float(summary[key[0]][key[1]])


def summarize(clean: PerClassCounts, robust: PerClassCounts, class_names) -> dict:
    """Per-class clean/robust accuracy, average, worst, std and FRL's boundary error, and the
    raw per-class counts behind them (exact, so runs can be compared count for count)."""
    return {
        "clean": fairness_summary(clean, class_names),
        "robust": fairness_summary(robust, class_names),
        "boundary_error": boundary_error(clean, robust, class_names),
        "counts": {"clean": clean.to_json(), "robust": robust.to_json()},
    }


def _accuracy_scalars(prefix: str, summary: dict) -> dict[str, float]:
    """`{prefix}/clean_average`, `_worst`, `robust_average`, `_worst` of a `summarize` dict."""
    return {f"{prefix}/{kind}_{stat}": float(summary[kind][stat])
            for kind in ("clean", "robust") for stat in ("average", "worst")}


def epoch_scalars(record: dict) -> dict[str, float]:
    """TensorBoard scalars of an epoch record: validation accuracy (when it was evaluated),
    the epoch's ledger and its wall time; metrics.jsonl keeps the full record."""
    ledger = record["ledger"]
    scalars = {"cost/relative_to_pgd_at": ledger["relative_to_pgd_at"],
               "cost/forward_passes": ledger["forward"],
               "cost/backward_passes": ledger["backward"],
               "time/train_seconds": record["train_seconds"],
               "time/epoch_seconds": record["epoch_seconds"]}
    if "val" in record:
        scalars.update(_accuracy_scalars("val", record["val"]))
    for section in ("method", "averaging"):
        scalars.update(numeric_scalars(section, record.get(section, {})))
    return scalars


def numeric_scalars(prefix: str, tree) -> dict[str, float]:
    """`prefix/key/...` -> value for every number in a nested dict/list record (per-class lists
    become `prefix/key/<class index>`), so per-class method state reaches TensorBoard."""
    if isinstance(tree, bool) or isinstance(tree, (int, float)):
        return {prefix: float(tree)}
    items = (tree.items() if isinstance(tree, dict)
             else enumerate(tree) if isinstance(tree, (list, tuple)) else ())
    out: dict[str, float] = {}
    for key, value in items:
        out.update(numeric_scalars(f"{prefix}/{key}", value))
    return out


def report_scalars(results: dict) -> dict[str, float]:
    """TensorBoard scalars of the final report: `test/<checkpoint>/robust_worst`, ... for the
    last and the best_on_val checkpoints."""
    scalars: dict[str, float] = {}
    for name, res in results.items():
        scalars.update(_accuracy_scalars(f"test/{name}", res))
    return scalars


def where_text(root: epath.Path, best: tuple[int, int | None] | None, metrics_path: str | None,
                tensorboard_logdir: str | None) -> str:
    """The closing lines of a run: where its report, checkpoints and logs are. best: the
    (step, epoch) of the validation-selected checkpoint, or None."""
    lines = ["\nresults:",
             f"  report:           {root / 'report.json'}",
             f"  checkpoints:      {root / LAST}"]
    if best is not None:
        step, epoch = best
        lines.append(f"  best checkpoint:  {root / BEST / str(step)} (epoch {epoch}, selected "
                     "on validation)")
    if metrics_path is not None:
        lines.append(f"  metrics:          {metrics_path}")
    if tensorboard_logdir is not None:
        lines.append(f"  tensorboard:      tensorboard --logdir={tensorboard_logdir}")
    return "\n".join(lines)


def attack_record(config) -> dict:
    """The training and evaluation attacks as logged with the run and in its report."""
    return {
        "train_attack": config_to_json(config.attack),
        "eval_attack": {"name": f"pgd{config.eval.steps}", "eps": config.eval.eps,
                        "step_size": config.eval.step_size, "steps": config.eval.steps,
                        "random_start": True, "bn_mode": "eval"},
        "selection": selection_record(config.eval),
    }


def pgd_at_cost(config, examples: float) -> float:
    """Example passes PGD-AT would execute on the same examples: K attack steps + 1 update."""
    return 2.0 * (config.attack.steps + 1) * examples
