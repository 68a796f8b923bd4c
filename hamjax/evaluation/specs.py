"""Attack names -> resolved settings, keys and bound attacks.

Names: pgdN (PGD-N on cross-entropy), cwN (PGD-N on the CW margin; cw = cw20), fgsm, the
AutoAttack components (apgd-ce, apgd-dlr, apgd-t, fab-t, fab, square) and autoattack (the
standard chain). Every setting is resolved here, so results record what was run; overrides
come keyed by a listed name, an AutoAttack component, or "pgd" / "cw" for every pgdN / cwN.
`override_schema` is the same as a ConfigDict of typed placeholders: the CLI parses
`--attack.square.n_queries=1000` with ml_collections, as launch.py parses `--config.x.y=v`.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from hamjax.attacks.autoattack_ensemble import (
    ATTACKS,
    STANDARD_ATTACKS,
    Bound,
    bind,
    default_attack_kwargs,
)
from hamjax.attacks.pgd_attack import fgsm, pgd
from hamjax.errors import ConfigError

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
_STEP_FIELDS = {"step_size": str, "random_start": bool}  # str: a number or "eps/K"
_APGD_FIELDS = {"steps": int, "n_restarts": int, "rho": float}
_FAB_FIELDS = {"steps": int, "n_restarts": int, "alpha_max": float, "eta": float, "beta": float}
# What may be overridden, per kind: the CLI's --attack.<kind>.<field> (kinds with "_" for "-").
TUNABLE: dict[str, dict[str, type]] = {
    "pgd": _STEP_FIELDS, "cw": _STEP_FIELDS, "fgsm": _STEP_FIELDS,
    "apgd-ce": _APGD_FIELDS, "apgd-dlr": _APGD_FIELDS,
    "apgd-t": {**_APGD_FIELDS, "n_target_classes": int},
    "fab-t": {**_FAB_FIELDS, "n_target_classes": int}, "fab": _FAB_FIELDS,
    "square": {"n_queries": int, "p_init": float, "n_restarts": int},
}
_STEP_RE = re.compile(r"^(pgd|cw)(\d*)$")


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


def resolve_step(step_size: float | str | None, eps: float) -> float:
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


def _overridable(names: Sequence[str]) -> set[str]:
    """Override keys that act on `names`: the names, their kinds, AutoAttack's components."""
    out = set(names)
    for name in names:
        m = _STEP_RE.match(name)
        if m:
            out.add(m.group(1))
        if name == "autoattack":
            out |= set(STANDARD_ATTACKS)
    return out


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

    overrides: key -> fields, the key a listed attack (e.g. {"pgd20": {"step_size": 0.01}}),
    "pgd" / "cw" (every pgdN / cwN) or an AutoAttack component (e.g. {"square": {"n_queries":
    100}}: applies inside AutoAttack and to a standalone square). Unknown names raise
    ConfigError listing the valid ones.
    """
    names = check_attack_names(attacks)
    overrides = {k.lower(): dict(v) for k, v in (overrides or {}).items()}
    allowed = _overridable(names)
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
            kind = m.group(1)
            kw = {"steps": int(m.group(2) or 20), "step_size": step_size, "random_start": True,
                  "loss": "ce" if kind == "pgd" else "cw", **overrides.get(kind, {}),
                  **overrides.get(name, {})}
            kw["step_size"] = resolve_step(kw["step_size"], eps)
            specs.append(AttackSpec(name, dict(kw, attack="pgd"), (Stage(name, "pgd", kw),)))
        elif name == "fgsm":
            kw = {"step_size": eps, "random_start": False, **overrides.get(name, {})}
            kw["step_size"] = resolve_step(kw["step_size"], eps)
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


def _pgd(logits_fn, x, y, key, *, eps, norm, num_classes, steps, step_size, loss,
         random_start):
    del num_classes
    return pgd(logits_fn, x, y, key, eps=eps, step_size=step_size, steps=int(steps), norm=norm,
               loss=loss, random_start=bool(random_start))


def _fgsm(logits_fn, x, y, key, *, eps, norm, num_classes, step_size, random_start):
    del num_classes
    return fgsm(logits_fn, x, y, key, eps=eps, step_size=step_size, norm=norm,
                random_start=bool(random_start))


STAGE_ATTACKS = {"pgd": _pgd, "fgsm": _fgsm, **ATTACKS}


def bound_attack(stage: Stage, num_classes: int) -> Bound:
    """(logits_fn, x, y, key, eps f32[B]) -> x_adv for one stage (L_inf)."""
    return bind(STAGE_ATTACKS[stage.kind], stage.kwargs, norm="linf", num_classes=num_classes)


def attack_key(seed: int, name: str) -> jax.Array:
    """The attack's root key: a function of (seed, name) only, so adding or reordering attacks
    never changes another attack's randomness (and resumed chunks match uninterrupted ones)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def section(kind: str) -> str:
    """A kind as a ConfigDict key: "apgd-ce" -> "apgd_ce"."""
    return kind.replace("-", "_")


def override_schema() -> ml_collections.ConfigDict:
    """Every tunable field of every kind as a typed placeholder (None: not overridden)."""
    return ml_collections.ConfigDict({
        section(kind): {f: ml_collections.config_dict.placeholder(t) for f, t in fields.items()}
        for kind, fields in TUNABLE.items()})


def overrides_from(schema: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """The fields set in an `override_schema` ConfigDict, keyed by kind (for parse_attacks)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in TUNABLE:
        fields = {k: v for k, v in schema[section(kind)].items() if v is not None}
        if fields:
            out[kind] = fields
    return out
