"""AutoAttack (Croce & Hein, ICML 2020): an ensemble of attacks, per-example worst case.

An example counts as robust only if it is classified correctly when clean and every attack in
the ensemble fails on it; the returned point is the first successful attack's. "standard" runs,
in order, APGD-CE (100 steps, no restarts), APGD-T (targeted DLR, top-9 targets, 100 steps),
FAB-T (9 targets, 100 steps) and Square (5000 queries), as the reference `fra31/auto-attack`.

Two ways to run it:
- `autoattack` (here) is pure and jittable: every attack runs on the whole batch (static
  shapes) and masks keep each example's earliest successful point, so it costs the sum of all
  attacks on all examples. Success is judged as in the reference, by re-evaluating the model on
  the attack's output (and, here, rejecting outputs outside the eps ball or [0, 1]).
- `run_autoattack` (`hamjax.evaluation.autoattack`) runs
  the same plan over numpy arrays through the evaluation driver, realising the reference's
  saving: after each attack only the still-robust examples go on to the next one, in padded
  chunks of fixed size, each example with its own key. Use it for evaluation.

Both attach the reference's sanity checks (`hamjax.attacks.checks`) as `result.warnings`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks import checks, rng
from hamjax.attacks.apgd_attack import apgd, apgd_targeted
from hamjax.attacks.checks import judge
from hamjax.attacks.fab_attack import fab, fab_targeted
from hamjax.attacks.square_attack import square

Array = jax.Array
LogitsFn = Callable[[Array], Array]
# attack(logits_fn, x, y, key, *, eps, norm, num_classes, **kwargs) -> x_adv or (x_adv, ...)
AttackFn = Callable[..., Any]
# an attack with its settings: (logits_fn, x, y, key, eps f32[B]) -> x_adv
Bound = Callable[[LogitsFn, Array, Array, Array, Array], Array]
# bound attack on one logits_fn (x, y, key, eps: f32[B]) -> x_adv; what `batch_fn` wraps
BoundAttack = Callable[[Array, Array, Array, Array], Array]

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "custom")


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
    return fab_targeted(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kw)


def _fab(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    return fab(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kw)


def _square(logits_fn, x, y, key, *, eps, norm, num_classes, **kw):
    del num_classes
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


def bind(fn: AttackFn, kwargs: Mapping[str, Any], *, norm: str, num_classes: int) -> Bound:
    """`fn` with its settings: (logits_fn, x, y, key, eps) -> x_adv, whatever else it returns
    dropped. The one adapter between an attack's signature and the ensemble and evaluation."""
    kwargs = dict(kwargs)

    def bound(logits_fn, x, y, key, eps):
        out = fn(logits_fn, x, y, key, eps=eps, norm=norm, num_classes=num_classes, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return bound


class Planned(NamedTuple):
    """One attack of a resolved plan: name, the bound attack, its settings."""

    name: str
    bound: Bound
    kwargs: dict[str, Any]


def plan_attacks(version: str, attacks, *, norm: str, num_classes: int, n_queries: int = 5000,
                 attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> list[Planned]:
    """Resolves version/attacks/attack_kwargs into the attacks to run, in order."""
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
        plan.append(Planned(name, bind(fn, kw, norm=norm, num_classes=num_classes), kw))
    return plan


def config_warnings(kwargs_by_name: Mapping[str, Mapping[str, Any]],
                    num_classes: int) -> tuple[str, ...]:
    """Misuse warnings of a plan (attack name -> settings): too few classes for DLR, too many
    targets, or fewer targets than standard AutoAttack."""
    n_targets = {name: int(kw["n_target_classes"]) for name, kw in kwargs_by_name.items()
                 if "n_target_classes" in kw}
    out = checks.target_class_warnings(list(kwargs_by_name), num_classes, n_targets)
    standard = max(min(9, num_classes - 1), 1)
    for name, n in n_targets.items():
        if n < standard and name in STANDARD_ATTACKS:
            out.append(f"{name} uses {n} target classes (standard AutoAttack uses {standard})")
    return tuple(out)


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

    The batch size must be a multiple of chunk_size. Each chunk gets its own key, or with one
    key per example (`hamjax.attacks.rng`) each example keeps its own.
    """
    def wrap(attack: BoundAttack) -> BoundAttack:
        def run(x, y, key, eps):
            batch = x.shape[0]
            if batch % chunk_size:
                raise ValueError(f"batch {batch} is not a multiple of chunk_size {chunk_size}")
            n = batch // chunk_size

            def split(a):
                return a.reshape((n, chunk_size) + a.shape[1:])

            keys = split(key) if rng.is_per_example(key) else jax.random.split(key, n)
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

    eps: scalar or f32[B]; key: one key, or one per example. version "standard" or "custom"
    (then `attacks`: names from `ATTACKS` in the order to run, or a mapping name ->
    fn(logits_fn, x, y, key, *, eps, norm, num_classes, **kw) returning x_adv or
    (x_adv, ...)). attack_kwargs: name -> overrides of `default_attack_kwargs` (e.g. fewer
    steps in tests). batch_fn wraps each bound attack (x, y, key, eps) -> x_adv, e.g.
    `chunked(n)` or a sharding wrapper.

    Every attack runs on the whole batch (skipped only once no example is left robust); an
    example keeps the point of the first attack that fooled it. Attacking only the still-robust
    examples (the reference's saving) needs dynamic shapes: `run_autoattack` does that.
    """
    plan = plan_attacks(version, attacks, norm=norm, num_classes=num_classes,
                        n_queries=n_queries, attack_kwargs=attack_kwargs)
    x = jnp.asarray(x, jnp.float32)
    batch, ndim = x.shape[0], x.ndim
    eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (batch,))
    clean_logits = logits_fn(x)
    clean_correct = jnp.argmax(clean_logits, axis=-1) == y
    n_zero, n_checked = checks.zero_gradient_count(logits_fn, x, y, clean_correct)
    gap = checks.output_gap([clean_logits, logits_fn(x)])

    robust, x_adv = clean_correct, x
    robust_after, fooled_by, invalid = {}, {}, {}
    keys = rng.split(key, len(plan))
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
        attack_names=tuple(p.name for p in plan),
        config_warnings=config_warnings({p.name: p.kwargs for p in plan}, num_classes))
    return jax.lax.stop_gradient(x_adv), result
