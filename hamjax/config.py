"""The config schema: defaults every experiment starts from, and validation before any compile.

Configs hold only plain values (numbers, strings, tuples), never live objects, so they serialise
into every result and can be swept from the command line (`--config.train.epochs=3`).

A config file describes one setup (data, model, budget) and composes any registered method onto
it from its argument: `--config=configs/FILE.py:method=NAME[,budget=B][,scenario=TOKENS]`
(`compose`; ml_collections passes the text after ':' to the file's `get_config(arg)`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from hamjax.backends.cpu.conv import CONV_VJP_MODES
from hamjax.data import default_data_config, validate_data_config
from hamjax.data.scenarios import apply_scenario
from hamjax.errors import ConfigError
from hamjax.methods import available_methods, get_method
from hamjax.models import default_model_config, model_names
from hamjax.models.layers import compute_dtype
from hamjax.models.wide_resnet import check_wrn_shape
from hamjax.optim import SCHEDULES
from hamjax.paths import resolve
from hamjax.validation import is_int, is_number, is_sequence, require

BN_MODES_FOR_ATTACK = ("eval", "batch")


def base_config() -> ml_collections.ConfigDict:
    """Every field an experiment may set, with the field's conventional default."""
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
    # Train steps per jitted call (a lax.scan over that many batches; bit-exact with 1): > 1
    # lifts small, launch-bound models on a GPU/TPU. Logs and periodic checkpoints fall on the
    # first dispatch end at or after each multiple of their interval; no dispatch crosses an
    # epoch's end (its last one is shorter when steps_per_epoch is not a multiple).
    c.train.steps_per_dispatch = 1
    c.train.eval_every_epochs = 1
    c.train.init_from = ""  # a workdir or checkpoint dir to fine-tune from (weights only)
    # Which of init_from's checkpoints: 0 its best (else last); N its checkpoint at the end of
    # epoch N (a fine-tune from part of a run: FAAL on HAM's PGD-AT warm-up).
    c.train.init_epoch = 0
    # Branch: start from another run's full state (weights, optimiser, step, RNG, records) at the
    # end of epoch branch_epoch, with this config's method from then on (hamjax.run.branch_run).
    c.train.branch_from = ""
    c.train.branch_epoch = 0
    c.train.keep_checkpoints = 2
    # Weight averaging (hamjax.averaging): the average is validated, selected, reported.
    c.train.ema_decay = 0.0  # per-step EMA tau (Gowal et al.: 0.995); 0: off
    c.train.fawa_decay = 0.0  # CFA's fairness-aware averaging decay (CFA: 0.88); 0: off
    c.train.fawa_threshold = 0.24  # FAWA averages an epoch if val worst-class robust acc >= this

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


VARIANT_KEYS = ("method", "budget", "scenario")
Recipe = Callable[[ml_collections.ConfigDict], None]


def parse_variant(arg: str | None) -> dict[str, str]:
    """The argument after a config file's name: `method=trades,scenario=lt10+pairflip20` ->
    {"method": "trades", "scenario": "lt10+pairflip20"}. A bare item (no '=') is the method when
    it names one, else scenario tokens (`configs/cifar10_caat.py:pairflip20`)."""
    choice: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            key, value = ("method" if item in available_methods() else "scenario"), item
        key, value = key.strip(), value.strip()
        if key not in VARIANT_KEYS:
            raise ConfigError(
                f"config argument {item!r}: {key!r} is not a variant; use "
                f"{', '.join(k + '=...' for k in VARIANT_KEYS)} joined with ',' (fields: "
                "--config.<section>.<field>=value)")
        if key == "scenario" and choice.get(key):
            value = f"{choice[key]}+{value}"
        choice[key] = value
    return choice


