"""AutoAttack (Croce & Hein, ICML 2020): an ensemble of attacks, per-example worst case.

An example counts as robust only if it is classified correctly when clean and every attack in
the ensemble fails on it; the returned point is the first successful attack's. "standard" runs,
in order, APGD-CE (100 steps, no restarts), APGD-T (targeted DLR, top-9 targets, 100 steps),
FAB-T (9 targets, 100 steps) and Square (5000 queries), as the reference `fra31/auto-attack`.

Two ways to run it:
- `autoattack` is pure and jittable: every attack runs on the whole batch (static shapes) and
  masks keep each example's earliest successful point, so it costs the sum of all attacks on all
  examples. Success is judged as in the reference, by re-evaluating the model on the attack's
  output (and, here, rejecting outputs outside the eps ball or [0, 1]).
- `run_autoattack` is the host-side driver over numpy arrays that realises the reference's
  saving: after each attack only the still-robust examples go on to the next one, gathered into
  fixed-size padded chunks so each attack compiles once. Use it for evaluation.

Both attach the reference's sanity checks (`hamjax.attacks.checks`) as `result.warnings`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks import checks
from hamjax.attacks.apgd import apgd, apgd_targeted

Array = jax.Array
LogitsFn = Callable[[Array], Array]
# attack(logits_fn, x, y, key, *, eps, norm, num_classes, **kwargs) -> x_adv or (x_adv, ...)
AttackFn = Callable[..., Any]
# bound attack (x, y, key, eps: f32[B]) -> x_adv; what `batch_fn` wraps
BoundAttack = Callable[[Array, Array, Array, Array], Array]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "custom")
VALID_TOL = 1e-5  # slack on the eps ball and the box when judging attack outputs

_log = logging.getLogger(__name__)


def _apgd_ce(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    del num_classes
    return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="ce", **kw)


def _apgd_dlr(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    del num_classes
    return apgd(logits_fn, x, y, key, eps=eps, norm=norm, loss="dlr", **kw)


def _apgd_t(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    del num_classes
    return apgd_targeted(logits_fn, x, y, key, eps=eps, norm=norm, **kw)


def _fab_t(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    from hamjax.attacks.fab import fab_targeted  # imported late: optional sibling module

    return fab_targeted(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kw)


def _fab(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    from hamjax.attacks.fab import fab

    return fab(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kw)


def _square(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    del num_classes
    from hamjax.attacks.square import square

    return square(logits_fn, x, y, key, eps=eps, norm=norm, **kw)


ATTACKS: dict[str, AttackFn] = {
    "apgd-ce": _apgd_ce,
    "apgd-dlr": _apgd_dlr,
    "apgd-t": _apgd_t,
    "fab-t": _fab_t,
    "fab": _fab,
    "square": _square,
}


def default_attack_kwargs(num_classes: int, n_queries: int = 5000) -> dict[str, dict[str, Any]]:
    """The reference's "standard" settings per attack (targets capped at num_classes - 1)."""
    n_targets = max(min(9, num_classes - 1), 1)
    return {
        "apgd-ce": dict(steps=100, n_restarts=1),
        "apgd-dlr": dict(steps=100, n_restarts=1),
        "apgd-t": dict(steps=100, n_target_classes=n_targets, n_restarts=1),
        "fab-t": dict(steps=100, n_target_classes=n_targets, n_restarts=1),
        "fab": dict(steps=100, n_restarts=1),
        "square": dict(n_queries=n_queries, p_init=0.8, n_restarts=1),
    }


