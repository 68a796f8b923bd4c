"""Why a trained CAAT run routes as it does: its router's decisions on the training pool.

    python benchmarks/caat_routing.py --workdir runs/fmnist_compare/noisy_full/caat \
        [--checkpoint last] [--examples 20000] [--out benchmarks/results/caat_routing.json]

Loads the run's checkpoint (weights, meta-net, FRL multipliers, class losses), computes the
six router features batch by batch on a shuffled part of the (noisy) training pool, and
reports (JSON, `hamjax.analysis.caat_routing.routing_report`): the meta-net's weight drift from
its seeded initialisation, the meta steps taken and their gradient norms (from metrics.jsonl),
agreement with the untrained router, how much routing is a class decision, the routing with the
class-level features neutralised, the anti-adversary share among mislabelled examples, and
where untrained routers of other initialisation seeds (`--init_seeds`) would send the same
examples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from json_output import emit  # benchmarks/ beside this file

from hamjax.analysis.caat_routing import (
    batch_routing,
    initial_meta_params,
    initialisation_lottery,
    relative_drift,
    routed_to_adversary,
    routing_report,
    untrained_meta_params,
)
from hamjax.backends.cpu.compile_options import jit
from hamjax.checkpoint import BEST, LAST, Checkpointer
from hamjax.errors import ConfigError
from hamjax.run import restore_run


def load_caat_state(workdir: str, checkpoint: str):
    """(config, splits, ctx, state) of a CAAT run's `checkpoint` ("last" or "best")."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        run = restore_run(checkpointer, {"last": LAST, "best": BEST}[checkpoint])
    finally:
        checkpointer.close()
    if run.config.method.name != "caat":
        raise ConfigError(f"{workdir} is a {run.config.method.name!r} run, not a CAAT run")
    return run.config, run.splits, run.ctx, run.state


def meta_step_records(workdir: str) -> dict:
    """Meta steps taken and the logged |dL_meta/dOmega| (train records, last meta step each)."""
    norms, updates = [], 0
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("kind") == "train" and "meta_grad_norm" in record:
                    norms.append(float(record["meta_grad_norm"]))
                    updates = max(updates, int(record.get("meta_updates", 0)))
    arr = np.asarray(norms)
    return {"meta_updates_logged": updates,
            "meta_grad_norm_logged": {"median": float(np.median(arr)), "max": float(arr.max()),
                                      "zero_share": float(np.mean(arr == 0))} if arr.size
            else None}


def analyse(workdir: str, checkpoint: str = "last", examples: int = 20000,
            init_seeds: tuple[int, ...] = tuple(range(10))) -> dict:
    config, splits, ctx, state = load_caat_state(workdir, checkpoint)
    ms = state.method_state
    init_params = initial_meta_params(ctx, config.seed)
    batch = int(config.train.batch_size)
    order = np.random.default_rng(config.seed).permutation(len(splits.train))
    order = order[: (min(examples, len(order)) // batch) * batch]

    lottery_params = {s: untrained_meta_params(ctx, s) for s in init_seeds}

    @jit
    def both(x, y):
        trained = batch_routing(ctx, state.params, state.batch_stats, ms, ms["meta_params"], x, y)
        features = trained["features"]  # one forward pass serves every router
        initial = routed_to_adversary(ctx, ms, init_params, features)
        lottery = {s: routed_to_adversary(ctx, ms, p, features)
                   for s, p in lottery_params.items()}
        return trained, initial, lottery

    from hamjax.data.augment import images_to_float

    parts: dict[str, list] = {"adv": [], "adv_init": [], "adv_no_class": [], "features": []}
    lottery: dict[int, list] = {s: [] for s in init_seeds}
    for start in range(0, order.size, batch):
        idx = order[start:start + batch]
        x = images_to_float(splits.train.images[idx])
        trained, adv_init, by_seed = both(x, splits.train.labels[idx])
        for s, adv in by_seed.items():
            lottery[s].append(np.asarray(adv))
        parts["adv"].append(np.asarray(trained["adv"]))
        parts["adv_no_class"].append(np.asarray(trained["adv_without_class_features"]))
        parts["features"].append(np.asarray(trained["standardised_features"]))
        parts["adv_init"].append(np.asarray(adv_init))
    report = routing_report(
        np.concatenate(parts["adv"]), np.concatenate(parts["adv_init"]),
        np.concatenate(parts["adv_no_class"]), splits.train.labels[order],
        splits.train.clean_labels[order], ctx.num_classes,
        standardised_features=np.concatenate(parts["features"]))
    return {"workdir": workdir, "checkpoint": checkpoint, "step": int(state.step),
            "temperature": float(config.method.temperature),
            "adv_weight_floor": float(config.method.adv_weight_floor),
            "meta_updates": int(ms["meta_updates"]),
            "meta_weight_drift": relative_drift(ms["meta_params"], init_params),
            "class_loss_last": [float(v) for v in np.asarray(ms["class_loss_last"])],
            **meta_step_records(workdir), **report,
            "initialisation_lottery": initialisation_lottery(
                {s: np.concatenate(v) for s, v in lottery.items()}, splits.train.labels[order],
                ctx.num_classes)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a CAAT run's workdir")
    parser.add_argument("--checkpoint", default="last", choices=["last", "best"])
    parser.add_argument("--examples", type=int, default=20000,
                        help="training-pool examples to route (whole batches)")
    parser.add_argument("--init_seeds", type=int, nargs="*", default=list(range(10)),
                        help="method.meta_init_seed values whose untrained routers to compare")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    result = analyse(os.path.abspath(args.workdir), args.checkpoint, args.examples,
                     tuple(args.init_seeds))
    emit(result, args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
