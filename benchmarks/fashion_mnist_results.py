"""The Fashion-MNIST comparison's results: rows carried over from the suite's earlier JSON, the
text of its tables, and where both are written (`benchmarks/results/fashion_mnist_<table>.json`
and `docs/results/fashion_mnist_<table>.md`; README.md links to them, never holds them)."""

from __future__ import annotations

import json
import os

from fashion_mnist_tables import (
    autoattack_markdown,
    diagnosis_markdown,
    epochs_markdown,
    markdown,
    per_class_markdown,
    routing_markdown,
    verdicts,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def kept_sample(previous: dict | None, run: str, seed: int, checkpoint: str) -> dict | None:
    """The per-image sample (`fashion_mnist_followups.sample_record`) that the suite's earlier
    JSON keeps for one run, seed and checkpoint's AutoAttack; None where it has none."""
    for r in (previous or {}).get("rows", []):
        if r["run"] == run and r["seed"] == seed:
            return r.get("autoattack", {}).get(checkpoint, {}).get("sample")
    return None


def suite_order(names: list[str]):
    """Sort key of a run name: the suite's order, each "<run> (earlier)" right after its run."""
    order = {name: i for i, name in enumerate(names)}

    def key(name: str) -> tuple[int, bool]:
        base = name.removesuffix(EARLIER)
        return order.get(base, len(order)), name.endswith(EARLIER)
    return key


def result_paths(table: str, repo: str = REPO) -> tuple[str, str]:
    """(JSON, markdown) paths of a results table (`<suite>` or `<suite>_<tag>`)."""
    return (os.path.join(repo, "benchmarks", "results", f"fashion_mnist_{table}.json"),
            os.path.join(repo, "docs", "results", f"fashion_mnist_{table}.md"))


def read_previous(table: str, repo: str = REPO) -> dict | None:
    """The suite's earlier JSON, or None."""
    path = result_paths(table, repo)[0]
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_results(table: str, result: dict, text: str, repo: str = REPO) -> tuple[str, str]:
    """Writes the JSON and the markdown page of a table; returns their paths."""
    json_path, md_path = result_paths(table, repo)
    os.makedirs(os.path.dirname(md_path), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    with open(md_path, "w") as f:
        f.write(text + "\n")
    return json_path, md_path


WALL_CAPTION = (
    "Wall time: *logged* is what the runs took on 2 shared CPU cores, beside other runs and "
    "sometimes paused, so it measures the load as much as the method; *quiet* prices every "
    "epoch a run trained at its step's seconds, the steps of every run timed in turn with no "
    "other work on the machine (`{priced_by}`{busy}; HAM per bucket, by the share of steps "
    "each bucket ran; benchmarks/quiet_wall.py). The verdicts and the plot use the quiet one.")
WALL_UNPRICED = (
    "Wall time as logged on shared CPU cores (load-dependent; no step times price these runs: "
    "benchmarks/suite_step_times.py).")


def frontier_plot(rows: list[dict], path: str, checkpoint: str = "last") -> bool:
    """AutoAttack worst-class accuracy against training wall time, one point per run and seed
    (the fairness/cost frontier); False (nothing written) when no run was attacked."""
    attacked = [r for r in rows if checkpoint in r.get("autoattack", {})]
    if not attacked:
        return False
    # The quiet-machine wall time (benchmarks/quiet_wall.py) when every point has one: the
    # logged one also measures what else shared the cores.
    quiet = all("quiet_seconds" in r for r in attacked)
    points = [(r["run"], r["seed"], r["quiet_seconds" if quiet else "train_seconds"] / 60,
               100 * r["autoattack"][checkpoint]["robust_worst"],
               r["autoattack"][checkpoint].get("robust_worst_ci95")) for r in attacked]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(dict.fromkeys(p[0] for p in points))
    for i, name in enumerate(names):
        mine = [p for p in points if p[0] == name]
        ax.scatter([p[2] for p in mine], [p[3] for p in mine], label=name, color=f"C{i}")
        for _, _, x, y, interval in mine:  # the worst class's sampling interval
            if interval is not None:
                ax.errorbar([x], [y], yerr=[[y - 100 * interval[0]], [100 * interval[1] - y]],
                            color=f"C{i}", alpha=0.35, capsize=2, linewidth=1)
    ax.set_xlabel("training wall time, minutes " + (
        "(steps timed in turn on an idle machine)" if quiet
        else "(as logged on shared cores; excluding compilation)"))
    ax.set_ylabel(f"AutoAttack worst-class accuracy (%), {checkpoint} checkpoint")
    ax.set_title("Fairness against cost: one point per run and seed\n"
                 "(bars: 95% Wilson interval of the worst class's test images)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def frontier_path(table: str, repo: str = REPO) -> str:
    """The frontier plot of a results table, beside its markdown page."""
    return result_paths(table, repo)[1].removesuffix(".md") + "_frontier.png"


def wall_caption(rows: list[dict], priced_by: str | None, machine: dict | None) -> str:
    """What the wall-time columns mean for these rows: quiet ones only where every row has one
    (else the verdicts and the plot fall back to the logged times, and the caption says so)."""
    unpriced = [f"{r['run']} seed {r['seed']}" for r in rows if "quiet_seconds" not in r]
    if priced_by is None or len(unpriced) == len(rows):
        return WALL_UNPRICED
    busy = (machine or {}).get("cpu_busy_before")
    text = WALL_CAPTION.format(priced_by=priced_by, busy="" if busy is None else
                               f"; the CPU was {100 * busy:.0f}% busy in the second before")
    borrowed = sorted({f"{r['run']} at {r['quiet_timed_as']}'s" for r in rows
                       if "quiet_timed_as" in r})
    if borrowed:
        text += (f" Priced at the timed step of another run with the same step config: "
                 f"{', '.join(borrowed)}.")
    if unpriced:
        text += (f" Not priced (no step timing): {', '.join(unpriced)}; the verdicts and the "
                 "plot use logged times wherever such a run takes part.")
    return text


def results_text(suite: str, rows: list[dict], per_seed: dict, command: str, finished: int,
                 planned: int, where: str, carried: list[str], plot: str | None = None,
                 priced_by: str | None = None, step_machine: dict | None = None) -> str:
    """Every table of a suite with its captions, ending with the command that reproduces it
    (`priced_by`, `step_machine`: the command that timed the steps pricing the quiet wall
    times, and its machine record)."""
    aa = autoattack_markdown(rows)
    plain = "\n".join(verdicts(rows, "last") + verdicts(rows, "best"))
    per_class = per_class_markdown(rows) if suite.startswith("noisy") else ""
    routing = routing_markdown(per_seed)
    diagnosis = diagnosis_markdown(rows)
    return (f"{markdown(rows)}\n\n"
            + f"{wall_caption(rows, priced_by, step_machine)}\n\n"
            + (f"AutoAttack (standard; last and best-on-validation checkpoints; robust = "
               f"correct clean and after PGD-20 and AutoAttack; spread = max - min over seeds "
               f"of the four numbers; worst 95% = the worst class's Wilson interval from its "
               f"images, how far sampling other test images could move it: every run is "
               f"attacked on the same images, so a difference between two runs is less "
               f"uncertain than their intervals):\n\n{aa}\n\n" if aa else "")
            + (f"In plain words (last checkpoints, then those selected on validation, each "
               f"against PGD-AT's of the same kind; AutoAttack worst class; the seed spread is "
               f"the larger max - min of the two):\n\n{plain}\n\n"
               if plain else "")
            + (f"![AutoAttack worst class against training wall time]({plot})\n\n"
               if plot else "")
            + f"Per epoch:\n\n{epochs_markdown(per_seed)}\n\n"
            + (f"Per class, last checkpoint, test clean / PGD-20 (%):\n\n{per_class}\n\n"
               if per_class else "")
            + (f"Share of each class's examples CAAT routed to the adversary, per epoch:\n\n"
               f"{routing}\n\n" if routing else "")
            + (f"CAAT's router on 20,000 training-pool examples, last checkpoint "
               f"(`benchmarks/caat_routing.py`):\n\n{diagnosis}\n\n" if diagnosis else "")
            + f"`{command}` ({finished} of {planned} runs finished; {where})."
            + (f" Carried over from the earlier JSON (their workdirs were on an earlier "
               f"machine; \"(earlier)\": a run trained again here): {', '.join(carried)}."
               if carried else ""))
