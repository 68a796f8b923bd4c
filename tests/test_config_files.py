"""The shipped config files: one file per setup, any registered method chosen by argument
(`--config=configs/FILE.py:method=NAME[,budget=B][,scenario=TOKENS]`), per-method files as
one-line variants. Pure Python: no data, no compiles."""

from __future__ import annotations

import ast
import pathlib

import pytest

from hamjax.config import (
    compose,
    config_module,
    load_config,
    method_config,
    parse_variant,
    validate_config,
)
from hamjax.errors import ConfigError
from hamjax.methods import available_methods, get_method

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SETUPS = ("quickstart", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagenette")
# One-line variants: file -> the setup argument they stand for.
VARIANTS = {
    "cifar10_ham": "cifar10.py:method=ham", "cifar10_pgdat": "cifar10.py:method=pgd_at",
    "cifar10_trades": "cifar10.py:method=trades", "cifar10_caat": "cifar10.py:method=caat",
    "cifar10_frl": "cifar10.py:method=frl_rwrm", "cifar100_ham": "cifar100.py:method=ham",
    "svhn_ham": "svhn.py:method=ham", "imagenette_ham": "imagenette.py:method=ham",
    "fashion_mnist_pgdat": "fashion_mnist.py:method=pgd_at",
    "fashion_mnist_ham": "fashion_mnist.py:method=ham",
    "fashion_mnist_caat": "fashion_mnist.py:method=caat,budget=finetune",
}


def test_every_config_file_is_a_setup_a_variant_or_common():
    files = {p.stem for p in CONFIGS.glob("*.py")}
    assert files == set(SETUPS) | set(VARIANTS) | {"common"}


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_on_every_setup(setup, method):
    config = load_config(f"{CONFIGS}/{setup}.py:method={method}")
    validate_config(config)
    assert config.method.name == method
    assert set(config.method) == {"name"} | set(get_method(method).defaults)
    if get_method(method).needs_meta_batch:
        assert config.data.meta_per_class > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_files_are_their_setup_with_the_argument(name):
    assert load_config(f"{CONFIGS}/{name}.py").to_dict() == load_config(
        f"{CONFIGS}/{VARIANTS[name]}").to_dict()
    # The caller's own argument comes after the variant's: it adds to it and wins.
    noisy = load_config(f"{CONFIGS}/{name}.py:pairflip20")
    assert noisy.data.label_noise.kind == "flip2" and noisy.data.label_noise.rate == 0.2
    assert load_config(f"{CONFIGS}/{name}.py:method=trades").method.name == "trades"
    assert f"--config=configs/{name}.py" in config_module(CONFIGS / f"{name}.py").__doc__


def test_fashion_mnist_budget_is_written_once():
    """The HAM and PGD-AT files train on one budget; only the method differs."""
    pgd, ham = (load_config(f"{CONFIGS}/fashion_mnist.py:method={m}") for m in ("pgd_at", "ham"))
    pgd.method = ham.method
    assert pgd.to_dict() == ham.to_dict()
    caat = load_config(f"{CONFIGS}/fashion_mnist.py:method=caat,budget=finetune")
    trades = load_config(f"{CONFIGS}/fashion_mnist.py:method=trades,budget=finetune")
    assert (caat.train.to_dict(), caat.attack.to_dict()) == (trades.train.to_dict(),
                                                             trades.attack.to_dict())



@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_files_are_one_line(name):
    """Docstring, one import, `get_config = variant(...)`: nothing restates the setup."""
    body = ast.parse((CONFIGS / f"{name}.py").read_text()).body
    assert [type(node) for node in body] == [ast.Expr, ast.ImportFrom, ast.Assign]
    assert ast.unparse(body[2]).startswith("get_config = variant(__file__, ")


def test_parse_variant():
    assert parse_variant(None) == {}
    assert parse_variant("method=trades, scenario=lt10") == {"method": "trades",
                                                             "scenario": "lt10"}
    assert parse_variant("pairflip20") == {"scenario": "pairflip20"}
    assert parse_variant("ham") == {"method": "ham"}
    assert parse_variant("lt10,scenario=uniform20") == {"scenario": "lt10+uniform20"}
    with pytest.raises(ConfigError, match="'epochs' is not a variant"):
        parse_variant("method=ham,epochs=3")


def test_compose_applies_recipe_budget_and_scenario_in_order():
    from hamjax.config import base_config

    calls = []
    config = compose(base_config, "method=caat,budget=short,scenario=lt10", default_method="ham",
                     meta_per_class=7,
                     recipes={"caat": lambda c: calls.append(("recipe", c.train.epochs))},
                     budgets={"short": lambda c: c.train.update(epochs=2)})
    assert calls == [("recipe", 2)]  # the budget first, then the method's recipe
    assert config.method.to_dict() == method_config("caat").to_dict()
    assert config.data.meta_per_class == 7 and config.data.imbalance_factor == 10.0
    assert compose(base_config, None, default_method="ham", meta_per_class=7).method.name == "ham"
    with pytest.raises(ConfigError, match="budget='long'"):
        compose(base_config, "budget=long", default_method="ham", meta_per_class=7)
    with pytest.raises(ConfigError, match="not a known method"):
        compose(base_config, "method=nope", default_method="ham", meta_per_class=7)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(f"{tmp_path}/nope.py:method=ham")
