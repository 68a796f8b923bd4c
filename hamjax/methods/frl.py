"""FRL (Xu et al., ICML 2021, "To be Robust or to be Fair"): per-class Lagrange multipliers.

Once per epoch the per-class clean error and boundary error (clean acc - PGD acc) on a held-out
split move three multiplier vectors, as CAAT's `utils.py: frl_train` (xiaolingzhou98/CAAT
@9186f6d) does; the FRL scripts (hannxu123/fair_robust @a80547d, `utils_frl.py`,
`utils_frl2.py`) move a subset of them per variant:

    gamma0 = clean_err - mean(clean_err) - delta0;  gamma1 = bndy_err - mean(bndy_err) - delta1
    lambda0 = N(lambda0 + rate1 gamma0);  lambda1 = N(lambda1 + 2 rate1 gamma1)
    lambda2 = lambda2 + rate2 gamma1
    N(.): clamp at >= 0, then rescale so that the sum is <= lim

ReWeight: class weights w[c] = 1/C + (C-1)/C lambda[c] - 1/C sum_{j != c} lambda[j] (w0 from
lambda0 on the clean CE, w1 from lambda1 on the TRADES KL). ReMargin: the training attack's bound
for class c is eps * clamp(exp(2 lambda2[c]), margin_min, margin_max). The three registered
variants follow the official scripts: `frl_rw` moves lambda0 and lambda1 (lambda2 = 0: one bound),
`frl_rm` moves lambda0 and lambda2 (lambda1 = 0: uniform KL weights), `frl_rwrm` moves all three.

The multipliers live in `method_state` so that a resumed run continues with them. The update is
a pure function of (multipliers, per-class errors); `epoch_end` only gathers the errors.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.baselines import trades_adversary, trades_terms
from hamjax.methods.common import accuracy, attack_ledger, step_aux, training_ledger
from hamjax.sharding import place_like
from hamjax.validation import is_int, is_number, method_field, require

Array = jax.Array
Lambdas = dict[str, Array]

# Which multipliers each variant moves: (lambda0, lambda1, lambda2), as in the official scripts
# frlrw.py / frlrm.py / frlrmrw.py.
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "frl_rw": (True, True, False),
    "frl_rm": (True, False, True),
    "frl_rwrm": (True, True, True),
}
NORMALISATIONS = ("separate", "joint")
SPLITS = ("val", "meta")


# ------------------------------------------------------------------------------ config
FRL_DEFAULTS: dict[str, Any] = {
    "beta": 1.5,  # TRADES beta on the KL term
    "delta0": 0.07,  # fairness tolerance on the clean error
    "delta1": 0.07,  # ... on the boundary error
    "rate1": 0.05,  # multiplier step for lambda0 (lambda1 uses 2 * rate1)
    "rate1_halve_every": 40,  # epochs; the official scripts halve rate1 at epochs 40, 80, ...
    "rate2": 0.2,  # step for lambda2 (the re-margin multiplier)
    "lim": 0.5,  # N(.) rescales lambda0 / lambda1 to sum <= lim (< 1 keeps w > 0)
    "margin_min": 0.98,  # class eps multiplier clamp(exp(2 lambda2), margin_min, margin_max)
    "margin_max": 2.5,  # CAAT: 2.5; the FRL scripts (utils_frl2.py): 3.0
    # "separate": sum(w0 ce)/sum(w0) + beta sum(w1 kl)/sum(w1) (CAAT's code, `utils.py`);
    # "joint": sum(w0 ce + beta w1 kl) / sum(w0 + w1) (the FRL scripts).
    "normalise": "separate",
    "frl_split": "val",  # split the multipliers are fitted on ("meta" for CAAT)
}


def _number(config, name: str, ok, fix: str) -> float:
    value = method_field(config, name)
    require(is_number(value) and ok(value), f"method.{name}", value, fix)
    return float(value)


def validate_frl_fields(config) -> None:
    """Checks FRL's fields (shared with CAAT); raises ConfigError naming the field."""
    _number(config, "beta", lambda v: v >= 0, "must be >= 0 (CAAT: 1.5, FRL scripts: 1.0)")
    _number(config, "delta0", np.isfinite, "must be a finite number (CAAT: 0.07)")
    _number(config, "delta1", np.isfinite, "must be a finite number (CAAT: 0.07)")
    _number(config, "rate1", lambda v: v >= 0, "must be >= 0 (CAAT: 0.05)")
    _number(config, "rate2", lambda v: v >= 0, "must be >= 0 (CAAT: 0.2)")
    _number(config, "lim", lambda v: 0 < v < 1,
            "must be in (0, 1): it bounds sum(lambda) so that every class weight stays > 0")
    halve = method_field(config, "rate1_halve_every")
    require(is_int(halve) and halve >= 1, "method.rate1_halve_every", halve,
            "an int >= 1 (epochs; 40)")
    lo = _number(config, "margin_min", lambda v: v > 0, "must be > 0 (0.98)")
    _number(config, "margin_max", lambda v: v >= lo, f"must be >= margin_min={lo} (2.5)")
    if method_field(config, "normalise") not in NORMALISATIONS:
        raise ConfigError(
            f"config.method.normalise={config.method.normalise!r}: choose one of {NORMALISATIONS}"
        )
    split = method_field(config, "frl_split")
    if split not in SPLITS:
        raise ConfigError(f"config.method.frl_split={split!r}: choose one of {SPLITS}")
    if split == "val" and not config.data.val_size:
        raise ConfigError(
            "config.data.val_size=0 but config.method.frl_split='val': FRL fits its multipliers "
            "on the validation split; set data.val_size > 0 (FRL: 3000) or frl_split='meta'"
        )
    if split == "meta" and not config.data.meta_per_class:
        raise ConfigError(
            "config.data.meta_per_class=0 but config.method.frl_split='meta'; set "
            "data.meta_per_class > 0 (CAAT: 300)"
        )


