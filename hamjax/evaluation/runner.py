"""`run_attacks`: a clean pass, then every requested attack as a chain, over arrays; resumable.

Each attack only attacks the examples classified correctly clean; an example counts as robust
against it only if it is clean-correct and the attack's output (re-evaluated, inside the eps
ball and [0, 1]) is still classified correctly. AutoAttack's four attacks run as one chain, each
on the examples still robust after the previous ones, exactly as `run_autoattack` runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from hamjax.attacks import checks
from hamjax.attacks.autoattack_ensemble import config_warnings
from hamjax.data.augment import images_to_float
from hamjax.evaluation.driver import ChunkReport, Driver, StageRecord, console
from hamjax.evaluation.inflation import margin_fn
from hamjax.evaluation.resume import ResumeFile, crc
from hamjax.evaluation.specs import AttackSpec, attack_key, bound_attack
from hamjax.evaluation.stages import (
    ChainResult,
    ChainStage,
    attack_fn,
    clean_checks,
    clean_fn,
    model_logits,
    run_chain,
)
from hamjax.sharding import make_mesh

Log = Callable[[str], None]


@dataclasses.dataclass
class AttackOutcome:
    """Per-example results of `run_attacks` (numpy bool[N]) and per-stage bookkeeping."""

    clean_correct: np.ndarray
    robust: dict[str, np.ndarray]  # attack name -> clean-correct and not fooled
    stages: dict[str, dict[str, Any]]  # stage id -> attacked, fooled, timing, settings
    warnings: list[str]
    computed_chunks: int
    resumed_examples: int
    # stage id -> the examples that stage broke (each broken example by one stage of its chain)
    fooled_by: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    margins: np.ndarray | None = None  # clean logit margins (float32[N]), when asked for


class _Progress:
    """Saves the resume file and prints a line after every chunk; counts the work done."""

    def __init__(self, store: ResumeFile, log: Log):
        self.store, self.log = store, log
        self.computed_chunks = self.resumed_examples = 0

    def record(self, stage_id: str, settings: dict[str, Any]) -> StageRecord:
        record = self.store.stage(stage_id, settings)
        done = int(record.done.sum())
        if done:
            self.resumed_examples += done
            self.log(f"[{stage_id}] resuming: {done} examples already done")
        return record

    def chunk(self, report: ChunkReport) -> None:
        self.store.save()
        self.computed_chunks += 1
        m, dt = len(report.positions), report.seconds
        clean = "correct" in report.outputs
        hits = int(np.sum(report.outputs["correct" if clean else "fooled"]))
        self.log(f"[{report.stage}] chunk {report.chunk + 1}/{report.chunks}: {m} images in "
                 f"{dt:.2f}s ({m / max(dt, 1e-9):.1f} img/s), {hits}/{m} "
                 f"{'correct' if clean else 'fooled'}")


def _stage_summary(spec: AttackSpec, chain: ChainResult, n: int) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in spec.stages:
        record = chain.records[stage.stage_id]
        out[stage.stage_id] = {
            "settings": dict(stage.kwargs), "attacked": chain.attacked[stage.stage_id],
            "fooled": int(chain.fooled_by[stage.stage_id].sum()),
            "robust_accuracy_after": float(chain.robust_after[stage.stage_id].mean()) if n
            else float("nan"),
            "invalid_outputs": chain.invalid[stage.stage_id],
            "seconds": record.seconds, "compile_seconds": record.compile_seconds,
            "images_per_s": record.images / record.seconds if record.seconds else None,
        }
    return out


def _spec_warnings(spec: AttackSpec, chain: ChainResult, num_classes: int, n: int) -> list[str]:
    """AutoAttack's misuse and black-box checks (prefixed), or one attack's invalid outputs."""
    kinds = {s.stage_id: s.kind for s in spec.stages}
    if spec.name != "autoattack":
        return checks.attack_warnings({}, {spec.name: chain.invalid[spec.stages[0].stage_id]}, n)
    fooled = {kinds[k]: v for k, v in chain.fooled_by.items()}
    invalid = {kinds[k]: v for k, v in chain.invalid.items()}
    found = list(config_warnings({s.kind: s.kwargs for s in spec.stages}, num_classes))
    found += checks.attack_warnings(fooled, invalid, n)
    return [f"autoattack: {w}" for w in found]


def run_attacks(
    model: Any,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    specs: Sequence[AttackSpec],
    *,
    eps: float,
    seed: int,
    batch_size: int,
    partial_path: str | None = None,
    fingerprint: dict | None = None,
    resume: bool = True,
    log: Log = console,
    mesh=None,
    progress: bool = True,
    margins: bool = False,
) -> AttackOutcome:
    """Runs `specs` on (images, labels) chunk by chunk; resumable through `partial_path`.

    images: uint8 or [0, 1] float NHWC. batch_size is the chunk size (a multiple of the mesh's
    devices; default mesh: every device). The model runs in eval mode (running BN statistics).
    progress: a bar with ETA per stage on a terminal; `log` gets a line per chunk either way.
    margins: also each example's clean logit margin (`hamjax.evaluation.inflation`), kept in the
    resume file like the other per-example results.
    """
    driver = Driver(make_mesh() if mesh is None else mesh, batch_size)
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    arrays = {"image": np.asarray(images), "label": labels, "eps": np.full(n, eps, np.float32)}
    fp = dict(fingerprint or {}, n=n, eps=float(eps), seed=int(seed), labels=crc(labels))
    store = ResumeFile(partial_path, fp, resume, log)
    tracker = _Progress(store, log)
    logits_of = model_logits(model)

    clean = driver.run(clean_fn(logits_of), variables, arrays, np.arange(n),
                       attack_key(seed, "clean"), record=tracker.record("clean", {}),
                       name="clean", on_chunk=tracker.chunk, progress=progress)
    if "output_gap" not in store.extra and n:
        # eager calls on purpose: randomness drawn in Python would be frozen by jit
        x = images_to_float(jnp.asarray(images[: min(n, 16)]))
        store.extra["output_gap"] = checks.randomness_gap(logits_of(variables), x)
        store.save()
    margin_values = None
    if margins:
        margin_values = _clean_margins(driver, store, logits_of, variables, arrays, seed, progress)
    found = clean_checks(clean)
    warnings = checks.clean_warnings(n_zero_grad=found["n_zero_grad"],
                                     n_grad_checked=found["n_grad_checked"],
                                     output_gap_value=store.extra.get("output_gap", 0.0),
                                     probabilities=found["probabilities"])

    correct = clean.output("correct")
    robust: dict[str, np.ndarray] = {}
    stages_out: dict[str, dict[str, Any]] = {}
    fooled_by: dict[str, np.ndarray] = {}
    for spec in specs:
        chain_stages = [ChainStage(s.stage_id, attack_fn(logits_of, bound_attack(s, num_classes)),
                                   dict(s.kwargs, kind=s.kind)) for s in spec.stages]
        chain = run_chain(driver, variables, arrays, correct, chain_stages,
                          attack_key(seed, spec.name),
                          records=lambda s: tracker.record(s.name, s.settings),
                          on_chunk=tracker.chunk, progress=progress)
        robust[spec.name] = chain.robust
        stages_out.update(_stage_summary(spec, chain, n))
        fooled_by.update(chain.fooled_by)
        warnings += _spec_warnings(spec, chain, num_classes, n)
    return AttackOutcome(correct, robust, stages_out, warnings, tracker.computed_chunks,
                         tracker.resumed_examples, fooled_by, margin_values)


def _clean_margins(driver: Driver, store: ResumeFile, logits_of, variables, arrays, seed: int,
                   progress: bool) -> np.ndarray:
    """Every example's clean logit margin: from the resume file, else one forward pass (then
    saved there: a float per example, so outside the per-stage bit records)."""
    n = len(arrays["label"])
    saved = store.extra.get("clean_margins")
    if saved is not None and len(saved) == n:
        return np.asarray(saved, np.float32)
    record = driver.run(margin_fn(logits_of), variables, arrays, np.arange(n),
                        attack_key(seed, "clean"), name="margins", progress=progress)
    values = record.output("margin", 0.0).astype(np.float32)
    store.extra["clean_margins"] = values.tolist()
    store.save()
    return values