def _plan(version: str, attacks, *, norm: str, num_classes: int, n_queries: int,
          attack_kwargs: Mapping[str, Mapping[str, Any]] | None):
    """Resolves version/attacks into [(name, bound attack(logits_fn, x, y, key, eps))]."""
    if version not in VERSIONS:
        raise ValueError(f"version={version!r}: choose one of {VERSIONS}")
    if version == "standard":
        if attacks is not None:
            raise ValueError("attacks is only read with version='custom'; standard runs "
                             f"{STANDARD_ATTACKS}")
        items = [(name, ATTACKS[name]) for name in STANDARD_ATTACKS]
    else:
        if not attacks:
            raise ValueError("version='custom' needs attacks: names from "
                             f"{sorted(ATTACKS)} or a mapping name -> attack fn")
        if isinstance(attacks, Mapping):
            items = list(attacks.items())
        else:
            unknown = [a for a in attacks if a not in ATTACKS]
            if unknown:
                raise ValueError(f"unknown attacks {unknown}; choose from {sorted(ATTACKS)}")
            items = [(name, ATTACKS[name]) for name in attacks]
    attack_kwargs = dict(attack_kwargs or {})
    extra = set(attack_kwargs) - {name for name, _ in items}
    if extra:
        raise ValueError(f"attack_kwargs names attacks that are not run: {sorted(extra)}")
    defaults = default_attack_kwargs(num_classes, n_queries)
    plan = []
    for name, fn in items:
        kw = {**(defaults.get(name, {}) if fn is ATTACKS.get(name) else {}),
              **attack_kwargs.get(name, {})}

        def bound(logits_fn, x, y, key, eps, fn=fn, kw=kw):
            out = fn(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kw)
            return out[0] if isinstance(out, tuple) else out

        plan.append((name, bound, kw))
    return plan


def _config_warnings(plan, num_classes: int) -> tuple[str, ...]:
    names = [name for name, _, _ in plan]
    n_targets = {name: kw["n_target_classes"] for name, _, kw in plan
                 if "n_target_classes" in kw}
    out = checks.target_class_warnings(names, num_classes, n_targets)
    standard = max(min(9, num_classes - 1), 1)
    for name, n in n_targets.items():
        if n < standard and name in STANDARD_ATTACKS:
            out.append(f"{name} uses {n} target classes (standard AutoAttack uses {standard})")
    return tuple(out)


def judge(logits_fn: LogitsFn, x: Array, y: Array, x_adv: Array, eps: Array, norm: str):
    """(fooled, valid) per example: an attack output counts only inside the threat model.

    valid: finite, in [0, 1] and within eps (+1e-5) of x. fooled: valid and misclassified when
    the model is re-evaluated on it (the reference trusts only this re-evaluation).
    """
    delta = (x_adv - x).reshape(x.shape[0], -1)
    size = (jnp.max(jnp.abs(delta), axis=-1) if norm == "linf"
            else jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1)))
    flat = x_adv.reshape(x.shape[0], -1)
    valid = (jnp.all(jnp.isfinite(flat), axis=-1) & (size <= eps + VALID_TOL)
             & jnp.all((flat >= -VALID_TOL) & (flat <= 1.0 + VALID_TOL), axis=-1))
    safe = jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, x)
    fooled = valid & (jnp.argmax(logits_fn(safe), axis=-1) != y)
    return fooled, valid


@flax.struct.dataclass
class AutoAttackResult:
    """Per-example outcome of AutoAttack, with the gradient-masking checks.

    clean_correct: bool[B]. robust: bool[B], correct and not fooled by any attack.
    robust_after: name -> bool[B], robust against every attack up to and including `name`.
    fooled_by: name -> bool[B], the attack's own successes among the examples it was run on
      (all clean-correct ones in `autoattack`, the survivors of earlier attacks in the driver).
    invalid: name -> i32, outputs rejected for leaving the threat model.
    n_zero_grad / n_grad_checked, output_gap, probabilities: raw check values (see
      `hamjax.attacks.checks`). `warnings` formats them; read it outside jit.
    """

    clean_correct: Any
    robust: Any
    robust_after: dict[str, Any]
    fooled_by: dict[str, Any]
    invalid: dict[str, Any]
    n_zero_grad: Any
    n_grad_checked: Any
    output_gap: Any
    probabilities: Any
    attack_names: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    config_warnings: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def warnings(self) -> list[str]:
        """Gradient-masking and misuse warnings (empty when every check passes)."""
        return list(self.config_warnings) + checks.format_warnings(
            n_zero_grad=self.n_zero_grad, n_grad_checked=self.n_grad_checked,
            output_gap_value=self.output_gap, probabilities=self.probabilities,
            fooled_by=self.fooled_by, invalid=self.invalid,
            batch_size=int(np.shape(self.robust)[0]))

    @property
    def robust_accuracy(self) -> float:
        return float(np.mean(np.asarray(self.robust)))

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(np.asarray(self.clean_correct)))


