"""Model registry and the functional API the rest of hamjax uses (explicit BN mode, masks)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from hamjax.errors import ConfigError
from hamjax.models.fmnist_cnn import FashionMNISTCNN
from hamjax.models.layers import compute_dtype, conv_impl
from hamjax.models.preact_resnet import PreActResNet18
from hamjax.models.small_cnn import SmallCNN
from hamjax.models.wide_resnet import WideResNet, check_wrn_shape

Variables = dict[str, Any]
Stats = tuple[float, ...] | None
# factory(model_config, num_classes, mean, std, dtype) -> module
ModelFactory = Callable[[Any, int, Stats, Stats, Any], nn.Module]

BN_MODES = ("train", "eval", "batch")

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str, factory: ModelFactory) -> None:
    """Adds a model name to the registry (user models plug in without editing hamjax)."""
    _REGISTRY[name] = factory


def model_names() -> tuple[str, ...]:
    """Registered model names, sorted (for error messages and CLIs)."""
    return tuple(sorted(_REGISTRY))


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Reads a field from a ConfigDict / dict / object, tolerating absent fields."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _wrn_factory(default_depth: int | None, default_width: int | None) -> ModelFactory:
    def factory(cfg: Any, num_classes: int, mean: Stats, std: Stats, dtype: Any) -> nn.Module:
        depth = default_depth if default_depth is not None else _cfg_get(cfg, "depth", 34)
        width = default_width if default_width is not None else _cfg_get(cfg, "width", 10)
        check_wrn_shape(depth, width)
        return WideResNet(num_classes, depth, width, mean, std, dtype, _conv_vjp(cfg))

    return factory


def _conv_vjp(cfg: Any) -> str:
    """model.conv_vjp, checked (a ConfigError names the field and its choices)."""
    mode = _cfg_get(cfg, "conv_vjp", "auto")
    conv_impl(mode)
    return mode


register_model("small_cnn", lambda cfg, c, m, s, d: SmallCNN(c, m, s, d, conv_vjp=_conv_vjp(cfg)))
register_model("fmnist_cnn",
               lambda cfg, c, m, s, d: FashionMNISTCNN(c, m, s, d, conv_vjp=_conv_vjp(cfg)))
register_model("preact_resnet18",
               lambda cfg, c, m, s, d: PreActResNet18(c, m, s, d, conv_vjp=_conv_vjp(cfg)))
register_model("wrn34_10", _wrn_factory(34, 10))
register_model("wideresnet", _wrn_factory(None, None))
register_model("wrn", _wrn_factory(None, None))


def _as_stats(value: Any, field: str) -> Stats:
    """Per-channel mean/std as a hashable tuple of floats (linen fields must be hashable)."""
    if value is None:
        return None
    try:
        stats = tuple(float(v) for v in jnp.ravel(jnp.asarray(value, jnp.float32)).tolist())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.{field}={value!r} is not a sequence of numbers") from e
    if not stats:
        raise ConfigError(f"model.{field} is empty; give one value per channel or None")
    if field == "std" and any(s <= 0 for s in stats):
        raise ConfigError(f"model.std={stats} must be positive")
    return stats


def default_model_config() -> ml_collections.ConfigDict:
    """Model fields every config has; mean/std None means 'take the dataset's statistics'."""
    return ml_collections.ConfigDict(
        {
            "name": "preact_resnet18",
            "dtype": "float32",
            "depth": 34,  # only for name "wideresnet" / "wrn"
            "width": 10,
            "mean": None,
            "std": None,
            # whose conv derivatives: auto (hamjax's XLA:CPU workaround on CPU, XLA's elsewhere),
            # xla, canonical (the workaround everywhere); see hamjax.backends.cpu.conv
            "conv_vjp": "auto",
        }
    )