# ------------------------------------------------------------------------------ pure maths
def init_lambdas(num_classes: int) -> Lambdas:
    """All multipliers zero: uniform weights 1/C, one bound (exp(0) = 1 inside the clamp).

    Three distinct buffers: the jitted step donates the state, and one buffer twice is an error.
    """
    return {k: jnp.zeros((num_classes,), jnp.float32) for k in ("lambda0", "lambda1", "lambda2")}


def normalize_lambda(lam: Array, lim: float) -> Array:
    """FRL's N(.): clamp at >= 0, then rescale onto sum <= lim (leaves it alone if already)."""
    lam = jnp.maximum(lam, 0.0)
    total = jnp.sum(lam)
    return jnp.where(total > lim, lim * lam / jnp.maximum(total, 1e-12), lam)


def class_errors(clean_correct, clean_total, robust_correct, robust_total) -> tuple[Array, Array]:
    """Per-class natural error and boundary error (clean accuracy - robust accuracy)."""
    clean_acc = jnp.asarray(clean_correct, jnp.float32) / jnp.maximum(
        jnp.asarray(clean_total, jnp.float32), 1.0)
    robust_acc = jnp.asarray(robust_correct, jnp.float32) / jnp.maximum(
        jnp.asarray(robust_total, jnp.float32), 1.0)
    return 1.0 - clean_acc, clean_acc - robust_acc


def update_lambdas(
    lambdas: Lambdas,
    clean_err: Array,
    bndy_err: Array,
    *,
    delta0: float,
    delta1: float,
    rate1: float,
    rate2: float,
    lim: float,
    moves: tuple[bool, bool, bool] = (True, True, True),
) -> Lambdas:
    """One FRL multiplier step (the module docstring's update); `moves` picks which of
    lambda0/1/2 change."""
    clean_err = jnp.asarray(clean_err, jnp.float32)
    bndy_err = jnp.asarray(bndy_err, jnp.float32)
    gamma0 = clean_err - jnp.mean(clean_err) - delta0
    gamma1 = bndy_err - jnp.mean(bndy_err) - delta1
    lam0, lam1, lam2 = lambdas["lambda0"], lambdas["lambda1"], lambdas["lambda2"]
    if moves[0]:
        lam0 = normalize_lambda(lam0 + rate1 * gamma0, lim)
    if moves[1]:
        lam1 = normalize_lambda(lam1 + 2.0 * rate1 * gamma1, lim)
    if moves[2]:
        lam2 = lam2 + rate2 * gamma1
    return {"lambda0": lam0, "lambda1": lam1, "lambda2": lam2}