def chunked(chunk_size: int) -> Callable[[BoundAttack], BoundAttack]:
    """A `batch_fn` running each attack over chunks of the batch with lax.map (bounds memory).

    The batch size must be a multiple of chunk_size. Each chunk gets its own key.
    """
    def wrap(attack: BoundAttack) -> BoundAttack:
        def run(x, y, key, eps):
            batch = x.shape[0]
            if batch % chunk_size:
                raise ValueError(f"batch {batch} is not a multiple of chunk_size {chunk_size}")
            n = batch // chunk_size

            def split(a):
                return a.reshape((n, chunk_size) + a.shape[1:])

            keys = jax.random.split(key, n)
            out = jax.lax.map(lambda a: attack(*a), (split(x), split(y), keys, split(eps)))
            return out.reshape(x.shape)
        return run
    return wrap


def autoattack(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | Mapping[str, AttackFn] | None = None,
    num_classes: int,
    n_queries: int = 5000,
    batch_fn: Callable[[BoundAttack], BoundAttack] | None = None,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Array, AutoAttackResult]:
    """AutoAttack on one batch, pure and jittable (functools.partial the keyword config).

    eps: scalar or f32[B]. version "standard" or "custom" (then `attacks`: names from `ATTACKS`
    in the order to run, or a mapping name -> fn(logits_fn, x, y, key, *, eps, norm,
    num_classes, **kw) returning x_adv or (x_adv, ...)). attack_kwargs: name -> overrides of
    `default_attack_kwargs` (e.g. fewer steps in tests). batch_fn wraps each bound attack
    (x, y, key, eps) -> x_adv, e.g. `chunked(n)` or a sharding wrapper.

    Every attack runs on the whole batch (skipped only once no example is left robust); an
    example keeps the point of the first attack that fooled it. Attacking only the still-robust
    examples (the reference's saving) needs dynamic shapes: `run_autoattack` does that.
    """
    plan = _plan(version, attacks, norm=norm, num_classes=num_classes, n_queries=n_queries,
                 attack_kwargs=attack_kwargs)
    x = jnp.asarray(x, jnp.float32)
    batch, ndim = x.shape[0], x.ndim
    eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (batch,))
    clean_logits = logits_fn(x)
    clean_correct = jnp.argmax(clean_logits, axis=-1) == y
    n_zero, n_checked = checks.zero_gradient_count(logits_fn, x, y, clean_correct)
    gap = checks.output_gap([clean_logits, logits_fn(x)])

    robust, x_adv = clean_correct, x
    robust_after, fooled_by, invalid = {}, {}, {}
    keys = jax.random.split(key, len(plan))
    for (name, bound, _), k in zip(plan, keys, strict=True):
        attack = functools.partial(bound, logits_fn)
        if batch_fn is not None:
            attack = batch_fn(attack)
        # Nothing left to attack (all fooled or misclassified): skip the attack's compute.
        x_k = jax.lax.cond(jnp.any(robust),
                           lambda a, k=k, attack=attack: attack(*a, k, eps).astype(a[0].dtype),
                           lambda a: a[0], (x, y))
        fooled, valid = judge(logits_fn, x, y, x_k, eps, norm)
        fooled = fooled & clean_correct
        take = robust & fooled
        x_adv = jnp.where(take.reshape((-1,) + (1,) * (ndim - 1)), x_k, x_adv)
        robust = robust & ~fooled
        robust_after[name], fooled_by[name] = robust, fooled
        invalid[name] = jnp.sum(~valid & clean_correct).astype(jnp.int32)

    result = AutoAttackResult(
        clean_correct=clean_correct, robust=robust, robust_after=robust_after,
        fooled_by=fooled_by, invalid=invalid, n_zero_grad=n_zero, n_grad_checked=n_checked,
        output_gap=gap, probabilities=checks.looks_like_probabilities(clean_logits),
        attack_names=tuple(name for name, _, _ in plan),
        config_warnings=_config_warnings(plan, num_classes))
    return jax.lax.stop_gradient(x_adv), result


def _padded_chunks(idx: np.ndarray, size: int):
    """Yields (indices, the same padded to `size` by repeating the first): fixed shapes."""
    for start in range(0, len(idx), size):
        sel = idx[start:start + size]
        yield sel, np.concatenate([sel, np.full(size - len(sel), sel[0], sel.dtype)])


