"""The config schema: defaults every experiment starts from, and validation before any compile.

Configs hold only plain values (numbers, strings, tuples), never live objects, so they serialise
into every result and can be swept from the command line (`--config.train.epochs=3`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from hamjax.errors import ConfigError
from hamjax.models.layers import compute_dtype

BN_MODES_FOR_ATTACK = ("eval", "batch")


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment may set, with the field's conventional default."""
    from hamjax.data import default_data_config
    from hamjax.models import default_model_config

    c = ml_collections.ConfigDict()
    c.seed = 1
    c.data = default_data_config()
    c.model = default_model_config()

    c.method = ml_collections.ConfigDict()
    c.method.name = "pgd_at"

    # The training attack (methods read it; TRADES/CAAT switch its loss).
    c.attack = ml_collections.ConfigDict()
    c.attack.eps = 8 / 255
    c.attack.step_size = 2 / 255
    c.attack.steps = 10
    c.attack.random_start = True
    c.attack.bn_mode = "eval"  # BN running statistics while attacking (logged with every result)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 120
    c.train.batch_size = 128
    c.train.lr = 0.1
    c.train.lr_schedule = "piecewise"
    c.train.lr_boundaries = (60, 90, 110)  # epochs
    c.train.lr_values = (0.01, 0.001, 0.0005)  # the lr from each boundary on
    c.train.momentum = 0.9
    c.train.weight_decay = 2e-4
    c.train.checkpoint_every_steps = 500
    c.train.log_every_steps = 50
    c.train.eval_every_epochs = 1
    c.train.init_from = ""  # a workdir or checkpoint dir to fine-tune from (weights only)
    c.train.keep_checkpoints = 2

    # Periodic evaluation on the validation split (model selection) and final test report.
    c.eval = ml_collections.ConfigDict()
    c.eval.eps = 8 / 255
    c.eval.step_size = 2 / 255
    c.eval.steps = 20
    c.eval.batch_size = 256
    c.eval.num_examples = 0  # 0: the whole split
    c.eval.select_on = "robust_worst"  # robust_average | robust_worst | clean_average
    # The attack whose validation numbers select the checkpoint: "pgd" (PGD-N above) or "apgd"
    # (APGD-CE, then targeted APGD on its survivors; 0 targets: APGD-CE only). Defaults keep a
    # validation pass under a quarter of a Fashion-MNIST training epoch (arithmetic in
    # hamjax/evaluation/selection.py).
    c.eval.select_attack = "pgd"
    c.eval.select_apgd_steps = 10
    c.eval.select_apgd_targets = 2
    c.eval.final_splits = ("test",)
    # Evaluation attacks' compute dtype, independent of model.dtype: a bfloat16-trained model is
    # attacked in float32 unless asked, so margins (CW, DLR, FAB) are not bfloat16-rounded.
    c.eval.dtype = "float32"
    return c


def method_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """`config.method` for a registered method: its name, its documented defaults, overrides.

    Unknown override keys are rejected, so a typo never silently leaves a default in place.
    """
    from hamjax.methods import get_method

    method = get_method(name)
    fields = dict(method.defaults)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(
            f"config.method fields {unknown} are not fields of method {name!r}; it has "
            f"{sorted(fields)}"
        )
    fields.update(overrides)
    return ml_collections.ConfigDict({"name": name, **fields})


