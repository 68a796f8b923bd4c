"""CAAT (Zhou, Yang & Wu, AAAI 2023): adversaries and anti-adversaries, routed by a meta-net.

Every example gets two perturbations inside its own FRL ReMargin bound eps_i = eps * m[y_i]:
an adversary (TRADES KL ascent) and an anti-adversary (CE descent on the given, possibly noisy,
label). A small meta-network g_Omega maps six features of the clean logits to
(alpha_i, beta_i) = softmax(g(zeta_i) / T) and the loss is

    L = sum_i alpha_i w0[y_i] CE_i / sum w0 + beta_T sum_i alpha_i w1[y_i] KL_i / sum w1
        + mean_i beta_i CE(f(x_i + d_anti_i), y_i)

Omega is trained Meta-Weight-Net style: every `meta_interval` steps a virtual SGD step
W_hat(Omega) (the real optimiser's momentum, weight decay and lr), the composite loss
(alpha = beta = 1) of W_hat on a clean balanced meta batch, and an Adam step on
d L_meta / d Omega through W_hat. FRL's multipliers (w0, w1, m) are refitted once per epoch on the
meta set, as xiaolingzhou98/CAAT @9186f6d computes it (`CAAT.py`, `utils.py`, `meta.py`). Three
of the official code's defects are not copied: the model's BatchNorm is in train mode for every
loss forward, the class-average loss feature is rolled over each epoch, and the meta batch uses
its own class bounds and weights.

Everything the run needs to resume (multipliers, meta-net weights and Adam state, running class
losses, routing counts) lives in `method_state`.

The code, one job a module: this one holds the config, its checks and the real step (Eq. 11);
`caat_router` the features and the meta-net, `caat_objective` the perturbations and the
composite loss, `caat_meta` the bi-level meta step, `caat_state` the method state and its
epochs; `hamjax.analysis.caat_routing` explains a trained router's decisions.

Notes from testing (tests/test_caat.py and tiny end-to-end runs):
- At T = 0.001 the routing is one-hot and dL_meta/dOmega is exactly 0 unless an example sits
  within ~T of a tie (then it is ~1/T); `meta_grad_norm` is logged. In a fresh run the router
  therefore stays close to its random initialisation, which can route most of the batch (or
  whole classes, since two features are class-level) to the anti-adversary branch; those
  examples get no clean or KL term and robust accuracy collapses (seen on 8x8 digits: PGD
  accuracy 0.10 with the faithful loss vs 0.77 with `adv_weight_floor = 0.5`). Watch
  `routing_summary` / the per-class robust accuracy; `adv_weight_floor` is the documented
  remedy, off by default.
- On all of Fashion-MNIST (fine-tuned from PGD-AT, 20% pair-flip noise) the same holds at
  scale: after 32 meta steps the router's weights had moved 0.9% and it decided as its
  initialisation on 99.8% of training examples. Untrained routers of 10 initialisation seeds
  sent between 0% and 95% of the same examples to the adversary, 8 of them sending at least
  one whole class (>= 90%) to the anti-adversary (`benchmarks/caat_routing.py`;
  `meta_init_seed` picks one).
- softmax(z / T) is computed as (sigma(d), sigma(-d)) with an exact derivative: the plain
  float32 softmax derivative is ~ulp(1) / T ~ 1e-4 per example where it should be ~0, and that
  round-off alone dominated the meta-gradient at T = 0.001.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.caat_meta import caat_pre_step
from hamjax.methods.caat_objective import branch_terms, composite_loss, gates, perturbations
from hamjax.methods.caat_router import class_proportion, make_meta_net, meta_features, route
from hamjax.methods.caat_state import caat_epoch_end, caat_init_state, caat_summarize_state
from hamjax.methods.common import accuracy, attack_ledger, step_aux, training_ledger
from hamjax.methods.frl import (
    FRL_DEFAULTS,
    class_parameters,
    per_example_eps,
    validate_frl_fields,
)
from hamjax.validation import is_int, is_number, method_field, require

Array = jax.Array
META_BN_MODES = ("batch", "running")


DEFAULTS: dict[str, Any] = {
    **FRL_DEFAULTS,
    "frl_split": "meta",  # CAAT fits FRL's multipliers on its meta set
    "temperature": 0.001,  # softmax(g / T): near one-hot routing at the official 0.001
    "meta_hidden": 100,
    "meta_interval": 50,  # meta step at in-epoch batch index 49, 99, ... (official)
    "meta_lr": 1e-4,  # Adam (PyTorch L2 weight decay: added to the gradient)
    "meta_weight_decay": 5e-4,
    # "batch": the meta-net's BatchNorm always standardises the features with the current
    # batch's statistics (the official code never calls meta_net.eval()); "running": the real
    # step's weights use running statistics instead (the raw features then differ in scale by
    # ~10x, which can route every sample one way).
    "meta_bn": "batch",
    # The official virtual step differentiates through the features too (they are computed from
    # the model's logits without detaching); False treats them as data as in the real step.
    "meta_feature_grad": True,
    "initial_class_loss": 5.0,  # feature 2 before the first epoch ends (official: 5)
    # Not in the paper: alpha_eff = floor + (1 - floor) alpha keeps the clean and KL terms on
    # examples routed to the anti-adversary branch, so that a class routed there wholesale
    # still trains for robustness. 0 = faithful.
    "adv_weight_floor": 0.0,
    # The meta-net's initialisation seed; -1: drawn from config.seed like every other weight.
    # At T = 0.001 the router barely moves from its initialisation, so this seed alone decides
    # where it sends each class (benchmarks/caat_routing.py): set it to vary the router while
    # the data split and batch order (config.seed) stay fixed.
    "meta_init_seed": -1,
}


def _check(ok: bool, name: str, value, fix: str) -> None:
    require(ok, f"method.{name}", value, fix)


def validate_caat(config) -> None:
    """Checks CAAT's fields (and FRL's); raises ConfigError naming the field."""
    validate_frl_fields(config)
    t = method_field(config, "temperature")
    _check(is_number(t) and t > 0, "temperature", t, "must be > 0 (official 0.001)")
    h = method_field(config, "meta_hidden")
    _check(is_int(h) and h >= 1, "meta_hidden", h,
           "an int >= 1 (official 100)")
    k = method_field(config, "meta_interval")
    _check(is_int(k) and k >= 1, "meta_interval", k,
           "an int >= 1 (official 50)")
    lr = method_field(config, "meta_lr")
    _check(is_number(lr) and lr > 0, "meta_lr", lr, "must be > 0 (official 1e-4)")
    wd = method_field(config, "meta_weight_decay")
    _check(is_number(wd) and wd >= 0, "meta_weight_decay", wd, "must be >= 0 (official 5e-4)")
    bn = method_field(config, "meta_bn")
    _check(bn in META_BN_MODES, "meta_bn", bn, f"choose one of {META_BN_MODES}")
    fg = method_field(config, "meta_feature_grad")
    _check(isinstance(fg, bool), "meta_feature_grad", fg, "must be True or False")
    c0 = method_field(config, "initial_class_loss")
    _check(is_number(c0), "initial_class_loss", c0, "must be a finite number (official 5.0)")
    floor = method_field(config, "adv_weight_floor")
    _check(is_number(floor) and 0.0 <= floor <= 1.0, "adv_weight_floor", floor,
           "must be in [0, 1] (0 = faithful)")
    seed = config.method.get("meta_init_seed", -1)  # absent in runs saved before it existed
    _check(is_int(seed) and seed >= -1,
           "meta_init_seed", seed, "an int >= 0, or -1 to draw it from config.seed")
    if not config.data.meta_per_class:
        raise ConfigError(
            "config.data.meta_per_class=0: CAAT needs a clean, balanced meta set; set it > 0 "
            "(CIFAR-10: 300)"
        )


def _per_class_sum(values: Array, onehot: Array) -> Array:
    # elementwise sum, not a matmul (TPU default matmul precision is bf16 passes)
    return jnp.sum(values[:, None] * onehot, axis=0)


def caat_loss(params, state, batch, rng, ctx):
    """The real step (Eq. 11) with the meta-net's current weights (no gradient to Omega)."""
    mcfg = ctx.config.method
    ms = state.method_state
    x, y = batch["image"], batch["label"]
    w0, w1, mult = class_parameters(ms["lambdas"], mcfg)
    eps = per_example_eps(ctx.config.attack.eps, mult, y)
    x_adv, x_anti = perturbations(ctx, params, state.batch_stats, x, y, eps, rng)
    terms, stats = branch_terms(ctx, params, state.batch_stats, x, y, x_adv, x_anti,
                                bn_mode="train")
    features = meta_features(jax.lax.stop_gradient(terms.clean_logits), y,
                             ms["class_loss_last"], class_proportion(ctx))
    weights, meta_stats = route(make_meta_net(mcfg), jax.lax.stop_gradient(ms["meta_params"]),
                                ms["meta_stats"], features, batch_stats=mcfg.meta_bn == "batch")
    weights = jax.lax.stop_gradient(weights)
    alpha, beta = gates(weights, mcfg.adv_weight_floor)
    loss, adv_part, anti_part = composite_loss(terms, w0[y], w1[y], alpha, beta, mcfg.beta)

    onehot = jax.nn.one_hot(y, ctx.num_classes, dtype=jnp.float32)
    to_adv = (weights[:, 0] > weights[:, 1]).astype(jnp.float32)
    new_ms = dict(
        ms,
        meta_stats=meta_stats,
        class_loss_sum=ms["class_loss_sum"] + _per_class_sum(
            jax.lax.stop_gradient(terms.ce), onehot),
        class_count=ms["class_count"] + jnp.sum(onehot, axis=0),
        route_adv=ms["route_adv"] + _per_class_sum(to_adv, onehot),
        route_total=ms["route_total"] + jnp.sum(onehot, axis=0),
    )
    b, steps = x.shape[0], ctx.config.attack.steps
    ledger = (attack_ledger(b, steps, final_eval=True) + attack_ledger(b, steps)
              + training_ledger(b, 3))
    aux = step_aux(
        stats,
        ledger,
        train_acc=accuracy(terms.clean_logits, y),
        train_robust_acc=accuracy(terms.adv_logits, y),
        anti_acc=accuracy(terms.anti_logits, y),
        adv_fraction=jnp.mean(to_adv),
        anti_fraction=1.0 - jnp.mean(to_adv),
        alpha_mean=jnp.mean(weights[:, 0]),
        adv_part=adv_part,
        anti_part=anti_part,
        ce=jnp.mean(terms.ce),
        kl=jnp.mean(terms.kl),
        ce_anti=jnp.mean(terms.ce_anti),
        mean_eps=jnp.mean(eps),
        meta_updates=ms["meta_updates"],
        meta_loss=ms["meta_loss"],
        meta_grad_norm=ms["meta_grad_norm"],
    )
    aux["method_state"] = new_ms
    return loss, aux


register(Method(
    "caat",
    caat_loss,
    init_state=caat_init_state,
    pre_step=caat_pre_step,
    epoch_end=caat_epoch_end,
    validate=validate_caat,
    summarize_state=caat_summarize_state,
    needs_meta_batch=True,
    defaults=dict(DEFAULTS),
    description="CAAT: adversaries + anti-adversaries routed by a meta-net (Zhou et al. 2023)",
))
