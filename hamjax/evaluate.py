"""Evaluate a trained workdir: per-class clean and robust accuracy under a list of attacks.

`python -m hamjax.evaluate --workdir DIR [--attacks pgd20,autoattack] [--split test|val]
[--num_examples N] [--checkpoint best|last] [--batch_size B] [--seed S] [--eps E]`

The run's own config is read back from the checkpoint metadata, so the same data split and
model are rebuilt; nothing has to be passed twice. Results go to `DIR/eval/<split>_<ckpt>.json`
(settings, seed, sample count, checkpoint step, per-class numbers, AutoAttack's gradient-masking
warnings) plus a per-class bar chart `.png`. Work is done in fixed chunks of examples, and after
every chunk its per-example outcome is written to `DIR/eval/<split>_<ckpt>.partial.json`: an
interrupted evaluation rerun with the same flags skips every finished chunk (and a finished one
only re-summarises), which matters for AutoAttack on a full test set.

Every attack only attacks the examples classified correctly when clean, and an example counts as
robust only if it is clean-correct and the attack's output (re-evaluated, inside the eps ball and
[0, 1]) is still classified correctly. AutoAttack runs its four attacks in order, each on the
examples still robust after the previous ones, as the reference does; its chunking and keys
follow `hamjax.attacks.autoattack.run_autoattack`, so both give the same per-example answer.
Notebook use: `evaluate_workdir(...)`, or `load_run` + `run_attacks` on your own arrays.
Single-host only (each chunk is sharded over the local devices).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hamjax.attacks import checks, fgsm, pgd
from hamjax.attacks.autoattack import ATTACKS as AA_ATTACKS
from hamjax.attacks.autoattack import STANDARD_ATTACKS, default_attack_kwargs, judge
from hamjax.checkpoint import BEST, LAST, Checkpointer
from hamjax.config import validate_config
from hamjax.data import stratified_subset
from hamjax.errors import CheckpointError, ConfigError
from hamjax.methods import get_method
from hamjax.metrics import PerClassCounts, boundary_error, fairness_summary, format_per_class_table
from hamjax.models import make_logits_fn
from hamjax.sharding import make_mesh, replicated, shard_batch
from hamjax.train.loop import build_context
from hamjax.train.state import create_train_state

Log = Callable[[str], None]

CHECKPOINTS = {"best": BEST, "last": LAST}
SPLITS = ("test", "val")
# Names accepted besides the patterns pgdN / cwN (N steps).
NAMED_ATTACKS = ("fgsm", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "fab", "square", "autoattack")
VALID_ATTACKS_TEXT = ("pgdN (PGD-N on cross-entropy, e.g. pgd20), cwN (PGD-N on the CW margin; "
                      "cw = cw20), " + ", ".join(NAMED_ATTACKS))
# --fast: a smoke-test preset (NOT comparable with published numbers; recorded in the JSON).
FAST_OVERRIDES: dict[str, dict[str, Any]] = {
    "apgd-ce": {"steps": 10}, "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 10, "n_target_classes": 3}, "fab-t": {"steps": 10, "n_target_classes": 3},
    "fab": {"steps": 10}, "square": {"n_queries": 100},
}
PARTIAL_VERSION = 1
_STEP_RE = re.compile(r"^(pgd|cw)(\d*)$")


# ----------------------------------------------------------------------------- attack specs
@dataclasses.dataclass(frozen=True)
class Stage:
    """One attack pass: `kind` is "pgd", "fgsm" or an AutoAttack component name."""

    stage_id: str
    kind: str
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """A requested attack: its stages run in order, each on the survivors of the previous one."""

    name: str
    settings: dict[str, Any]
    stages: tuple[Stage, ...]


def _resolve_step(step_size: float | str | None, eps: float) -> float:
    """An absolute PGD step from a number, "eps/K" or None (eps/4: 2/255 at eps 8/255)."""
    if step_size is None:
        return eps / 4.0
    if isinstance(step_size, str):
        m = re.fullmatch(r"\s*eps\s*/\s*([0-9.]+)\s*", step_size)
        if m is None:
            try:
                return float(step_size)
            except ValueError:
                raise ConfigError(f"step_size={step_size!r}: give a number or 'eps/K'") from None
        return eps / float(m.group(1))
    return float(step_size)


def _split_names(attacks: Sequence[str] | str) -> list[str]:
    names = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if name and name not in out:
            out.append(name)
    if not out:
        raise ConfigError(f"no attack given; valid names: {VALID_ATTACKS_TEXT}")
    return out


def _valid_name(name: str) -> bool:
    m = _STEP_RE.match(name)
    if m is None:
        return name in NAMED_ATTACKS
    return name != "pgd" and m.group(2) != "0" and not m.group(2).startswith("0")


def check_attack_names(attacks: Sequence[str] | str) -> list[str]:
    """The normalised names; ConfigError naming the unknown ones and listing the valid ones."""
    names = _split_names(attacks)
    bad = [n for n in names if not _valid_name(n)]
    if bad:
        raise ConfigError(f"unknown attack name(s) {bad}; valid names: {VALID_ATTACKS_TEXT}")
    return names


def parse_attacks(
    attacks: Sequence[str] | str,
    *,
    eps: float,
    num_classes: int,
    step_size: float | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fast: bool = False,
) -> list[AttackSpec]:
    """Attack names -> specs with every setting resolved (so results record what was run).

    overrides: name -> fields, for a listed attack (e.g. {"pgd20": {"step_size": 0.01}}) or an
    AutoAttack component (e.g. {"square": {"n_queries": 100}}: applies inside AutoAttack and to a
    standalone square). Unknown names raise ConfigError listing the valid ones.
    """
    names = check_attack_names(attacks)
    overrides = {k.lower(): dict(v) for k, v in (overrides or {}).items()}
    allowed = set(names) | (set(STANDARD_ATTACKS) if "autoattack" in names else set())
    unused = sorted(set(overrides) - allowed)
    if unused:
        raise ConfigError(f"overrides for {unused}, which are not run; can override: "
                          f"{sorted(allowed)}")
    defaults = default_attack_kwargs(num_classes)

    def component(kind: str) -> dict[str, Any]:
        return {**defaults[kind], **(FAST_OVERRIDES.get(kind, {}) if fast else {}),
                **overrides.get(kind, {})}

    specs = []
    for name in names:
        m = _STEP_RE.match(name)
        if m:
            steps = int(m.group(2) or 20)
            kw = {"steps": steps, "step_size": _resolve_step(step_size, eps), "random_start": True,
                  "loss": "ce" if m.group(1) == "pgd" else "cw", **overrides.get(name, {})}
            kw["step_size"] = _resolve_step(kw["step_size"], eps)
            specs.append(AttackSpec(name, dict(kw, attack="pgd"), (Stage(name, "pgd", kw),)))
        elif name == "fgsm":
            kw = {"step_size": eps, "random_start": False, **overrides.get(name, {})}
            specs.append(AttackSpec(name, dict(kw, attack="fgsm"), (Stage(name, "fgsm", kw),)))
        elif name == "autoattack":
            stages = tuple(Stage(f"autoattack/{k}", k, component(k)) for k in STANDARD_ATTACKS)
            standard = all(s.kwargs == defaults[s.kind] for s in stages)
            settings = {"attack": "autoattack", "version": "standard", "norm": "linf",
                        "components": {s.kind: s.kwargs for s in stages},
                        "matches_reference_settings": standard}
            specs.append(AttackSpec(name, settings, stages))
        else:
            kw = component(name)
            specs.append(AttackSpec(name, dict(kw, attack=name), (Stage(name, name, kw),)))
    return specs


def _bound_attack(stage: Stage, num_classes: int) -> Callable:
    """(logits_fn, x, y, key, eps f32[B]) -> x_adv for one stage."""
    kw = stage.kwargs
    if stage.kind == "pgd":
        def run_pgd(logits_fn, x, y, key, eps):
            return pgd(logits_fn, x, y, key, eps=eps, step_size=kw["step_size"],
                       steps=int(kw["steps"]), loss=kw["loss"],
                       random_start=bool(kw["random_start"]))[0]
        return run_pgd
    if stage.kind == "fgsm":
        def run_fgsm(logits_fn, x, y, key, eps):
            return fgsm(logits_fn, x, y, key, eps=eps, step_size=kw["step_size"],
                        random_start=bool(kw["random_start"]))[0]
        return run_fgsm
    fn = AA_ATTACKS[stage.kind]

    def run_component(logits_fn, x, y, key, eps):
        out = fn(logits_fn, x, y, key, eps=eps, norm="linf", num_classes=num_classes, **kw)
        return out[0] if isinstance(out, tuple) else out
    return run_component


def attack_key(seed: int, name: str) -> jax.Array:
    """The attack's root key: a function of (seed, name) only, so adding or reordering attacks
    never changes another attack's randomness (and resumed chunks match uninterrupted ones)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------- partial file