def compose(setup: Callable[[], ml_collections.ConfigDict], arg: str | None, *,
            default_method: str, meta_per_class: int,
            recipes: Mapping[str, Recipe] | None = None,
            budgets: Mapping[str, Recipe] | None = None) -> ml_collections.ConfigDict:
    """A setup's config for the method and variants `arg` names (`parse_variant`).

    setup() gives the data, model and budget; the method's fields are its defaults
    (`method_config`); then `budgets[budget]` (e.g. a shorter fine-tuning schedule) and
    `recipes[method]` (this setup's published settings of that method) change what they need,
    in that order, so a method's recipe has the last word. A method
    that needs a meta set gets `meta_per_class` images per class when the setup holds none, so
    every registered method runs on every setup; `scenario` tokens go to `apply_scenario`.
    """
    choice = parse_variant(arg)
    config = setup()
    name = choice.get("method", default_method)
    config.method = method_config(name)
    budgets = budgets or {}
    if "budget" in choice:
        if choice["budget"] not in budgets:
            raise ConfigError(f"config argument budget={choice['budget']!r}: this setup has "
                              f"budgets {sorted(budgets)}")
        budgets[choice["budget"]](config)
    recipe = (recipes or {}).get(name)
    if recipe is not None:
        recipe(config)
    if get_method(name).needs_meta_batch and not config.data.meta_per_class:
        config.data.meta_per_class = meta_per_class
    apply_scenario(config.data, choice.get("scenario", ""))
    return config


def config_module(path: str | os.PathLike, sibling: str | None = None) -> types.ModuleType:
    """A config file loaded as a module (once per path), as `--config=path` loads it; `sibling`:
    the file of that name beside `path` (a config file reading configs/common.py)."""
    path = os.path.abspath(os.path.join(os.path.dirname(path), sibling) if sibling else path)
    name = "hamjax_config_file_" + "".join(c if c.isalnum() else "_" for c in path)
    if name not in sys.modules:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path} does not exist")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config `--config=spec` gives: `FILE.py` or `FILE.py:ARG` (get_config(ARG))."""
    path, sep, arg = spec.partition(":")
    module = config_module(path)
    return module.get_config(arg) if sep else module.get_config()


def variant(path: str, setup_file: str, arg: str) -> Callable[..., ml_collections.ConfigDict]:
    """`get_config` of a one-line variant file: the setup file beside `path` with `arg` first;
    the caller's own argument follows, so `configs/cifar10_caat.py:pairflip20` adds to it."""

    def get_config(extra: str | None = None) -> ml_collections.ConfigDict:
        return config_module(path, setup_file).get_config(",".join(filter(None, (arg, extra))))

    return get_config


def _int(section, prefix: str, name: str, minimum: int, fix: str = "") -> None:
    value = section[name]
    require(is_int(value) and value >= minimum, f"{prefix}.{name}", value,
             f"must be an int >= {minimum}{fix}")


def _number(section, prefix: str, name: str, ok, fix: str) -> None:
    value = section[name]
    require(is_number(value) and ok(value), f"{prefix}.{name}", value, fix)


def _choice(section, prefix: str, name: str, choices: tuple) -> None:
    value = section[name]
    require(isinstance(value, str) and value in choices, f"{prefix}.{name}", value,
             f"choose one of {choices}")


def _bool(section, prefix: str, name: str) -> None:
    value = section[name]
    require(isinstance(value, bool), f"{prefix}.{name}", value, "must be True or False")


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
    require(model.name in model_names(), "model.name", model.name,
             f"choose one of {sorted(model_names())}")
    compute_dtype(model.dtype, field="config.model.dtype")  # float16 refused with the fix
    _choice(model, "model", "conv_vjp", CONV_VJP_MODES)
    check_wrn_shape(model.depth, model.width)
    for name in ("mean", "std"):
        value = model[name]
        stats = value if is_sequence(value) else [value]
        ok = value is None or (bool(stats) and all(is_number(v) for v in stats))
        if ok and value is not None and name == "std":
            ok = all(v > 0 for v in stats)
        require(ok, f"model.{name}", value,
                 "None (the dataset's statistics) or one finite number per channel"
                 + (", all > 0" if name == "std" else ""))


