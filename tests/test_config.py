"""Every config field is validated before anything is loaded or compiled, and a resumed run's
config is compared with its checkpoint's field by field. Pure Python: no data, no compiles."""

from __future__ import annotations

import math
import os

import ml_collections
import pytest

from hamjax.config import (
    ABSENT,
    RESUME_MAY_CHANGE,
    base_config,
    config_changes,
    config_to_json,
    method_config,
    validate_config,
)
from hamjax.errors import ConfigError
from hamjax.methods import available_methods

NAN, INF = math.nan, math.inf

# Invalid values of every field of base_config() and of every method's defaults (method fields
# by their name: one table serves every method that has the field). A field added without an
# entry here fails test_the_table_covers_every_field; an entry whose value passes validation
# fails test_every_invalid_value_is_rejected_naming_the_field.
INVALID: dict[str, list] = {
    "seed": [-1, 1.5, "1", True],
    "data.name": ["imagenet22k", 3],
    "data.source": ["ftp", None],
    "data.data_dir": [5],
    "data.image_size": [2, 32.0],
    "data.val_size": [-1, 0.5],
    "data.train_size": [-1, "all"],
    "data.meta_per_class": [-1],
    "data.label_noise.kind": ["gaussian"],
    "data.label_noise.rate": [1.5, -0.1, NAN, "x"],
    "data.imbalance_factor": [0.5, NAN, "x"],
    "data.augment.crop_pad": [-1, 1.5],
    "data.augment.flip": ["yes", 1],
    "model.name": ["resnet5000"],
    "model.dtype": ["float16", "int8"],
    "model.depth": [33, 4, "34"],
    "model.width": [0, 2.5],
    "model.mean": ["abc", (), (0.5, "x"), (NAN,)],
    "model.std": [(0.0,), (-1.0, 1.0, 1.0), "x"],
    "model.conv_vjp": ["fast", "XLA", None],
    "method.name": ["pdg_at"],
    "attack.eps": [8.0, -0.1, NAN, "x"],
    "attack.step_size": [0, -1.0, INF, "x"],
    "attack.steps": [0, 2.5],
    "attack.random_start": ["yes", 1],
    "attack.bn_mode": ["train"],
    "train.epochs": [0, 1.5],
    "train.batch_size": [0, -16],
    "train.lr": [0, -0.1, INF, NAN],
    "train.lr_schedule": ["linear"],
    "train.lr_boundaries": [(90, 60), (-1, 60, 90), "60"],
    "train.lr_values": [(0.01,), (-0.01, 0.001, 0.0005), ("a", 0.001, 0.0005)],
    "train.momentum": [1.0, -0.1],
    "train.weight_decay": [-1, NAN],
    "train.checkpoint_every_steps": [0],
    "train.log_every_steps": [0, -5],
    "train.steps_per_dispatch": [0, -1, 2.5, "4", True],
    "train.eval_every_epochs": [0],
    "train.init_from": ["/nonexistent/run", "{empty_dir}", 3],
    "train.init_epoch": [-1, 1.5, "2"],
    "train.branch_from": ["/nonexistent/run", "{empty_dir}", 3],
    "train.branch_epoch": [-1, 1.5, "2"],
    "train.keep_checkpoints": [0, -1],
    "train.ema_decay": [1.0, -0.1, NAN, "x"],
    "train.fawa_decay": [1.0, -0.1, NAN],
    "train.fawa_threshold": [1.5, -0.1, NAN],
    "eval.eps": [-0.1, 1.5],
    "eval.step_size": [0],
    "eval.steps": [0],
    "eval.batch_size": [0],
    "eval.num_examples": [-5, 2.5],
    "eval.select_on": ["robust_best"],
    "eval.select_attack": ["autoattack", "APGD", 1],
    "eval.select_apgd_steps": [0, 2.5, "10"],
    "eval.select_apgd_targets": [-1, 1.5, True],
    "eval.final_splits": [("train",), (), "test", ("test", "test")],
    "eval.dtype": ["float16"],
    # method fields (TRADES, HAM, FRL, CAAT, GAIRAT, FAT)
    "method.beta": [-1.0, NAN, "x"],
    "method.warmup_epochs": [-1, 1.5],
    "method.mining_step": [0, 10],
    "method.buckets": [(), (0.5, 0.25, 1.0), (0.25, 0.5), (0.0, 1.0), "1.0"],
    "method.bucketed": ["yes"],
    "method.gair": [1],
    "method.gair_lambda": ["x"],
    "method.keep_easy_fraction": [1.5, -0.1],
    "method.hard_keep_fraction": [0.0, 1.5],
    "method.delta0": ["x", NAN],
    "method.delta1": ["x", INF],
    "method.rate1": [-0.1],
    "method.rate1_halve_every": [0, 1.5],
    "method.rate2": [-0.1],
    "method.lim": [1.0, 0.0],
    "method.margin_min": [0.0],
    "method.margin_max": [0.5],
    "method.normalise": ["both"],
    "method.frl_split": ["train"],
    "method.temperature": [0.0, -1.0],
    "method.meta_hidden": [0, 1.5],
    "method.meta_interval": [0],
    "method.meta_lr": [0.0],
    "method.meta_weight_decay": [-1.0],
    "method.meta_bn": ["train"],
    "method.meta_feature_grad": ["yes"],
    "method.initial_class_loss": ["x", INF],
    "method.adv_weight_floor": [1.5, -0.1],
    "method.meta_init_seed": [-2, 1.5, True],
    "method.begin_epoch": [-1],
    "method.tau": [-1, 0.5],
    "method.base": ["mart", 1],
    "method.lambda1": [0.0, "x"],
    "method.lambda2": [-0.1, NAN],
    "method.ccm": [1, "yes"],
    "method.ccr": ["yes"],
    "method.begin": [0, 1.5],
    "method.trades_scale": ["zhang"],
    "method.dafa_lambda": [-1.0, "x"],
    "method.eta": [-0.1, INF],
    "method.r": [-0.5, NAN],
    "method.easy_examples": ["keep", 1],
    "method.cross_batch_rows": [-1, 1.5, True, "128"],
    "method.awp_gamma": [-0.1, 1.0, NAN, "x"],
    "method.awp_warmup_epochs": [-1, 1.5],
    "method.awp_proxy_lr": [0.0, NAN],
}


