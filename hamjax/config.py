"""The config schema: defaults every experiment starts from, and validation before any compile.

Configs hold only plain values (numbers, strings, tuples), never live objects, so they serialise
into every result and can be swept from the command line (`--config.train.epochs=3`).
"""

from __future__ import annotations

import json

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


def _validate_attack(prefix: str, attack) -> None:
    _require(0.0 <= attack.eps <= 1.0, f"{prefix}.eps", attack.eps,
             "eps is in [0, 1] pixel units (8/255 = 0.0314 is the CIFAR standard)")
    _require(attack.step_size > 0, f"{prefix}.step_size", attack.step_size, "must be > 0")
    _require(int(attack.steps) >= 1, f"{prefix}.steps", attack.steps, "must be >= 1")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects a bad value before anything is compiled, naming the field and the fix."""
    from hamjax.data import validate_data_config
    from hamjax.methods import get_method
    from hamjax.models import model_names

    _require(isinstance(config.seed, int), "seed", config.seed, "must be an int")
    validate_data_config(config.data)
    _require(config.model.name in model_names(), "model.name", config.model.name,
             f"choose one of {sorted(model_names())}")
    compute_dtype(config.model.dtype, field="config.model.dtype")  # float16 refused with the fix
    method = get_method(config.method.name)
    _validate_attack("attack", config.attack)
    _require(config.attack.bn_mode in BN_MODES_FOR_ATTACK, "attack.bn_mode",
             config.attack.bn_mode, f"choose one of {BN_MODES_FOR_ATTACK}")
    _validate_attack("eval", config.eval)
    compute_dtype(config.eval.dtype, field="config.eval.dtype")

    train = config.train
    _require(int(train.epochs) >= 1, "train.epochs", train.epochs, "must be >= 1")
    _require(int(train.batch_size) >= 1, "train.batch_size", train.batch_size, "must be >= 1")
    _require(train.lr > 0, "train.lr", train.lr, "must be > 0")
    _require(0.0 <= train.momentum < 1.0, "train.momentum", train.momentum, "must be in [0, 1)")
    _require(train.weight_decay >= 0, "train.weight_decay", train.weight_decay, "must be >= 0")
    _require(list(train.lr_boundaries) == sorted(train.lr_boundaries), "train.lr_boundaries",
             train.lr_boundaries, "must be increasing epochs")
    _require(int(train.checkpoint_every_steps) >= 1, "train.checkpoint_every_steps",
             train.checkpoint_every_steps, "must be >= 1")
    selections = ("robust_average", "robust_worst", "clean_average")
    _require(config.eval.select_on in selections, "eval.select_on", config.eval.select_on,
             f"choose one of {selections}")
    if method.validate is not None:
        method.validate(config)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe copy of the config, stored with every result and checkpoint."""
    return json.loads(config.to_json_best_effort())