def build_model(
    model_config: Any,
    num_classes: int,
    input_shape: Sequence[int] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Builds `model_config.name` from the registry.

    mean/std (per channel, in [0,1] pixel units): explicit arguments (dataset stats) win over
    model_config.mean/std; None everywhere means no normalisation. input_shape (H, W, C), when
    given, is only used to check the channel count against mean/std early.
    """
    name = _cfg_get(model_config, "name")
    if name not in _REGISTRY:
        valid = ", ".join(model_names())
        raise ConfigError(f"model.name={name!r} is unknown; valid names: {valid}")
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r} must be an int >= 2")
    mean_t = _as_stats(mean if mean is not None else _cfg_get(model_config, "mean"), "mean")
    std_t = _as_stats(std if std is not None else _cfg_get(model_config, "std"), "std")
    if input_shape is not None:
        channels = int(input_shape[-1])
        for field, stats in (("mean", mean_t), ("std", std_t)):
            if stats is not None and len(stats) not in (1, channels):
                raise ConfigError(
                    f"model.{field} has {len(stats)} entries but inputs have {channels} channels"
                )
    dtype = compute_dtype(_cfg_get(model_config, "dtype", "float32"))
    return _REGISTRY[name](model_config, int(num_classes), mean_t, std_t, dtype)


def eval_model(model: nn.Module, dtype_name: Any = "float32") -> nn.Module:
    """The same model computing in `dtype_name` (config.eval.dtype), for evaluation attacks.

    Attacks follow tiny logit differences (CW, DLR margins; FAB's boundary search), so a model
    trained in bfloat16 is still attacked in float32 by default: the reported robustness is then
    the model's, not bfloat16 rounding's. Parameters are float32 either way, so the variables
    fit both. A module without a `dtype` field (a user model ignoring model.dtype) is returned
    unchanged.
    """
    dtype = compute_dtype(dtype_name, field="eval.dtype")
    if not hasattr(model, "dtype") or jnp.dtype(model.dtype) == dtype:
        return model
    return model.clone(dtype=dtype)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: nn.Module, rng: jax.Array, input_shape: tuple[int, ...]) -> Variables:
    # jitted and cached on (model, shape): eager init of a deep net dispatches thousands of ops
    return model.init(rng, jnp.zeros((1, *input_shape), jnp.float32), train=False)


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> Variables:
    """{"params", "batch_stats"} for inputs of shape input_shape (H, W, C; no batch dim)."""
    variables = _init(model, rng, tuple(int(d) for d in input_shape))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _check_bn_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r} is invalid; valid modes: {', '.join(BN_MODES)}")


def apply_model(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    *,
    bn_mode: str,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, Any]:
    """Logits (float32) and the batch_stats to carry forward, with an explicit BN mode.

    bn_mode "train": batch statistics, running stats updated (returned);
            "eval":  running statistics, batch_stats returned unchanged;
            "batch": batch statistics, running stats NOT updated (returned unchanged) -- e.g.
                     attacks generated in train mode without polluting the running averages.
    mask (bool[B]) excludes padded rows from the batch statistics (train / batch modes).
    """
    _check_bn_mode(bn_mode)
    batch_stats = variables.get("batch_stats", {})
    model_vars = {"params": variables["params"], "batch_stats": batch_stats}
    if bn_mode == "eval":
        return model.apply(model_vars, x, train=False, mask=mask), batch_stats
    logits, updates = model.apply(model_vars, x, train=True, mask=mask, mutable=["batch_stats"])
    if bn_mode == "train":
        return logits, updates["batch_stats"]
    return logits, batch_stats


def make_logits_fn(
    model: nn.Module,
    variables: Mapping[str, Any],
    bn_mode: str = "eval",
    *,
    mask: jax.Array | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """x -> logits closure for `hamjax.attacks`, which know nothing about models.

    "train" behaves as "batch" here (a logits_fn cannot return stats). mask: see apply_model.
    """
    _check_bn_mode(bn_mode)
    mode = "batch" if bn_mode == "train" else bn_mode

    def logits_fn(x: jax.Array) -> jax.Array:
        return apply_model(model, variables, x, bn_mode=mode, mask=mask)[0]

    return logits_fn
