"""The checks every config validator shares (the trainer's, the data's, each method's, the
models'): what counts as an int, a number or a tuple in a config, and the one form of a bad
field's error, `config.<field>=<value>: <fix>` (a ConfigError).

A config may come from a file, the command line or a checkpoint's JSON, so any field may hold
any value: bools are not ints here, and NaN or infinities are not numbers (NaN compares False
with every bound, so a range check alone would let it through).
"""

from __future__ import annotations

import math
from typing import Any

from hamjax.errors import ConfigError


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (bools, NaN and infinities are not numbers here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def is_sequence(value: Any) -> bool:
    """A tuple or list (configs write tuples; JSON, e.g. a checkpoint's config, gives lists)."""
    return isinstance(value, (tuple, list))


def require(ok: bool, field: str, value: Any, fix: str) -> None:
    """Raises `ConfigError("config.<field>=<value>: <fix>")` unless ok."""
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: {fix}")


def method_field(config, name: str) -> Any:
    """`config.method.<name>`, or a ConfigError saying to start from the method's defaults."""
    if name not in config.method:
        raise ConfigError(
            f"config.method.{name} is missing; start from "
            f"hamjax.config.method_config({config.method.name!r})"
        )
    return config.method[name]


def method_number(config, name: str, ok, fix: str) -> float:
    """A finite number field `config.method.<name>` for which ok(value) holds."""
    value = method_field(config, name)
    require(is_number(value) and ok(value), f"method.{name}", value, fix)
    return float(value)


def method_int(config, name: str, ok, fix: str) -> int:
    """An int field `config.method.<name>` for which ok(value) holds."""
    value = method_field(config, name)
    require(is_int(value) and ok(value), f"method.{name}", value, fix)
    return int(value)


def method_choice(config, name: str, choices: tuple) -> str:
    """A string field `config.method.<name>` from `choices`."""
    value = method_field(config, name)
    require(isinstance(value, str) and value in choices, f"method.{name}", value,
            f"choose one of {choices}")
    return value


def method_bool(config, name: str) -> bool:
    """A bool field `config.method.<name>`."""
    value = method_field(config, name)
    require(isinstance(value, bool), f"method.{name}", value, "must be True or False")
    return value