def _bits(a: np.ndarray) -> str:
    return (np.asarray(a, bool).astype(np.uint8) + 48).tobytes().decode()


def _unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) == 49


def _jsonable(value: Any) -> Any:
    """value as it reads back from JSON (tuples -> lists), so comparisons survive a reload."""
    return json.loads(json.dumps(value, default=_json_default))


def _crc(idx: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(idx, np.int64).tobytes())


class _Partial:
    """Per-stage, per-chunk results on disk (atomic rewrite after every chunk)."""

    def __init__(self, path: str | None, fingerprint: dict, resume: bool, log: Log):
        self.path = path
        fingerprint = _jsonable(fingerprint)
        self.data: dict[str, Any] = {"version": PARTIAL_VERSION, "fingerprint": fingerprint,
                                     "stages": {}}
        if path and resume and os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = None
                log(f"note: could not read {path}; starting over")
            if old and old.get("version") == PARTIAL_VERSION and \
                    old.get("fingerprint") == fingerprint:
                self.data = old
            elif old:
                log(f"note: {path} was written for other settings (checkpoint step, split, "
                    "examples, eps, seed or batch size); starting over")

    def stage(self, stage_id: str, settings: dict, population: np.ndarray, n: int) -> dict:
        """The stage's record; reset when its settings or the examples it attacks changed."""
        rec = self.data["stages"].get(stage_id)
        key = {"settings": _jsonable(settings), "population": _crc(population),
               "size": int(len(population))}
        if rec is None or any(rec.get(k) != v for k, v in key.items()):
            rec = {**key, "done": [], "hits": _bits(np.zeros(n, bool)), "invalid": 0,
                   "seconds": 0.0, "images": 0, "compile_seconds": 0.0, "computed_chunks": 0,
                   "extra": {}}
            self.data["stages"][stage_id] = rec
        return rec

    def save(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- the runner
def _padded_chunks(idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(real positions, positions padded to `size` by repeating the first): static shapes; the
    same chunking as run_autoattack."""
    for start in range(0, len(idx), size):
        sel = idx[start:start + size]
        yield sel, np.concatenate([sel, np.full(size - len(sel), sel[0], sel.dtype)])


@dataclasses.dataclass
class AttackOutcome:
    """Per-example results of `run_attacks` (numpy bool[N]) and per-stage bookkeeping."""

    clean_correct: np.ndarray
    robust: dict[str, np.ndarray]  # attack name -> clean-correct and not fooled
    stages: dict[str, dict[str, Any]]  # stage id -> attacked, fooled, timing, settings
    warnings: list[str]
    computed_chunks: int
    resumed_chunks: int


def _to_float(images: np.ndarray) -> np.ndarray:
    if images.dtype == np.uint8:
        return images.astype(np.float32) * np.float32(1.0 / 255.0)
    return np.asarray(images, np.float32)


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
    log: Log = print,
) -> AttackOutcome:
    """Runs `specs` on (images, labels) chunk by chunk; resumable through `partial_path`.

    images: uint8 or [0, 1] float NHWC. batch_size is the chunk size (a multiple of the device
    count). The model runs in eval mode (running BN statistics).
    """
    mesh = make_mesh()
    n_dev = mesh.devices.size
    if batch_size % n_dev:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of the {n_dev} devices")
    labels = np.asarray(labels, np.int32)
    n = len(labels)
    eps_all = np.full(n, eps, np.float32)
    variables = jax.device_put(variables, replicated(mesh))
    fp = dict(fingerprint or {}, n=n, eps=float(eps), seed=int(seed), batch_size=int(batch_size),
              labels=_crc(labels))
    partial = _Partial(partial_path, fp, resume, log)
    counters = {"computed": 0, "resumed": 0}

    def chunk_arrays(sel: np.ndarray, pad: np.ndarray) -> dict:
        return shard_batch({"image": _to_float(images[pad]), "label": labels[pad],
                            "eps": eps_all[pad], "mask": np.arange(len(pad)) < len(sel)}, mesh)

    def run_stage(stage_id: str, settings: dict, population: np.ndarray,
                  make_step: Callable[[], Callable], key: jax.Array | None,
                  on_chunk: Callable[[dict, np.ndarray, Any], int]):
        """Runs make_step()(variables, batch[, key]) over the chunks of `population` not done
        yet; built and compiled only if a chunk is left, ahead of time so that the timings
        exclude compilation."""
        rec = partial.stage(stage_id, settings, population, n)
        chunks = list(_padded_chunks(population, batch_size))
        done = set(rec["done"])
        counters["resumed"] += len(done)
        if done:
            log(f"[{stage_id}] resuming: {len(done)}/{len(chunks)} chunks already done")
        compiled = None
        for c, (sel, pad) in enumerate(chunks):
            if c in done:
                continue
            args = [variables, chunk_arrays(sel, pad)]
            if key is not None:
                args.append(jax.random.fold_in(key, c))
            if compiled is None:
                t0 = time.perf_counter()
                compiled = jax.jit(make_step()).lower(*args).compile()
                rec["compile_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            out = jax.device_get(compiled(*args))
            dt = time.perf_counter() - t0
            hits = on_chunk(rec, sel, out)
            rec["done"].append(c)
            rec["seconds"] += dt
            rec["images"] += len(sel)
            rec["computed_chunks"] += 1
            counters["computed"] += 1
            partial.save()
            log(f"[{stage_id}] chunk {c + 1}/{len(chunks)}: {len(sel)} images in {dt:.2f}s "
                f"({len(sel) / max(dt, 1e-9):.1f} img/s), {hits}/{len(sel)} "
                f"{'correct' if key is None else 'fooled'}")
        return rec

    # -- clean pass, with the gradient-masking checks on its clean-correct rows
    def clean_step(variables, batch):
        logits_fn = make_logits_fn(model, variables, "eval")
        x, y = batch["image"], batch["label"]
        logits = logits_fn(x)
        correct = jnp.argmax(logits, -1) == y
        n_zero, n_checked = checks.zero_gradient_count(logits_fn, x, y, correct & batch["mask"])
        return correct, n_zero, n_checked, checks.looks_like_probabilities(logits)

    def clean_chunk(rec: dict, sel: np.ndarray, out: Any) -> int:
        correct, n_zero, n_checked, probs = out
        correct = np.asarray(correct)[: len(sel)]
        hits = _unbits(rec["hits"])
        hits[sel] = correct
        rec["hits"] = _bits(hits)
        extra = rec["extra"]
        extra["n_zero_grad"] = extra.get("n_zero_grad", 0) + int(n_zero)
        extra["n_grad_checked"] = extra.get("n_grad_checked", 0) + int(n_checked)
        extra["probabilities"] = bool(extra.get("probabilities", True)) and bool(probs)
        return int(correct.sum())

    rec = run_stage("clean", {"attack": "clean"}, np.arange(n), lambda: clean_step, None,
                    clean_chunk)
    clean_correct = _unbits(rec["hits"])
    clean_extra = rec["extra"]
    if "output_gap" not in clean_extra and n:
        # eager calls on purpose: randomness drawn in Python would be frozen by jit
        logits_fn = make_logits_fn(model, variables, "eval")
        clean_extra["output_gap"] = checks.randomness_gap(
            logits_fn, jnp.asarray(_to_float(images[: min(n, 16)])))
        partial.save()

    # -- attacks
    def make_attack_step(stage: Stage) -> Callable:
        bound = _bound_attack(stage, num_classes)

        def attack_step(variables, batch, key):
            logits_fn = make_logits_fn(model, variables, "eval")
            x, y, eps = batch["image"], batch["label"], batch["eps"]
            return judge(logits_fn, x, y, bound(logits_fn, x, y, key, eps), eps, "linf")
        return attack_step

    def attack_chunk(rec: dict, sel: np.ndarray, out: Any) -> int:
        fooled, valid = (np.asarray(a)[: len(sel)] for a in out)
        hits = _unbits(rec["hits"])
        hits[sel] = fooled
        rec["hits"] = _bits(hits)
        rec["invalid"] += int(np.sum(~valid))
        return int(np.sum(fooled))

    robust: dict[str, np.ndarray] = {}
    stages_out: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for spec in specs:
        alive = clean_correct.copy()
        root = attack_key(seed, spec.name)
        multi = len(spec.stages) > 1
        fooled_by: dict[str, np.ndarray] = {}
        invalid: dict[str, int] = {}
        for a, stage in enumerate(spec.stages):
            population = np.flatnonzero(alive)
            key = jax.random.fold_in(root, a) if multi else root
            rec = run_stage(stage.stage_id, dict(stage.kwargs, kind=stage.kind), population,
                            functools.partial(make_attack_step, stage), key, attack_chunk)
            fooled = _unbits(rec["hits"]) & alive
            alive = alive & ~fooled
            fooled_by[stage.kind], invalid[stage.kind] = fooled, int(rec["invalid"])
            stages_out[stage.stage_id] = {
                "settings": dict(stage.kwargs), "attacked": int(len(population)),
                "fooled": int(fooled.sum()), "robust_accuracy_after": float(alive.mean()) if n
                else float("nan"), "invalid_outputs": int(rec["invalid"]),
                "seconds": rec["seconds"], "compile_seconds": rec["compile_seconds"],
                "images_per_s": rec["images"] / rec["seconds"] if rec["seconds"] else None,
            }
        robust[spec.name] = alive
        if spec.name == "autoattack":
            warnings += [f"autoattack: {w}" for w in _autoattack_warnings(
                spec, num_classes, clean_extra, fooled_by, invalid, n)]
        elif invalid.get(spec.stages[0].kind):
            warnings.append(f"{spec.name} returned {invalid[spec.stages[0].kind]} points outside "
                            "the eps ball or [0, 1]; they were not counted as adversarial")
    if not any(s.name == "autoattack" for s in specs):
        warnings += _autoattack_warnings(None, num_classes, clean_extra, {}, {}, n)
    return AttackOutcome(clean_correct, robust, stages_out, warnings, counters["computed"],
                         counters["resumed"])


def _autoattack_warnings(spec: AttackSpec | None, num_classes: int, clean: dict,
                         fooled_by: dict, invalid: dict, n: int) -> list[str]:
    """The reference's sanity checks, formatted (gradient masking, misuse)."""
    out: list[str] = []
    if spec is not None:
        n_targets = {s.kind: int(s.kwargs["n_target_classes"]) for s in spec.stages
                     if "n_target_classes" in s.kwargs}
        out += checks.target_class_warnings([s.kind for s in spec.stages], num_classes, n_targets)
        out += [f"{k} uses {v} target classes (standard AutoAttack uses 9)"
                for k, v in n_targets.items() if v < 9]
    out += checks.format_warnings(
        n_zero_grad=clean.get("n_zero_grad", 0), n_grad_checked=max(
            clean.get("n_grad_checked", 0), 1), output_gap_value=clean.get("output_gap", 0.0),
        probabilities=clean.get("probabilities", False), fooled_by=fooled_by, invalid=invalid,
        batch_size=n)
    return out


# ----------------------------------------------------------------------------- a workdir
@dataclasses.dataclass
class LoadedRun:
    """A trained run rebuilt from its workdir: config, data splits, model and weights."""

    config: ml_collections.ConfigDict
    splits: Any
    model: Any
    variables: dict
    checkpoint: str  # "best" | "last": what was loaded
    step: int
    epoch: int | None
    meta: dict


def _latest_step(directory: str) -> int | None:
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory)
             if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state"))]
    return max(steps) if steps else None


def _read_meta(workdir: str, kind: str, step: int) -> dict:
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(
        os.path.join(workdir, kind),
        options=ocp.CheckpointManagerOptions(create=False))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as err:  # orbax raises many types; all mean the same here
        raise CheckpointError(f"cannot read the metadata of {workdir}/{kind}/{step}: "
                              f"{type(err).__name__}: {err}") from err
    finally:
        manager.close()
    return dict(restored["meta"])


def load_run(workdir: str, checkpoint: str = "best", log: Log = print) -> LoadedRun:
    """Rebuilds a run from `workdir`: the best-on-validation checkpoint (or the last one when
    there is no best, with a printed note), the config stored with it, its data and model."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint!r}: choose one of {sorted(CHECKPOINTS)}")
    workdir = os.path.abspath(workdir)
    kind = CHECKPOINTS[checkpoint]
    step = _latest_step(os.path.join(workdir, kind))
    if step is None and checkpoint == "best":
        step = _latest_step(os.path.join(workdir, LAST))
        if step is not None:
            log(f"note: {workdir}/{BEST} holds no checkpoint (no validation split, or no epoch "
                "finished yet); evaluating the last checkpoint instead")
            checkpoint, kind = "last", LAST
    if step is None:
        looked = [os.path.join(workdir, CHECKPOINTS[checkpoint])]
        if checkpoint == "best":
            looked.append(os.path.join(workdir, LAST))
        raise CheckpointError(f"no checkpoint found: looked for <step>/ directories in "
                              f"{' and '.join(looked)}; is --workdir a training run's workdir "
                              "(launch.py --workdir)?")
    meta = _read_meta(workdir, kind, step)
    if "config" not in meta:
        raise CheckpointError(f"{workdir}/{kind}/{step} has no config in its metadata; it was "
                              "not written by hamjax.train")
    config = ml_collections.ConfigDict(meta["config"])
    validate_config(config)
    from hamjax.data import load_splits

    splits = load_splits(config.data, seed=config.seed)
    ctx = build_context(config, splits)
    like = create_train_state(ctx, get_method(config.method.name), config.seed)
    checkpointer = Checkpointer(workdir)
    try:
        restored = checkpointer.restore(like, kind=kind, step=step)
    finally:
        checkpointer.close()
    assert restored is not None
    state, meta = restored
    epoch = meta.get("best_epoch") if kind == BEST else len(meta.get("epochs", [])) or None
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return LoadedRun(config, splits, ctx.model, variables, checkpoint, int(state.step), epoch,
                     meta)


def _counts(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> PerClassCounts:
    return PerClassCounts(
        correct=np.bincount(labels, weights=correct.astype(np.float64), minlength=num_classes),
        total=np.bincount(labels, minlength=num_classes).astype(np.float64))


def save_chart(path: str, columns: Mapping[str, Sequence[float]], class_names: Sequence[str],
               title: str) -> None:
    """Grouped per-class bars (accuracy %), one colour per column; Agg canvas, so it never
    touches the global matplotlib backend of a notebook."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, c = len(columns), len(class_names)
    fig = Figure(figsize=(max(6.0, 0.9 * c + 2.0), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(k, 1)
    x = np.arange(c)
    for i, (name, values) in enumerate(columns.items()):
        ax.bar(x + (i - (k - 1) / 2) * width, 100.0 * np.nan_to_num(np.asarray(values)), width,
               label=name)
    ax.set_xticks(x)
    ax.set_xticklabels([str(n) for n in class_names], rotation=45 if c > 10 else 0, ha="right"
                       if c > 10 else "center")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=min(k, 4))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def evaluate_workdir(
    workdir: str,
    attacks: Sequence[str] | str = ("pgd20", "autoattack"),
    split: str = "test",
    num_examples: int = 0,
    *,
    checkpoint: str = "best",
    batch_size: int | None = None,
    seed: int | None = None,
    eps: float | None = None,
    step_size: float | str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    fast: bool = False,
    resume: bool = True,
    write: bool = True,
    log: Log = print,
) -> dict[str, Any]:
    """Per-class clean/robust accuracy of a trained workdir under `attacks`; returns the record
    also written to `<workdir>/eval/<split>_<checkpoint>.json` (with a `.png` chart).

    Defaults come from the run's config: eps = config.eval.eps, batch_size = eval.batch_size,
    seed = config.seed; step_size (pgdN, cwN) = eps / 4 (a number or "eps/K"). num_examples: a
    seeded class-stratified subset (0: the whole split). fast: fewer steps/queries for smoke
    tests (recorded; not comparable with published numbers). resume: reuse the chunks finished
    by an earlier call with the same settings. Files are named after the checkpoint actually
    evaluated (`<split>_last.*` when "best" fell back to the last checkpoint).
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: choose one of {SPLITS}")
    if num_examples < 0:
        raise ConfigError(f"num_examples={num_examples}: must be >= 0 (0: the whole split)")
    check_attack_names(attacks)  # fail before loading anything
    run = load_run(workdir, checkpoint, log)
    cfg, splits = run.config, run.splits
    eps = float(cfg.eval.eps if eps is None else eps)
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"eps={eps}: must be in [0, 1] pixel units (8/255 = 0.0314)")
    seed = int(cfg.seed if seed is None else seed)
    n_dev = jax.device_count()
    batch_size = int(batch_size or cfg.eval.batch_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be >= 1")
    batch_size = -(-batch_size // n_dev) * n_dev
    specs = parse_attacks(attacks, eps=eps, num_classes=splits.num_classes, step_size=step_size,
                          overrides=overrides, fast=fast)
    data = splits.test if split == "test" else splits.val
    if data is None:
        raise ConfigError(f"split {split!r} is empty: the run has data.val_size=0")
    full_size = len(data)
    data = stratified_subset(data, num_examples or full_size, seed, splits.num_classes)
    names = list(splits.class_names)

    out_dir = os.path.join(os.path.abspath(workdir), "eval")
    stem = os.path.join(out_dir, f"{split}_{run.checkpoint}")
    if write:
        os.makedirs(out_dir, exist_ok=True)
    log(f"evaluating {os.path.abspath(workdir)} ({run.checkpoint} checkpoint, step {run.step}) on "
        f"{split}: {len(data)} examples, eps {eps:.5f}, attacks {', '.join(s.name for s in specs)}"
        f", chunks of {batch_size}, seed {seed}{' [FAST settings]' if fast else ''}")
    fingerprint = {"split": split, "checkpoint": run.checkpoint, "step": run.step,
                   "num_examples": int(num_examples)}
    t0 = time.time()
    outcome = run_attacks(run.model, run.variables, data.images, data.labels, splits.num_classes,
                          specs, eps=eps, seed=seed, batch_size=batch_size,
                          partial_path=stem + ".partial.json" if write else None,
                          fingerprint=fingerprint, resume=resume, log=log)
    labels = data.labels
    clean = _counts(outcome.clean_correct, labels, splits.num_classes)
    columns = {"clean": clean}
    attacks_out: dict[str, Any] = {}
    for spec in specs:
        robust = _counts(outcome.robust[spec.name], labels, splits.num_classes)
        columns[spec.name] = robust
        entry = {"settings": spec.settings, "robust": fairness_summary(robust, names),
                 "boundary_error": boundary_error(clean, robust, names)}
        stage_ids = [s.stage_id for s in spec.stages]
        timing = [outcome.stages[i] for i in stage_ids]
        seconds = sum(t["seconds"] for t in timing)
        entry["seconds"] = seconds
        entry["compile_seconds"] = sum(t["compile_seconds"] for t in timing)
        entry["examples_per_s"] = len(data) / seconds if seconds else None
        entry["stages"] = {i: outcome.stages[i] for i in stage_ids}
        attacks_out[spec.name] = entry
    combined_bool = outcome.clean_correct.copy()
    for spec in specs:
        combined_bool &= outcome.robust[spec.name]
    combined = _counts(combined_bool, labels, splits.num_classes)
    if len(specs) > 1:
        columns["combined"] = combined
    table = format_per_class_table(columns, names, boundary=("clean", list(columns)[-1]))
    result: dict[str, Any] = {
        "workdir": os.path.abspath(workdir),
        "split": split,
        "checkpoint": run.checkpoint,
        "checkpoint_requested": checkpoint,
        "checkpoint_step": run.step,
        "checkpoint_epoch": run.epoch,
        "num_examples": len(data),
        "num_examples_requested": int(num_examples),
        "sampling": "whole split" if len(data) == full_size else
                    f"class-stratified subset, seed {seed}",
        "eps": eps,
        "norm": "linf",
        "seed": seed,
        "batch_size": batch_size,
        "fast": bool(fast),
        "bn_mode": "eval",
        "attacks": attacks_out,
        "clean": fairness_summary(clean, names),
        "combined": {"attacks": [s.name for s in specs],
                     "rule": "robust only if clean-correct and robust to every listed attack",
                     "robust": fairness_summary(combined, names),
                     "boundary_error": boundary_error(clean, combined, names)},
        "gradient_masking_warnings": outcome.warnings,
        "class_names": names,
        "table": table,
        "progress": {"computed_chunks": outcome.computed_chunks,
                     "resumed_chunks": outcome.resumed_chunks},
        "seconds": time.time() - t0,
        "devices": [str(d) for d in jax.devices()],
        "jax_version": jax.__version__,
        "config": meta_config(run),
    }
    log(table)
    for w in outcome.warnings:
        log(f"warning: {w}")
    if write:
        result["json_path"], result["chart_path"] = stem + ".json", stem + ".png"
        result["partial_path"] = stem + ".partial.json"
        save_chart(stem + ".png", {k: fairness_summary(v)["per_class"]
                                   for k, v in columns.items()}, names,
                   f"{split} ({len(data)} examples), {run.checkpoint} step {run.step}, "
                   f"eps {eps:.4f}")
        tmp = stem + ".json.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
        os.replace(tmp, stem + ".json")
        log(f"wrote {stem}.json and {stem}.png")
    return result


def meta_config(run: LoadedRun) -> dict:
    """The run's config as stored in the checkpoint (JSON)."""
    return dict(run.meta.get("config", {}))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- CLI
def _parse_override(text: str) -> tuple[str, str, Any]:
    m = re.fullmatch(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)=(.+)", text)
    if m is None:
        raise ConfigError(f"--override {text!r}: write NAME.FIELD=VALUE, e.g. square.n_queries=100")
    try:
        value = ast.literal_eval(m.group(3))
    except (ValueError, SyntaxError):
        value = m.group(3)
    return m.group(1), m.group(2), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hamjax.evaluate",
        description="Per-class clean and robust accuracy of a trained workdir.",
        epilog=f"attack names: {VALID_ATTACKS_TEXT}")
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    p.add_argument("--attacks", default="pgd20,autoattack",
                   help="comma-separated attack names (default: pgd20,autoattack)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--num_examples", type=int, default=0,
                   help="class-stratified subset size; 0 = the whole split")
    p.add_argument("--checkpoint", default="best", choices=sorted(CHECKPOINTS),
                   help="best on validation (default; falls back to last) or last")
    p.add_argument("--batch_size", type=int, default=None, help="default: config.eval.batch_size")
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed")
    p.add_argument("--eps", type=float, default=None, help="default: config.eval.eps")
    p.add_argument("--step_size", default=None,
                   help="PGD/CW step: a number or eps/K (default eps/4 = 2/255 at eps 8/255)")
    p.add_argument("--override", action="append", default=[], metavar="NAME.FIELD=VALUE",
                   help="attack setting, e.g. square.n_queries=1000 (repeatable)")
    p.add_argument("--fast", action="store_true",
                   help="smoke-test preset: 10 APGD/FAB steps, 3 targets, 100 Square queries")
    p.add_argument("--no_resume", action="store_true", help="ignore the partial file")
    return p


def require_single_host(process_count: int) -> None:
    """ConfigError on a multi-process run: the CLI shards chunks over local devices only, so on
    N hosts each would redo (and rewrite) the whole evaluation."""
    if process_count > 1:
        raise ConfigError(
            f"python -m hamjax.evaluate runs on one host, but jax sees {process_count} processes;"
            " run it on a single host (the trainer's own final report is multi-host)")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: parses flags, calls evaluate_workdir; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file at INFO
    except ImportError:
        pass
    try:
        require_single_host(jax.process_count())
        overrides: dict[str, dict[str, Any]] = {}
        for text in args.override:
            name, field, value = _parse_override(text)
            overrides.setdefault(name, {})[field] = value
        evaluate_workdir(args.workdir, args.attacks, args.split, args.num_examples,
                         checkpoint=args.checkpoint, batch_size=args.batch_size, seed=args.seed,
                         eps=args.eps, step_size=args.step_size, overrides=overrides,
                         fast=args.fast, resume=not args.no_resume)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
