"""Training methods, looked up by `config.method.name`.

A method is a small set of pure functions (see `Method`). The generic trainer in
`hamjax.train` calls them; no method owns a training loop.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from hamjax.errors import ConfigError


def _no_state(ctx, rng) -> dict:
    del ctx, rng
    return {}


@dataclasses.dataclass(frozen=True)
class Method:
    """What a training method plugs into the generic trainer.

    loss_fn(params, state, batch, rng, ctx) -> (loss, aux): differentiated w.r.t. params; aux is
      a dict with `batch_stats`, `metrics` (scalars), `ledger` (a `hamjax.metrics.Ledger`) and
      optionally `apply_update` (bool scalar; False skips the optimiser update, e.g. HAM's empty
      hard set), `method_state` (an updated method state, e.g. running class losses) and
      `optimizer_params` (the weights the optimiser evaluates weight decay at: AWP's perturbed
      weights; default the weights themselves).
    init_state(ctx, rng) -> pytree kept in `TrainState.method_state` (checkpointed).
    pre_step(state, batch, rng, ctx) -> state, run inside the jitted step before the loss
      (CAAT's meta update).
    epoch_end(state, ctx, evaluator) -> state, run on the host after each epoch (FRL multipliers);
      `evaluator(state, split_name)` returns per-class clean and robust counts, and
      `evaluator.map_split(state, split_name, fn, key)` -> (outputs, labels) runs the method's
      own chunk function `fn(variables, batch, key)` over a split's evaluation examples (WAT's
      validation costs); a method never imports the evaluation code itself.
    validate(config) raises ConfigError naming the field.
    defaults: the method's config fields and their defaults: the one source of `config.method`
      (`hamjax.config.method_config(name, **overrides)` builds it from them).
    summarize_state(method_state) -> dict of JSON-able values logged after each epoch (CAAT's
      per-class routing, FRL's multipliers).
    starts_at: config.method fields that hold the epoch where the method's own part begins
      (HAM's mining, DAFA's class weights), each with what begins; a run no longer than that
      trains the method's base throughout, and the trainer says so (`late_starts`).
    """

    name: str
    loss_fn: Callable[..., Any]
    init_state: Callable[..., Any] = _no_state
    pre_step: Callable[..., Any] | None = None
    epoch_end: Callable[..., Any] | None = None
    validate: Callable[..., None] | None = None
    summarize_state: Callable[..., dict] | None = None
    needs_meta_batch: bool = False
    defaults: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    starts_at: dict[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Method] = {}
# Modules that register methods on import; imported lazily so `get_method` sees them all.
_METHOD_MODULES = ("baselines", "ham", "relatives", "frl", "caat", "mart", "cfa", "wat", "dafa",
                   "faal")


# AWP is an option of several methods, and its warm-up only matters when it is switched on.
_AWP_STARTS_AT = {"awp_warmup_epochs": "AWP's weight perturbation starts"}


def start_fields(method: Method, config) -> dict[str, str]:
    """config.method field -> what begins at its epoch: `method.starts_at`, and AWP's warm-up
    when `awp_gamma` > 0 (the epochs where a run's step changes its work)."""
    starts_at = dict(method.starts_at)
    if float(config.method.get("awp_gamma", 0.0)) > 0:
        starts_at.update(_AWP_STARTS_AT)
    return {field: what for field, what in starts_at.items() if field in config.method}


def late_starts(method: Method, config) -> list[str]:
    """One line per start field (`start_fields`) whose epoch the run never reaches: that part
    never runs (e.g. a short smoke test of DAFA trains plain TRADES; TRADES+AWP's default
    warm-up of 10 epochs outlasts a 5-epoch run)."""
    epochs = int(config.train.epochs)
    return [f"method.{field}={config.method[field]} is not before train.epochs={epochs}: "
            f"{what} never in this run, which trains the method's base throughout (lower "
            f"method.{field} or raise train.epochs)"
            for field, what in start_fields(method, config).items()
            if int(config.method[field]) >= epochs]


def register(method: Method) -> Method:
    """Adds a method to the registry (names are unique)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def _import_all() -> None:
    for module in _METHOD_MODULES:
        try:
            importlib.import_module(f"hamjax.methods.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"hamjax.methods.{module}":
                raise


def available_methods() -> list[str]:
    """Names accepted by `config.method.name`."""
    _import_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """Looks a method up by name; an unknown name lists the valid ones."""
    _import_all()
    if name not in _REGISTRY:
        raise ConfigError(
            f"config.method.name={name!r} is not a known method; choose one of "
            f"{available_methods()}"
        )
    return _REGISTRY[name]