def _paths(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def valid_config(method: str) -> ml_collections.ConfigDict:
    """base_config() with the method's own fields (CAAT needs its meta set)."""
    config = base_config()
    config.method = method_config(method)
    if method == "caat":
        config.data.meta_per_class = 300
    return config


def with_value(config: ml_collections.ConfigDict, path: str, value) -> ml_collections.ConfigDict:
    """A copy of `config` with `path` set to any value, of any type (as a config file or a
    checkpoint's JSON config may hold; a ConfigDict field would refuse another type)."""
    tree = config.to_dict()
    node = tree
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return ml_collections.ConfigDict(tree)


def every_field() -> list[tuple[str, str]]:
    """(method, field path) for every field of base_config() (with pgd_at) and of each
    registered method's config."""
    pairs = [("pgd_at", p) for p in _paths(valid_config("pgd_at").to_dict())]
    for method in available_methods():
        pairs += [(method, f"method.{name}") for name in method_config(method) if name != "name"]
    return pairs


def test_the_table_covers_every_field():
    assert {path for _, path in every_field()} == set(INVALID)


@pytest.mark.parametrize("method", available_methods())
def test_every_method_default_config_is_valid(method):
    validate_config(valid_config(method))


@pytest.mark.parametrize("method, path", every_field())
def test_every_invalid_value_is_rejected_naming_the_field(method, path, tmp_path):
    (tmp_path / "empty").mkdir()
    for value in INVALID[path]:
        if value == "{empty_dir}":
            value = str(tmp_path / "empty")
        with pytest.raises(ConfigError) as info:
            validate_config(with_value(valid_config(method), path, value), fresh_start=True)
        assert f"config.{path}" in str(info.value), (value, str(info.value))
    assert os.listdir(tmp_path / "empty") == []  # looking at init_from created nothing there
    assert not os.path.exists("/nonexistent")


def test_unknown_and_missing_fields_are_named():
    config = base_config()
    config.train.weight_decy = 5e-4  # a typo would silently leave weight_decay at its default
    with pytest.raises(ConfigError, match=r"config\.train\.weight_decy is not a field"):
        validate_config(config)
    config = method_config("trades").to_dict()
    config["bta"] = 6.0
    full = base_config()
    full.method = ml_collections.ConfigDict(config)
    with pytest.raises(ConfigError, match=r"config\.method\.bta is not a field"):
        validate_config(full)
    config = base_config()
    del config.eval["num_examples"]
    with pytest.raises(ConfigError, match=r"config\.eval\.num_examples is missing"):
        validate_config(config)


def test_a_checkpoint_json_config_validates():
    """Tuples come back from JSON as lists: a saved config is as valid as the one it was."""
    for method in available_methods():
        validate_config(ml_collections.ConfigDict(config_to_json(valid_config(method))))


def test_init_from_needs_a_checkpoint_only_to_start_a_run(tmp_path):
    """Starting: init_from must hold a checkpoint. Resuming or reading a saved run's config:
    the run it was fine-tuned from may be gone by now."""
    (tmp_path / "checkpoints" / "40").mkdir(parents=True)
    validate_config(with_value(base_config(), "train.init_from", str(tmp_path)), fresh_start=True)
    gone = with_value(base_config(), "train.init_from", str(tmp_path / "deleted"))
    validate_config(gone)
    with pytest.raises(ConfigError, match=r"config\.train\.init_from="):
        validate_config(gone, fresh_start=True)


# ------------------------------------------------------------------------------- resume
def test_config_changes_list_every_differing_field_except_the_allowed_ones():
    saved = config_to_json(base_config())
    now = base_config()
    now.attack.eps, now.seed = 0.3, 7
    now.train.log_every_steps, now.eval.batch_size = 5, 64
    now.data.data_dir = "/elsewhere"
    changes = config_changes(saved, config_to_json(now))
    assert changes == [{"field": "attack.eps", "checkpoint": 8 / 255, "now": 0.3},
                       {"field": "seed", "checkpoint": 1, "now": 7}]
    del saved["method"]["name"]
    assert {"field": "method.name", "checkpoint": ABSENT, "now": "pgd_at"} in config_changes(
        saved, config_to_json(base_config()))


def test_fields_added_since_a_checkpoint_change_nothing_at_their_defaults():
    """A checkpoint written before `train.ema_decay` and `method.awp_gamma` existed resumes
    with them at their defaults (off); set to anything else they are changes."""
    def config():
        c = base_config()
        c.method = method_config("pgd_at")
        return c

    saved = config_to_json(config())
    del saved["train"]["ema_decay"], saved["method"]["awp_gamma"]
    assert config_changes(saved, config_to_json(config())) == []
    now = config()
    now.train.ema_decay = 0.999
    assert config_changes(saved, config_to_json(now)) == [
        {"field": "train.ema_decay", "checkpoint": ABSENT, "now": 0.999}]


def test_the_allowed_fields_exist():
    assert set(RESUME_MAY_CHANGE) <= set(_paths(base_config().to_dict()))


@pytest.mark.parametrize("name, field, value, noted", [
    ("dafa", "warmup_epochs", 70, True),  # the official default in a 3-epoch run: TRADES only
    ("dafa", "warmup_epochs", 2, False),
    ("ham", "warmup_epochs", 3, True),  # mining would start at epoch index 3: never
    ("ham", "warmup_epochs", 0, False),
    ("cfa", "begin", 3, True),
    ("pgd_at", "beta", 0, False),  # no epoch where its own part starts
    ("trades", "awp_warmup_epochs", 10, False),  # AWP off (awp_gamma 0): its warm-up is moot
])
def test_a_run_that_never_reaches_the_methods_start_is_named(name, field, value, noted):
    from hamjax.methods import get_method, late_starts

    config = base_config()
    config.method = method_config(name)
    config.train.epochs = 3
    if field in config.method:
        config.method[field] = value
    lines = late_starts(get_method(name), config)
    assert len(lines) == int(noted)
    if noted:
        assert f"method.{field}={value} is not before train.epochs=3" in lines[0]
        assert "never in this run" in lines[0] and f"lower method.{field}" in lines[0]


@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_an_awp_warmup_the_run_never_reaches_is_named_only_when_awp_is_on(name):
    from hamjax.methods import get_method, late_starts

    config = base_config()
    config.method = method_config(name, awp_warmup_epochs=3)
    config.train.epochs = 3
    assert late_starts(get_method(name), config) == []
    config.method.awp_gamma = 0.005
    (line,) = late_starts(get_method(name), config)
    assert line.startswith("method.awp_warmup_epochs=3 is not before train.epochs=3: AWP's")
    config.method.awp_warmup_epochs = 2
    assert late_starts(get_method(name), config) == []
