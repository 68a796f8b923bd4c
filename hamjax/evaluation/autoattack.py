"""`run_autoattack`: AutoAttack over numpy arrays as a configuration of the evaluation driver.

A clean pass (with the reference's gradient-masking checks), then the plan's attacks as one
chain (`hamjax.evaluation.stages.run_chain`): each attack runs only on the examples still robust
after the previous ones, in padded chunks of fixed size, so every attack compiles once. Example
i of attack a draws its randomness from fold_in(fold_in(key, a), i): the answer does not depend
on the batch size. `python -m hamjax.evaluate --attacks autoattack` runs the same chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hamjax.attacks import checks
from hamjax.attacks.autoattack_ensemble import (
    AttackFn,
    AutoAttackResult,
    config_warnings,
    plan_attacks,
)
from hamjax.evaluation.driver import Driver, StageRecord, console
from hamjax.evaluation.stages import (
    ChainResult,
    ChainStage,
    attack_fn,
    clean_checks,
    clean_fn,
    fixed_logits,
    run_chain,
)
from hamjax.sharding import make_mesh, mesh_size

LogitsFn = Callable[[jax.Array], jax.Array]


def chain_result(clean: StageRecord, chain: ChainResult, kinds: Mapping[str, str],
                 settings: Mapping[str, Mapping[str, Any]], output_gap: float,
                 num_classes: int) -> AutoAttackResult:
    """An AutoAttackResult (numpy) from a clean pass and a chain; `kinds` maps the chain's
    stage names to attack names (apgd-ce, ..., what the warnings look for)."""
    def by_kind(values: Mapping[str, Any]) -> dict[str, Any]:
        return {kinds[name]: v for name, v in values.items()}

    checked = clean_checks(clean)
    return AutoAttackResult(
        clean_correct=clean.output("correct"), robust=chain.robust,
        robust_after=by_kind(chain.robust_after), fooled_by=by_kind(chain.fooled_by),
        invalid={k: np.int32(v) for k, v in by_kind(chain.invalid).items()},
        n_zero_grad=np.int32(checked["n_zero_grad"]),
        n_grad_checked=np.int32(checked["n_grad_checked"]),
        output_gap=np.float32(output_gap), probabilities=np.bool_(checked["probabilities"]),
        attack_names=tuple(kinds.values()),
        config_warnings=config_warnings(by_kind(settings), num_classes))


def run_autoattack(
    logits_fn: LogitsFn,
    x,
    y,
    key: jax.Array,
    *,
    eps,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | Mapping[str, AttackFn] | None = None,
    num_classes: int,
    n_queries: int = 5000,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 256,
    log_fn: Callable[[str], None] | None = console,
    progress: bool = True,
    randomness_calls: int = 2,
    mesh=None,
) -> tuple[np.ndarray, AutoAttackResult]:
    """Host-side AutoAttack over numpy arrays, attacking only still-robust examples.

    x: [N, H, W, C] in [0, 1], y: [N], eps scalar or [N]. Chunks of `batch_size` examples
    (rounded up to a multiple of the mesh's devices; default mesh: every device) are sharded
    over `mesh`. Reports every stage: a progress bar per attack (`progress`) and one line per
    attack to `log_fn` (None: silent). Returns (x_adv as numpy, AutoAttackResult of numpy).
    """
    log = log_fn or (lambda line: None)
    plan = plan_attacks(version, attacks, norm=norm, num_classes=num_classes,
                        n_queries=n_queries, attack_kwargs=attack_kwargs)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = x.shape[0]
    mesh = make_mesh() if mesh is None else mesh
    n_dev = mesh_size(mesh)
    driver = Driver(mesh, -(-batch_size // n_dev) * n_dev)
    arrays = {"image": x, "label": y,
              "eps": np.broadcast_to(np.asarray(eps, np.float32), (n,)).copy()}
    logits_of = fixed_logits(logits_fn)
    start = time.time()
    clean = driver.run(clean_fn(logits_of), None, arrays, np.arange(n), key, name="clean",
                       progress=progress)
    gap = checks.randomness_gap(logits_fn, x[: driver.batch_size], n_calls=randomness_calls)
    log(f"autoattack ({version}: {', '.join(p.name for p in plan)}), {n} examples, "
        f"clean accuracy {np.mean(clean.output('correct')):.2%}")

    def report(stage: ChainStage, chain: ChainResult) -> None:
        record = chain.records[stage.name]
        log(f"{stage.name}: fooled {int(chain.fooled_by[stage.name].sum())} of "
            f"{chain.attacked[stage.name]} attacked, robust accuracy {chain.robust.mean():.2%} "
            f"({record.seconds + record.compile_seconds:.1f} s, total "
            f"{time.time() - start:.1f} s)")

    stages = [ChainStage(p.name, attack_fn(logits_of, p.bound, norm, keep_points=True),
                         p.kwargs) for p in plan]
    chain = run_chain(driver, None, arrays, clean.output("correct"), stages, key,
                      on_stage=report, progress=progress)
    result = chain_result(clean, chain, {p.name: p.name for p in plan},
                          {p.name: p.kwargs for p in plan}, gap, num_classes)
    for w in result.warnings:
        log(f"warning: {w}")
    log(f"robust accuracy {result.robust_accuracy:.2%} (clean {result.clean_accuracy:.2%})")
    x_adv = chain.x_adv if chain.x_adv is not None else x.copy()
    return x_adv, result
