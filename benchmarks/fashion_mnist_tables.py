"""The Fashion-MNIST comparison's tables (markdown) from its rows and per-epoch records."""

from __future__ import annotations

HEADLINE = ("clean_avg", "clean_worst", "robust_avg", "robust_worst")


def table_line(label: str, m: dict, cost: float, seconds: float,
               quiet: float | None = None) -> str:
    cells = " | ".join(f"{100 * m[k]:.1f}" for k in HEADLINE)
    return f"| {label} | {cells} | {cost:.2f} | {seconds:.0f} | {_seconds(quiet)} |"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def quiet_mean(rows: list[dict]) -> float | None:
    """Mean quiet-machine seconds (benchmarks/quiet_wall.py) of rows that all have one."""
    if not rows or any("quiet_seconds" not in r for r in rows):
        return None
    return _mean([r["quiet_seconds"] for r in rows])


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
                                    sum(r["train_seconds"] for r in mine) / len(mine),
                                    quiet_mean(mine)))
    return lines


def markdown(rows: list[dict]) -> str:
    lines = ["| run | clean avg | clean worst | PGD-20 avg | PGD-20 worst | cost vs PGD-AT "
             "| train s (logged) | train s (quiet) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("last", "best_on_val"):
            if key in r:
                start = f" + {r['cost_includes']}" if "cost_includes" in r else ""
                lines.append(table_line(f"{r['run']}{start} seed {r['seed']} ({key})", r[key],
                                        r["cost_vs_pgd_at"], r["train_seconds"],
                                        r.get("quiet_seconds")))
    return "\n".join(lines + mean_rows(rows))


def autoattack_markdown(rows: list[dict]) -> str:
    """Per run, seed and evaluated checkpoint; then per run and checkpoint the mean over seeds
    with its spread."""
    lines = ["| run | seed | checkpoint (epoch) | test images | clean avg | clean worst "
             "| AutoAttack avg | AutoAttack worst | worst 95% |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for checkpoint, a in sorted(r.get("autoattack", {}).items(), reverse=True):
            interval = ("-".join(f"{100 * v:.0f}" for v in a["robust_worst_ci95"])
                        if "robust_worst_ci95" in a else "")
            lines.append(f"| {r['run']} | {r['seed']} | {checkpoint} ({a['epoch']}) | "
                         f"{a['examples']} | "
                         + " | ".join(f"{100 * a[k]:.1f}" for k in HEADLINE)
                         + f" | {interval} |")
    for name in dict.fromkeys(r["run"] for r in rows):
        for checkpoint in ("last", "best"):
            mine = [r["autoattack"][checkpoint] for r in rows
                    if r["run"] == name and checkpoint in r.get("autoattack", {})]
            if len(mine) < 2:
                continue
            label, m = spread_line(f"| {name} | mean of {{n}} (spread {{spread}}) | {checkpoint} "
                                   f"| {mine[0]['examples']} |", mine)
            lines.append(label + " " + " | ".join(f"{100 * m[k]:.1f}" for k in HEADLINE)
                         + " |  |")
    return "\n".join(lines) if len(lines) > 2 else ""


def epochs_markdown(per_seed: dict[int, dict[str, list[dict]]]) -> str:
    """One line per run and epoch: the per-epoch record the issue asks for."""
    attacks = {r.get("val_attack", "PGD-20") for per_run in per_seed.values()
               for rows in per_run.values() for r in rows if "val_robust_avg" in r}
    attack = " or ".join(sorted(attacks)) or "PGD-20"
    lines = ["| seed | run | epoch | train s | wall / PGD-AT, same window | ledger / PGD-AT "
             f"| hard frac | buckets run (share of steps) | val {attack} avg / worst |",
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _spread(values: list[float]) -> float | None:
    """max - min over seeds; None with fewer than two."""
    return max(values) - min(values) if len(values) > 1 else None


def verdicts(rows: list[dict], checkpoint: str = "last", baseline: str = "pgd_at") -> list[str]:
    """One plain sentence per method against `baseline` under AutoAttack: its worst-class gain,
    whether that exceeds the seed spread (the larger of the two runs' max - min), what it
    costs in AutoAttack average, and its wall time relative to the baseline's: on a quiet
    machine when every run of both is priced (`quiet_seconds`), else as logged."""
    def attacked(name: str) -> list[dict]:
        return [r for r in rows if r["run"] == name and checkpoint in r.get("autoattack", {})]

    base = attacked(baseline)
    if not base:
        return []
    base_worst = [r["autoattack"][checkpoint]["robust_worst"] for r in base]
    base_avg = [r["autoattack"][checkpoint]["robust_avg"] for r in base]
    lines = []
    for name in dict.fromkeys(r["run"] for r in rows):
        mine = attacked(name)
        if name == baseline or not mine:
            continue
        worst = [r["autoattack"][checkpoint]["robust_worst"] for r in mine]
        gain = 100 * (_mean(worst) - _mean(base_worst))
        avg = 100 * (_mean([r["autoattack"][checkpoint]["robust_avg"] for r in mine])
                     - _mean(base_avg))
        spreads = [s for s in (_spread(worst), _spread(base_worst)) if s is not None]
        seeds = f"{len(mine)} seed{'s' if len(mine) > 1 else ''} against {len(base)}"
        if len(mine) < 2 or len(base) < 2:
            judged = f"{seeds}: no seed spread to judge it by yet"
        else:
            spread = 100 * max(spreads)
            judged = (f"{'beyond' if abs(gain) > spread else 'within'} the seed spread of "
                      f"{spread:.1f} ({seeds})")
        wall, kind = wall_ratio(mine, base)
        ledger = _mean([r["cost_vs_pgd_at"] for r in mine]) / _mean(
            [r["cost_vs_pgd_at"] for r in base])
        label = "last checkpoint" if checkpoint == "last" else "checkpoint selected on validation"
        lines.append(f"- **{name}** ({label}): AutoAttack worst class "
                     f"{gain:+.1f} points against {baseline}, {judged}; AutoAttack average "
                     f"{avg:+.1f} points; training passes {ledger:.2f}x and {kind} wall time "
                     f"{wall:.2f}x {baseline}'s."
                     + paired_clause(mine, checkpoint, baseline))
    return lines


def paired_clause(mine: list[dict], checkpoint: str, baseline: str) -> str:
    """Per seed, the worst-class and average gaps to the baseline of that seed, image by image
    on the same test images, with their 95% paired-bootstrap intervals; "" without them."""
    found = [(r["seed"], r["autoattack"][checkpoint][f"paired_vs_{baseline}"]) for r in mine
             if f"paired_vs_{baseline}" in r["autoattack"][checkpoint]]
    if not found:
        return ""

    def gap(p: dict) -> str:
        lo, hi = p["interval"]
        return f"{p['gap']:+.1f} [{lo:+.1f}, {hi:+.1f}]"

    parts = [f"seed {seed}: worst {gap(p['worst'])}, average {gap(p['average'])}"
             for seed, p in found]
    return (f" Image by image against {baseline} of the same seed ({found[0][1]['images']} "
            "test images; 95% paired intervals, test sampling only): " + "; ".join(parts) + ".")


def wall_ratio(mine: list[dict], base: list[dict]) -> tuple[float, str]:
    """(mean wall time of `mine` over that of `base`, which wall time): the quiet-machine one
    when every row of both has it, else the logged one (load-dependent on shared cores)."""
    quiet, quiet_base = quiet_mean(mine), quiet_mean(base)
    if quiet is not None and quiet_base is not None:
        return quiet / quiet_base, "quiet-machine"
    return (_mean([r["train_seconds"] for r in mine]) / _mean([r["train_seconds"] for r in base]),
            "logged")