def class_weights(lam: Array) -> Array:
    """w[c] = 1/C + (C-1)/C lam[c] - 1/C sum_{j != c} lam[j] = 1/C + lam[c] - sum(lam)/C."""
    num_classes = lam.shape[-1]
    return 1.0 / num_classes + lam - jnp.sum(lam, axis=-1, keepdims=True) / num_classes


def margin_multipliers(lam2: Array, margin_min: float, margin_max: float) -> Array:
    """ReMargin: the class's bound multiplier clamp(exp(2 lambda2), min, max)."""
    return jnp.clip(jnp.exp(2.0 * lam2), margin_min, margin_max)


def class_parameters(lambdas: Lambdas, method_config) -> tuple[Array, Array, Array]:
    """(w0, w1, m) per class from the multipliers."""
    return (
        class_weights(lambdas["lambda0"]),
        class_weights(lambdas["lambda1"]),
        margin_multipliers(lambdas["lambda2"], method_config.margin_min,
                           method_config.margin_max),
    )


def rate1_for_epoch(rate1: float, epoch: int, halve_every: int) -> float:
    """rate1 as the scripts use it for the update before (1-based) `epoch`: halved every k."""
    return float(rate1) * 0.5 ** (int(epoch) // int(halve_every))


def frl_objective(
    ce: Array,
    kl: Array,
    w0: Array,
    w1: Array,
    beta: float,
    alpha: Array | None = None,
    normalise: str = "separate",
) -> Array:
    """FRL's weighted TRADES loss; w0/w1 are per-example class weights, alpha per-example gates.

    alpha (CAAT's adversarial-branch weight) multiplies each example's terms but not the
    normalisers, as in CAAT's code; alpha=None means 1.
    """
    gate = jnp.ones_like(ce) if alpha is None else alpha
    if normalise == "joint":
        return jnp.sum(gate * (w0 * ce + beta * w1 * kl)) / jnp.sum(w0 + w1)
    return jnp.sum(gate * w0 * ce) / jnp.sum(w0) + beta * jnp.sum(gate * w1 * kl) / jnp.sum(w1)


# ------------------------------------------------------------------------------ method
def margin_bounds(method_config) -> Array:
    """[margin_min, margin_max] kept in the state so that summaries need no config."""
    return jnp.asarray([method_config.margin_min, method_config.margin_max], jnp.float32)


def frl_init_state(ctx, rng) -> dict:
    del rng
    return {"lambdas": init_lambdas(ctx.num_classes),
            "margin_bounds": margin_bounds(ctx.config.method)}


def per_example_eps(base_eps: float, multipliers: Array, labels: Array) -> Array:
    """eps_i = base * m[y_i] (ReMargin), f32[B]."""
    return jnp.asarray(base_eps, jnp.float32) * multipliers[labels]


def frl_loss(params, state, batch, rng, ctx):
    """TRADES with class weights w0 (clean CE) and w1 (KL) and class-wise attack bounds."""
    x, y = batch["image"], batch["label"]
    mcfg = ctx.config.method
    w0, w1, mult = class_parameters(state.method_state["lambdas"], mcfg)
    eps = per_example_eps(ctx.config.attack.eps, mult, y)
    adv_key, _ = jax.random.split(rng)  # same key split as CAAT (its anti-adversary: 2nd key)
    x_adv, _ = trades_adversary(ctx, params, state.batch_stats, x, y, adv_key, eps=eps)
    ce, kl, clean_logits, adv_logits, stats = trades_terms(
        ctx, params, state.batch_stats, x, y, x_adv)
    loss = frl_objective(ce, kl, w0[y], w1[y], mcfg.beta, normalise=mcfg.normalise)
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps, final_eval=True)
    ledger = ledger + training_ledger(x.shape[0], 2)
    return loss, step_aux(
        stats,
        ledger,
        train_acc=accuracy(clean_logits, y),
        train_robust_acc=accuracy(adv_logits, y),
        ce=jnp.mean(ce),
        kl=jnp.mean(kl),
        mean_eps=jnp.mean(eps),
    )