def _validate_attack(prefix: str, attack) -> None:
    _number(attack, prefix, "eps", lambda v: 0.0 <= v <= 1.0,
            "eps is in [0, 1] pixel units (8/255 = 0.0314 is the CIFAR standard)")
    _number(attack, prefix, "step_size", lambda v: v > 0, "must be a number > 0")
    _int(attack, prefix, "steps", 1)


def _validate_train(train, fresh_start: bool) -> None:
    _int(train, "train", "epochs", 1)
    _int(train, "train", "batch_size", 1)
    _number(train, "train", "lr", lambda v: v > 0, "must be a finite number > 0")
    _choice(train, "train", "lr_schedule", SCHEDULES)
    bounds, values = train.lr_boundaries, train.lr_values
    require(is_sequence(bounds) and all(is_number(b) and b >= 0 for b in bounds)
             and list(bounds) == sorted(bounds), "train.lr_boundaries", bounds,
             "must be a tuple of increasing epochs >= 0, e.g. (60, 90)")
    require(is_sequence(values) and all(is_number(v) and v >= 0 for v in values),
             "train.lr_values", values, "must be a tuple of learning rates >= 0")
    require(train.lr_schedule != "piecewise" or len(values) == len(bounds), "train.lr_values",
             values, f"needs one value per entry of config.train.lr_boundaries={bounds!r}")
    _number(train, "train", "momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    _number(train, "train", "weight_decay", lambda v: v >= 0, "must be a number >= 0")
    _int(train, "train", "checkpoint_every_steps", 1)
    _int(train, "train", "log_every_steps", 1)
    _int(train, "train", "steps_per_dispatch", 1, " (train steps per jitted call; 1: one, "
         "8-32 for a small model on a GPU/TPU)")
    _int(train, "train", "eval_every_epochs", 1)
    _int(train, "train", "keep_checkpoints", 1, " (the newest are kept: 2 keeps one to fall "
         "back on if the latest is damaged)")
    init_from = train.init_from
    require(isinstance(init_from, str), "train.init_from", init_from,
             "a finished run's workdir, or '' to train from scratch")
    require(not (fresh_start and init_from) or holds_checkpoint(init_from), "train.init_from",
             init_from, "no such workdir, or it holds no checkpoint (a <step>/ directory in its "
             "best/ or checkpoints/); point it at a finished run's --workdir, or '' to train "
             "from scratch")
    _int(train, "train", "init_epoch", 0, " (0: init_from's best, else last, checkpoint; N: "
         "its checkpoint at the end of epoch N)")
    require(train.init_epoch == 0 or init_from, "train.init_epoch", train.init_epoch,
            "picks a checkpoint of train.init_from, which is empty: set train.init_from to the "
            "run's workdir, or init_epoch to 0")
    _validate_branch(train, fresh_start)


def _validate_branch(train, fresh_start: bool) -> None:
    branch_from, epoch = train.branch_from, train.branch_epoch
    require(isinstance(branch_from, str), "train.branch_from", branch_from,
            "a run's workdir to branch from, or '' to start from step 0")
    require(is_int(epoch) and epoch >= 0, "train.branch_epoch", epoch, "must be an int >= 0")
    if not branch_from:
        return
    require(not train.init_from, "train.branch_from", branch_from,
            "cannot be combined with train.init_from (a branch takes the whole state, a "
            "fine-tune only the weights): set one of them to ''")
    require(not fresh_start or holds_checkpoint(branch_from), "train.branch_from", branch_from,
            "no such workdir, or it holds no checkpoint; point it at the --workdir of the run "
            "to branch from")
    require(1 <= epoch < train.epochs, "train.branch_epoch", epoch,
            f"the epoch whose end the branch starts from: 1 .. {train.epochs - 1} "
            "(config.train.epochs - 1)")


def _validate_averaging(config) -> None:
    train = config.train
    for name in ("ema_decay", "fawa_decay"):
        _number(train, "train", name, lambda v: 0.0 <= v < 1.0,
                "must be in [0, 1) (0: off; EMA 0.995, FAWA 0.88)")
    _number(train, "train", "fawa_threshold", lambda v: 0.0 <= v <= 1.0,
            "must be a worst-class robust accuracy in [0, 1] (CFA: 0.24)")
    require(not (train.ema_decay > 0 and train.fawa_decay > 0), "train.fawa_decay",
             train.fawa_decay, f"cannot be on with train.ema_decay={train.ema_decay} (one "
             "averaged-weights slot); set one of them to 0")
    require(not (train.fawa_decay > 0 and config.data.val_size == 0), "train.fawa_decay",
             train.fawa_decay, "FAWA decides on the validation split; set data.val_size > 0 "
             "(CFA: 1000) or train.fawa_decay=0")


def holds_checkpoint(workdir: str) -> bool:
    """Whether `workdir` (local or gs://) has a saved step in best/ or checkpoints/; only looks,
    never creates anything."""
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
    require(is_sequence(splits) and bool(splits) and len(set(splits)) == len(splits)
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
    method = get_method(config.method.name)
    _validate_fields(config, method)
    require(is_int(config.seed) and config.seed >= 0, "seed", config.seed,
             "must be an int >= 0")
    validate_data_config(config.data)
    _validate_model(config.model)
    _validate_attack("attack", config.attack)
    _bool(config.attack, "attack", "random_start")
    _choice(config.attack, "attack", "bn_mode", BN_MODES_FOR_ATTACK)
    _validate_train(config.train, fresh_start)
    _validate_averaging(config)
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
    "train.steps_per_dispatch": "how many of the same steps one jitted call runs (bit-exact)",
    "eval.batch_size": "evaluation chunking; each result depends on its example alone",
    "eval.final_splits": "which splits the final report lists",
    "data.data_dir": "where the dataset's files are looked for (e.g. a copy on another machine)",
    "model.conv_vjp": "how convs and their gradients are computed (canonical_winograd: wide 3x3 "
                      "convs by Winograd F(2x2, 3x3)); the same values up to float rounding",
}
ABSENT = "(absent)"


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(_flatten(value, f"{path}.") if _is_section(value) else {path: value})
    return out


def default_values(method_name: str) -> dict[str, Any]:
    """Every field's default (base_config with the method's fields), flattened: what a field
    added to hamjax after a checkpoint was written stands at when it changes nothing."""
    config = base_config()
    if method_name in available_methods():
        config.method = method_config(method_name)
    return _flatten(config_to_json(config))


def config_changes(saved: Mapping, now: Mapping) -> list[dict]:
    """[{"field", "checkpoint", "now"}] for every field outside RESUME_MAY_CHANGE whose value
    differs between two JSON configs (`config_to_json`); ABSENT stands for a missing field.
    A field the checkpoint lacks (added to hamjax since) that now holds its default, which
    keeps the old behaviour (`train.ema_decay=0`, `method.awp_gamma=0`), is no change."""
    old, new = _flatten(saved), _flatten(now)
    method = new.get("method.name", old.get("method.name", ""))
    defaults = default_values(method) if set(new) - set(old) else {}
    return [{"field": f, "checkpoint": old.get(f, ABSENT), "now": new.get(f, ABSENT)}
            for f in sorted(set(old) | set(new))
            if f not in RESUME_MAY_CHANGE and old.get(f, ABSENT) != new.get(f, ABSENT)
            and not (f not in old and f != "method.name" and f in defaults
                     and new[f] == defaults[f])]


def describe_changes(changes: list[dict]) -> str:
    """One indented line per changed field: `  attack.eps: 0.1 in the checkpoint, 0.3 now`."""
    return "\n".join(f"  {c['field']}: {c['checkpoint']!r} in the checkpoint, {c['now']!r} now"
                     for c in changes)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe copy of the config, stored with every result and checkpoint."""
    return json.loads(config.to_json_best_effort())