def _require(ok: bool, field: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (bools, NaN and infinities are not numbers here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_sequence(value: Any) -> bool:
    """A tuple or list (configs write tuples; JSON, e.g. a checkpoint's config, gives lists)."""
    return isinstance(value, (tuple, list))


def _int(section, prefix: str, name: str, minimum: int, fix: str = "") -> None:
    value = section[name]
    _require(_is_int(value) and value >= minimum, f"{prefix}.{name}", value,
             f"must be an int >= {minimum}{fix}")


def _number(section, prefix: str, name: str, ok, fix: str) -> None:
    value = section[name]
    _require(_is_number(value) and ok(value), f"{prefix}.{name}", value, fix)


def _choice(section, prefix: str, name: str, choices: tuple) -> None:
    value = section[name]
    _require(isinstance(value, str) and value in choices, f"{prefix}.{name}", value,
             f"choose one of {choices}")


def _bool(section, prefix: str, name: str) -> None:
    value = section[name]
    _require(isinstance(value, bool), f"{prefix}.{name}", value, "must be True or False")


def _is_section(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


def _paths(tree, prefix: str = "") -> set[str]:
    """Dotted paths of every non-section field of a (nested) config or dict."""
    out: set[str] = set()
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out |= _paths(value, f"{path}.") if _is_section(value) else {path}
    return out


def _validate_fields(config: ml_collections.ConfigDict, method) -> None:
    """Every field of base_config() (and only the method's own fields) is there and nothing
    else: an unknown field is a typo that would silently leave the default in place."""
    schema = _paths({k: v for k, v in base_config().items() if k != "method"})
    present = _paths({k: v for k, v in config.items() if k != "method"})
    if schema - present:
        raise ConfigError(
            f"config.{sorted(schema - present)[0]} is missing (missing: "
            f"{sorted(schema - present)}); start from hamjax.config.base_config(), which has "
            "every field")
    unknown = sorted(present - schema) + sorted(
        f"method.{k}" for k in set(config.method) - {"name"} - set(method.defaults))
    if unknown:
        raise ConfigError(
            f"config.{unknown[0]} is not a field (unknown: {unknown}); check the spelling "
            f"against hamjax.config.base_config() and method {config.method.name!r}'s fields "
            f"{sorted(method.defaults)} (hamjax.config.method_config)")


def _validate_model(model) -> None:
    from hamjax.models import model_names

    _require(model.name in model_names(), "model.name", model.name,
             f"choose one of {sorted(model_names())}")
    compute_dtype(model.dtype, field="config.model.dtype")  # float16 refused with the fix
    depth = model.depth
    _require(_is_int(depth) and depth >= 10 and (depth - 4) % 6 == 0, "model.depth", depth,
             "WideResNet depth must be an int 6n+4 >= 10, e.g. 28 or 34")
    _int(model, "model", "width", 1, " (WideResNet width)")
    for name in ("mean", "std"):
        value = model[name]
        stats = value if _is_sequence(value) else [value]
        ok = value is None or (bool(stats) and all(_is_number(v) for v in stats))
        if ok and value is not None and name == "std":
            ok = all(v > 0 for v in stats)
        _require(ok, f"model.{name}", value,
                 "None (the dataset's statistics) or one finite number per channel"
                 + (", all > 0" if name == "std" else ""))


def _validate_attack(prefix: str, attack) -> None:
    _number(attack, prefix, "eps", lambda v: 0.0 <= v <= 1.0,
            "eps is in [0, 1] pixel units (8/255 = 0.0314 is the CIFAR standard)")
    _number(attack, prefix, "step_size", lambda v: v > 0, "must be a number > 0")
    _int(attack, prefix, "steps", 1)


def _validate_train(train, fresh_start: bool) -> None:
    from hamjax.train.optim import SCHEDULES

    _int(train, "train", "epochs", 1)
    _int(train, "train", "batch_size", 1)
    _number(train, "train", "lr", lambda v: v > 0, "must be a finite number > 0")
    _choice(train, "train", "lr_schedule", SCHEDULES)
    bounds, values = train.lr_boundaries, train.lr_values
    _require(_is_sequence(bounds) and all(_is_number(b) and b >= 0 for b in bounds)
             and list(bounds) == sorted(bounds), "train.lr_boundaries", bounds,
             "must be a tuple of increasing epochs >= 0, e.g. (60, 90)")
    _require(_is_sequence(values) and all(_is_number(v) and v >= 0 for v in values),
             "train.lr_values", values, "must be a tuple of learning rates >= 0")
    _require(train.lr_schedule != "piecewise" or len(values) == len(bounds), "train.lr_values",
             values, f"needs one value per entry of config.train.lr_boundaries={bounds!r}")
    _number(train, "train", "momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    _number(train, "train", "weight_decay", lambda v: v >= 0, "must be a number >= 0")
    _int(train, "train", "checkpoint_every_steps", 1)
    _int(train, "train", "log_every_steps", 1)
    _int(train, "train", "eval_every_epochs", 1)
    _int(train, "train", "keep_checkpoints", 1, " (the newest are kept: 2 keeps one to fall "
         "back on if the latest is damaged)")
    init_from = train.init_from
    _require(isinstance(init_from, str), "train.init_from", init_from,
             "a finished run's workdir, or '' to train from scratch")
    _require(not (fresh_start and init_from) or holds_checkpoint(init_from), "train.init_from",
             init_from, "no such workdir, or it holds no checkpoint (a <step>/ directory in its "
             "best/ or checkpoints/); point it at a finished run's --workdir, or '' to train "
             "from scratch")


def holds_checkpoint(workdir: str) -> bool:
    """Whether `workdir` (local or gs://) has a saved step in best/ or checkpoints/; only looks,
    never creates anything."""
    from hamjax.paths import resolve

    root = resolve(workdir)
    for kind in ("best", "checkpoints"):
        folder = root / kind
        if folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir()):
            return True
    return False


def _validate_eval(ev) -> None:
    _validate_attack("eval", ev)
    _int(ev, "eval", "batch_size", 1)
    _int(ev, "eval", "num_examples", 0, " (0: the whole split)")
    _choice(ev, "eval", "select_on", SELECT_ON)
    _choice(ev, "eval", "select_attack", SELECT_ATTACKS)
    _int(ev, "eval", "select_apgd_steps", 1, " (APGD iterations per run)")
    _int(ev, "eval", "select_apgd_targets", 0, " (0: APGD-CE only, no targeted stage)")
    splits = ev.final_splits
    _require(_is_sequence(splits) and bool(splits) and len(set(splits)) == len(splits)
             and all(s in FINAL_SPLITS for s in splits), "eval.final_splits", splits,
             f"a non-empty tuple of distinct names from {FINAL_SPLITS}")
    compute_dtype(ev.dtype, field="config.eval.dtype")


SELECT_ON = ("robust_average", "robust_worst", "clean_average")
SELECT_ATTACKS = ("pgd", "apgd")  # hamjax.evaluation.selection
FINAL_SPLITS = ("test", "val")


def validate_config(config: ml_collections.ConfigDict, fresh_start: bool = False) -> None:
    """Rejects a bad value of any field before anything is loaded or compiled, naming the field
    (config.<section>.<field>) and the fix. Types are checked too: a config file, or a
    checkpoint's JSON config, may hold any value.

    fresh_start: the config is about to start a run (the Trainer of a workdir without a
    checkpoint), so a train.init_from must hold a checkpoint now; resuming a run, or reading a
    saved run's config, no longer needs the run it was fine-tuned from.
    """
    from hamjax.data import validate_data_config
    from hamjax.methods import get_method

    method = get_method(config.method.name)
    _validate_fields(config, method)
    _require(_is_int(config.seed) and config.seed >= 0, "seed", config.seed,
             "must be an int >= 0")
    validate_data_config(config.data)
    _validate_model(config.model)
    _validate_attack("attack", config.attack)
    _bool(config.attack, "attack", "random_start")
    _choice(config.attack, "attack", "bn_mode", BN_MODES_FOR_ATTACK)
    _validate_train(config.train, fresh_start)
    _validate_eval(config.eval)
    if method.validate is not None:
        method.validate(config)


# The one list of fields a resumed run may change (`Trainer` refuses any other difference from
# the checkpoint's config unless told `allow_config_change`): none of them changes the trained
# weights, which checkpoint is selected as best, or a reported number. Not here on purpose:
# eval.num_examples (the validation subset drives model selection and FRL/CAAT's per-epoch
# multipliers), eval.* attack fields and dtype (same), train.epochs (the cosine schedule and the
# report's length), train.eval_every_epochs (which epochs can be selected), data.source (another
# source may order the examples differently), train.init_from (where the weights came from).
RESUME_MAY_CHANGE: dict[str, str] = {
    "train.log_every_steps": "how often progress is printed and logged",
    "train.checkpoint_every_steps": "where periodic saves fall; a resume from any is bit-exact",
    "train.keep_checkpoints": "how many older checkpoints stay on disk",
    "eval.batch_size": "evaluation chunking; each result depends on its example alone",
    "eval.final_splits": "which splits the final report lists",
    "data.data_dir": "where the dataset's files are looked for (e.g. a copy on another machine)",
}
ABSENT = "(absent)"


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flatten(value, f"{path}.") if _is_section(value) else {path: value})
    return out


def config_changes(saved: Mapping, now: Mapping) -> list[dict]:
    """[{"field", "checkpoint", "now"}] for every field outside RESUME_MAY_CHANGE whose value
    differs between two JSON configs (`config_to_json`); ABSENT stands for a missing field."""
    old, new = _flatten(saved), _flatten(now)
    return [{"field": f, "checkpoint": old.get(f, ABSENT), "now": new.get(f, ABSENT)}
            for f in sorted(set(old) | set(new))
            if f not in RESUME_MAY_CHANGE and old.get(f, ABSENT) != new.get(f, ABSENT)]


def describe_changes(changes: list[dict]) -> str:
    """One indented line per changed field: `  attack.eps: 0.1 in the checkpoint, 0.3 now`."""
    return "\n".join(f"  {c['field']}: {c['checkpoint']!r} in the checkpoint, {c['now']!r} now"
                     for c in changes)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe copy of the config, stored with every result and checkpoint."""
    return json.loads(config.to_json_best_effort())