def _to_numpy(counts) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(jax.device_get(counts.correct)), np.asarray(jax.device_get(counts.total))


def refit_lambdas(lambdas: Lambdas, state, ctx, evaluator, moves) -> Lambdas:
    """Evaluates the split in `method.frl_split` and takes one multiplier step (host side)."""
    mcfg = ctx.config.method
    clean, robust = evaluator(state, mcfg.frl_split)
    clean_err, bndy_err = class_errors(*_to_numpy(clean), *_to_numpy(robust))
    completed = int(jax.device_get(state.step)) // max(int(ctx.steps_per_epoch), 1)
    # The scripts update before each (1-based) epoch e with rate1 / 2**(e // 40); this update is
    # the one before epoch completed + 1.
    rate1 = rate1_for_epoch(mcfg.rate1, completed + 1, mcfg.rate1_halve_every)
    new = update_lambdas(
        lambdas, clean_err, bndy_err, delta0=mcfg.delta0, delta1=mcfg.delta1, rate1=rate1,
        rate2=mcfg.rate2, lim=mcfg.lim, moves=moves,
    )
    return place_like(new, lambdas)


def make_frl_epoch_end(moves: tuple[bool, bool, bool]):
    """epoch_end for a variant: refits the multipliers on the configured split."""

    def epoch_end(state, ctx, evaluator):
        ms = dict(state.method_state)
        ms["lambdas"] = refit_lambdas(ms["lambdas"], state, ctx, evaluator, moves)
        return state.replace(method_state=ms)

    return epoch_end


def summarize_lambdas(lambdas: Lambdas, bounds=(0.98, 2.5)) -> dict:
    """JSON-able multipliers, class weights and bound multipliers."""
    margin_min, margin_max = (float(b) for b in np.asarray(jax.device_get(bounds)))
    lam = {k: np.asarray(jax.device_get(v), np.float64) for k, v in lambdas.items()}
    w0 = np.asarray(class_weights(jnp.asarray(lam["lambda0"])), np.float64)
    w1 = np.asarray(class_weights(jnp.asarray(lam["lambda1"])), np.float64)
    mult = np.clip(np.exp(2.0 * lam["lambda2"]), margin_min, margin_max)
    out = {k: v.round(6).tolist() for k, v in lam.items()}
    out.update(w0=w0.round(6).tolist(), w1=w1.round(6).tolist(),
               eps_multiplier=mult.round(6).tolist())
    return out


def frl_summarize_state(method_state) -> dict:
    """Logged after each epoch: the multipliers and weights the epoch trained with."""
    return summarize_lambdas(method_state["lambdas"], method_state["margin_bounds"])


def _validate_frl(config) -> None:
    validate_frl_fields(config)


def _register() -> None:
    for name, moves in VARIANTS.items():
        label = {"frl_rw": "ReWeight", "frl_rm": "ReWeight clean + ReMargin",
                 "frl_rwrm": "ReWeight + ReMargin"}[name]
        register(Method(
            name,
            frl_loss,
            init_state=frl_init_state,
            epoch_end=make_frl_epoch_end(moves),
            validate=_validate_frl,
            summarize_state=frl_summarize_state,
            defaults=dict(FRL_DEFAULTS),
            description=f"FRL {label} (Xu et al. 2021)",
        ))


_register()

__all__ = [
    "VARIANTS",
    "FRL_DEFAULTS",
    "class_errors",
    "class_parameters",
    "class_weights",
    "frl_loss",
    "frl_objective",
    "init_lambdas",
    "margin_bounds",
    "margin_multipliers",
    "normalize_lambda",
    "per_example_eps",
    "rate1_for_epoch",
    "refit_lambdas",
    "summarize_lambdas",
    "update_lambdas",
    "validate_frl_fields",
]