def run_autoattack(
    logits_fn: LogitsFn,
    x,
    y,
    key: Array,
    *,
    eps,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | Mapping[str, AttackFn] | None = None,
    num_classes: int,
    n_queries: int = 5000,
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    batch_size: int = 256,
    log_fn: Callable[[str], None] | None = None,
    randomness_calls: int = 2,
) -> tuple[np.ndarray, AutoAttackResult]:
    """Host-side AutoAttack over numpy arrays, attacking only still-robust examples.

    x: [N, H, W, C] in [0, 1], y: [N], eps scalar or [N]. After each attack the examples it
    fooled are dropped; the survivors are gathered into chunks of `batch_size` (the last one
    padded), so every attack compiles once. log_fn receives a progress line per attack (default:
    this module's logger at INFO). Returns (x_adv as numpy, AutoAttackResult of numpy arrays).
    """
    log = log_fn or _log.info
    plan = _plan(version, attacks, norm=norm, num_classes=num_classes, n_queries=n_queries,
                 attack_kwargs=attack_kwargs)
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    n = x.shape[0]
    eps_all = np.broadcast_to(np.asarray(eps, np.float32), (n,)).copy()
    everyone = np.arange(n)
    start_time = time.time()

    @jax.jit
    def clean_step(xb, yb, mask):
        logits = logits_fn(xb)
        correct = jnp.argmax(logits, axis=-1) == yb
        n_zero, n_checked = checks.zero_gradient_count(logits_fn, xb, yb, correct & mask)
        return correct, n_zero, n_checked, checks.looks_like_probabilities(logits)

    clean_correct = np.zeros(n, bool)
    n_zero = n_checked = 0
    probabilities = True
    for sel, pad in _padded_chunks(everyone, batch_size):
        mask = np.arange(batch_size) < len(sel)
        correct, z, c, p = clean_step(x[pad], y[pad], mask)
        clean_correct[sel] = np.asarray(correct)[:len(sel)]
        n_zero, n_checked = n_zero + int(z), n_checked + int(c)
        probabilities = probabilities and bool(p)
    gap = checks.randomness_gap(logits_fn, x[:batch_size], n_calls=randomness_calls)
    log(f"autoattack ({version}: {', '.join(name for name, _, _ in plan)}), {n} examples, "
        f"clean accuracy {clean_correct.mean():.2%}")

    robust, x_adv = clean_correct.copy(), x.copy()
    robust_after, fooled_by, invalid = {}, {}, {}
    for a, (name, bound, _) in enumerate(plan):
        @jax.jit
        def attack_step(xb, yb, kb, eb, bound=bound):
            x_k = bound(logits_fn, xb, yb, kb, eb)
            fooled, valid = judge(logits_fn, xb, yb, x_k, eb, norm)
            return x_k, fooled, valid

        idx = np.flatnonzero(robust)
        fooled_by[name] = np.zeros(n, bool)
        invalid[name] = 0
        t0 = time.time()
        attack_key = jax.random.fold_in(key, a)
        for c, (sel, pad) in enumerate(_padded_chunks(idx, batch_size)):
            x_k, fooled, valid = attack_step(x[pad], y[pad], jax.random.fold_in(attack_key, c),
                                             eps_all[pad])
            m = len(sel)
            fooled, valid = np.asarray(fooled)[:m], np.asarray(valid)[:m]
            x_adv[sel[fooled]] = np.asarray(x_k)[:m][fooled]
            robust[sel[fooled]] = False
            fooled_by[name][sel] = fooled
            invalid[name] += int(np.sum(~valid))
        robust_after[name] = robust.copy()
        now = time.time()
        log(f"{name}: fooled {int(fooled_by[name].sum())} of {len(idx)} attacked, robust accuracy "
            f"{robust.mean():.2%} ({now - t0:.1f} s, total {now - start_time:.1f} s)")

    result = AutoAttackResult(
        clean_correct=clean_correct, robust=robust, robust_after=robust_after,
        fooled_by=fooled_by, invalid={k: np.int32(v) for k, v in invalid.items()},
        n_zero_grad=np.int32(n_zero), n_grad_checked=np.int32(n_checked),
        output_gap=np.float32(gap), probabilities=np.bool_(probabilities),
        attack_names=tuple(name for name, _, _ in plan),
        config_warnings=_config_warnings(plan, num_classes))
    for w in result.warnings:
        log(f"warning: {w}")
    log(f"robust accuracy {result.robust_accuracy:.2%} (clean {result.clean_accuracy:.2%})")
    return x_adv, result
