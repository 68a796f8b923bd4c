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
meta set. See `/work/shared/reference/caat.md`; the official code's defects listed there are not
copied: the model's BatchNorm is in train mode for every loss forward, the class-average loss
feature is rolled over each epoch, and the meta batch uses its own class bounds and weights.

Everything the run needs to resume (multipliers, meta-net weights and Adam state, running class
losses, routing counts) lives in `method_state`.

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

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hamjax.attacks.losses import kl_divergence
from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.baselines import trades_adversary
from hamjax.methods.common import (
    accuracy,
    attack_ledger,
    cross_entropy,
    forward,
    step_aux,
    train_attack,
    training_ledger,
)
from hamjax.methods.frl import (
    FRL_DEFAULTS,
    class_parameters,
    init_lambdas,
    margin_bounds,
    per_example_eps,
    refit_lambdas,
    summarize_lambdas,
    validate_frl_fields,
)
from hamjax.metrics import Ledger
from hamjax.models.layers import BN_EPSILON, BN_MOMENTUM, torch_default_bias_init
from hamjax.models.layers import torch_default_kernel_init as _kernel_init
from hamjax.sharding import place_like
from hamjax.validation import is_int, is_number, method_field, require

Array = jax.Array
NUM_FEATURES = 6
FEATURE_NAMES = ("ce", "class_avg_loss_last_epoch", "grad_norm", "margin", "neg_entropy",
                 "class_proportion")
META_BN_MODES = ("batch", "running")


# ------------------------------------------------------------------------------ config
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


# ------------------------------------------------------------------------------ meta-net
@jax.custom_jvp
def _sigmoid(x: Array) -> Array:
    return jax.nn.sigmoid(x)


@_sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    # sigma'(x) = exp(log sigma(x) + log sigma(-x)): exact in the tails and even in x. The usual
    # s (1 - s) is ~ulp(1) wherever s rounds near 1, which divided by T = 0.001 swamps the true
    # slope (XLA's fused softmax gives every clear-cut example ~1e-4 instead of ~0).
    (x,), (t,) = primals, tangents
    slope = jnp.exp(jax.nn.log_sigmoid(x) + jax.nn.log_sigmoid(-x))
    return _sigmoid(x), slope * t


def two_way_softmax(z: Array, temperature: float) -> Array:
    """softmax(z / T) over two logits, [B, 2], computed as (sigma(d), sigma(-d)), d = (z0-z1)/T.

    The same function; its derivatives are accurate at T = 0.001 (see `_sigmoid_jvp`).
    """
    d = (z[..., 0] - z[..., 1]) / temperature
    return jnp.stack([_sigmoid(d), _sigmoid(-d)], axis=-1)


class MetaNet(nn.Module):
    """BatchNorm(6) -> Dense(hidden) -> ReLU -> Dense(2) -> softmax(z / T): (alpha, beta).

    PyTorch's BatchNorm1d / Linear defaults (momentum 0.1, eps 1e-5, kaiming-uniform(sqrt 5)).
    The official code never switches it to eval mode, so its BatchNorm always standardises the
    features with the current batch's statistics: routing depends on where an example stands
    within its batch, not on the raw scales (losses ~1-2, proportions ~0.1), which running
    statistics would pass through early on. `method.meta_bn` chooses ("batch" = official).
    """

    hidden: int = 100
    temperature: float = 1e-3

    @nn.compact
    def __call__(self, features: Array, use_running_average: bool = False) -> Array:
        x = nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                         epsilon=BN_EPSILON, name="bn")(features)
        x = nn.Dense(self.hidden, kernel_init=_kernel_init,
                     bias_init=torch_default_bias_init(features.shape[-1]), name="hidden")(x)
        x = nn.relu(x)
        z = nn.Dense(2, kernel_init=_kernel_init, bias_init=torch_default_bias_init(self.hidden),
                     name="out")(x)
        return two_way_softmax(z, self.temperature)


def make_meta_net(method_config) -> MetaNet:
    return MetaNet(hidden=int(method_config.meta_hidden),
                   temperature=float(method_config.temperature))


def meta_optimizer(method_config) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay): the decay is L2 added to the gradient (not AdamW)."""
    return optax.chain(
        optax.add_decayed_weights(float(method_config.meta_weight_decay)),
        optax.adam(float(method_config.meta_lr)),
    )


def route(net: MetaNet, meta_params, meta_stats, features: Array, *, batch_stats: bool):
    """Branch weights [B, 2] and the meta-net's updated running statistics.

    batch_stats=True standardises with this batch's statistics (official); False uses the
    running ones (updated with this batch first).
    """
    variables = {"params": meta_params, "batch_stats": meta_stats}
    weights, updates = net.apply(variables, features, use_running_average=False,
                                 mutable=["batch_stats"])
    new_stats = updates["batch_stats"]
    if not batch_stats:
        weights = net.apply({"params": meta_params, "batch_stats": new_stats}, features,
                            use_running_average=True)
    return weights, new_stats


def meta_features(logits: Array, labels: Array, class_loss_last: Array,
                  class_proportion: Array) -> Array:
    """The six per-example features, in the official order (`FEATURE_NAMES`), f32[B, 6]."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits)
    p = jnp.exp(log_p)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    ce = -jnp.sum(onehot * log_p, axis=-1)
    grad_norm = jnp.sqrt(jnp.sum(jnp.square(onehot - p), axis=-1))
    p_true = jnp.sum(onehot * p, axis=-1)
    p_other = jnp.max(jnp.where(onehot > 0, -jnp.inf, p), axis=-1)
    neg_entropy = jnp.sum(p * log_p, axis=-1)
    return jnp.stack(
        [ce, class_loss_last[labels], grad_norm, p_true - p_other, neg_entropy,
         class_proportion[labels]], axis=-1)


def class_proportion(ctx) -> Array:
    """Training-set share of each class (feature 6)."""
    counts = np.asarray(ctx.class_counts, np.float64)
    return jnp.asarray(counts / max(counts.sum(), 1.0), jnp.float32)


# ------------------------------------------------------------------------------ the objective
class Branches(NamedTuple):
    """Per-example terms of one composite-loss evaluation."""

    ce: Array
    kl: Array
    ce_anti: Array
    clean_logits: Array
    adv_logits: Array
    anti_logits: Array


def perturbations(ctx, params, batch_stats, x, y, eps, rng) -> tuple[Array, Array]:
    """Adversary (KL ascent) and anti-adversary (CE descent), both from x + 0.001 N, in eps_i.

    The model is frozen and in `config.attack.bn_mode` (eval) for both, as in the official
    code; the key split matches `frl_loss` so that the adversaries agree.
    """
    adv_key, anti_key = jax.random.split(rng)
    x_adv, _ = trades_adversary(ctx, params, batch_stats, x, y, adv_key, eps=eps)
    x_anti, _ = train_attack(ctx, params, batch_stats, x, y, anti_key, eps=eps, loss="ce",
                             descend=True, init="normal")
    return x_adv, x_anti


def branch_terms(ctx, params, batch_stats, x, y, x_adv, x_anti, *, bn_mode: str):
    """Clean, adversarial and anti-adversarial forwards (in this order, BN stats chained)."""
    clean_logits, stats = forward(ctx, params, batch_stats, x, bn_mode=bn_mode)
    adv_logits, stats = forward(ctx, params, stats, x_adv, bn_mode=bn_mode)
    anti_logits, stats = forward(ctx, params, stats, x_anti, bn_mode=bn_mode)
    terms = Branches(
        ce=cross_entropy(clean_logits, y),
        kl=kl_divergence(adv_logits, y, clean_logits=clean_logits),
        ce_anti=cross_entropy(anti_logits, y),
        clean_logits=clean_logits,
        adv_logits=adv_logits,
        anti_logits=anti_logits,
    )
    return terms, stats


def gates(weights: Array, adv_weight_floor: float) -> tuple[Array, Array]:
    """(alpha, beta) per example; the optional floor lifts alpha (see `adv_weight_floor`)."""
    alpha, beta = weights[:, 0], weights[:, 1]
    if adv_weight_floor:
        alpha = adv_weight_floor + (1.0 - adv_weight_floor) * alpha
    return alpha, beta


def composite_loss(terms: Branches, w0: Array, w1: Array, alpha: Array, beta: Array,
                   beta_trades: float) -> tuple[Array, Array, Array]:
    """(loss, adversarial part, anti-adversarial part) of CAAT's objective.

    The adversarial part is FRL's separately normalised TRADES loss gated by alpha; the
    anti part is the batch mean of beta * CE on the anti-adversaries.
    """
    norm0, norm1 = jnp.sum(w0), jnp.sum(w1)
    adv = (jnp.sum(alpha * w0 * terms.ce) / norm0
           + beta_trades * jnp.sum(alpha * w1 * terms.kl) / norm1)
    anti = jnp.mean(beta * terms.ce_anti)
    return adv + anti, adv, anti


# ------------------------------------------------------------------------------ virtual step
def momentum_trace(opt_state) -> Any | None:
    """The momentum buffer inside the real optimiser's state (None without momentum)."""
    leaves = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.TraceState))
    traces = [s.trace for s in leaves if isinstance(s, optax.TraceState)]
    return traces[0] if traces else None


def virtual_sgd_step(params, grads, opt_state, lr, *, momentum: float, weight_decay: float):
    """W_hat = W - lr (mu buf + g + wd W): one step of `hamjax.train.optim`'s SGD, differentiable.

    PyTorch SGD (and `optim._sgd`): d = g + wd W; buf' = mu buf + d; W' = W - lr buf'. The real
    momentum buffer is read from opt_state; nothing is written back (it is a virtual step).
    """
    trace = momentum_trace(opt_state)
    if trace is None:
        trace = jax.tree.map(jnp.zeros_like, params)

    def step(w, g, buf):
        d = g + weight_decay * w
        if momentum:
            d = d + momentum * buf
        return w - lr * d

    return jax.tree.map(step, params, grads, trace)


def virtual_model(ctx, state, meta_params, train_inputs: tuple, lr):
    """W_hat(Omega): one virtual SGD step on the training batch's CAAT loss (Eq. 9).

    train_inputs = (x, y, x_adv, x_anti), the perturbations generated against W. BatchNorm uses
    batch statistics without updating the running ones (the official pseudo-model is in train
    mode and discarded); the meta-net also standardises with the batch's statistics (it is being
    trained).
    """
    mcfg = ctx.config.method
    ms = state.method_state
    x, y, x_adv, x_anti = train_inputs
    w0, w1, _ = class_parameters(ms["lambdas"], mcfg)
    net = make_meta_net(mcfg)
    proportion = class_proportion(ctx)

    def inner_loss(params):
        terms, _ = branch_terms(ctx, params, state.batch_stats, x, y, x_adv, x_anti,
                                bn_mode="batch")
        logits = terms.clean_logits
        if not mcfg.meta_feature_grad:
            logits = jax.lax.stop_gradient(logits)
        features = meta_features(logits, y, ms["class_loss_last"], proportion)
        weights, _ = route(net, meta_params, ms["meta_stats"], features, batch_stats=True)
        alpha, beta = gates(weights, mcfg.adv_weight_floor)
        return composite_loss(terms, w0[y], w1[y], alpha, beta, mcfg.beta)[0]

    grads = jax.grad(inner_loss)(state.params)
    train = ctx.config.train
    return virtual_sgd_step(state.params, grads, state.opt_state, lr,
                            momentum=float(train.momentum),
                            weight_decay=float(train.weight_decay))


def meta_objective(params, ctx, batch_stats, meta_inputs: tuple, lambdas) -> Array:
    """Composite loss (alpha = beta = 1) on the meta batch, with the meta batch's own w0, w1."""
    mcfg = ctx.config.method
    xm, ym, xm_adv, xm_anti = meta_inputs
    w0, w1, _ = class_parameters(lambdas, mcfg)
    terms, _ = branch_terms(ctx, params, batch_stats, xm, ym, xm_adv, xm_anti, bn_mode="batch")
    ones = jnp.ones_like(terms.ce)
    return composite_loss(terms, w0[ym], w1[ym], ones, ones, mcfg.beta)[0]


def meta_gradient(ctx, state, meta_params, train_inputs: tuple, meta_batch: tuple, rng, lr,
                  meta_perturbations: tuple | None = None):
    """(L_meta, dL_meta/dOmega) through the virtual step (Eq. 10).

    The meta batch's perturbations are generated against W_hat with the meta labels' own
    bounds (unless given) and, like every adversarial example, treated as data.
    """
    w_hat, pullback = jax.vjp(lambda mp: virtual_model(ctx, state, mp, train_inputs, lr),
                              meta_params)
    xm, ym = meta_batch
    lambdas = state.method_state["lambdas"]
    if meta_perturbations is None:
        _, _, mult = class_parameters(lambdas, ctx.config.method)
        eps = per_example_eps(ctx.config.attack.eps, mult, ym)
        meta_perturbations = perturbations(ctx, w_hat, state.batch_stats, xm, ym, eps, rng)
    inputs = (xm, ym, *meta_perturbations)
    loss, grad_w = jax.value_and_grad(meta_objective)(w_hat, ctx, state.batch_stats, inputs,
                                                      lambdas)
    (grad_meta,) = pullback(grad_w)
    return loss, grad_meta


def meta_due(step: Array, steps_per_epoch: int, interval: int) -> Array:
    """True at in-epoch batch indices interval-1, 2 interval-1, ... (official `(i+1) % 50`)."""
    return ((step % max(int(steps_per_epoch), 1)) + 1) % int(interval) == 0


def meta_update(state, batch: dict, rng, ctx) -> dict:
    """One Meta-Weight-Net update of the meta-net (Eqs. 9-10); returns the new method_state."""
    mcfg = ctx.config.method
    ms = state.method_state
    train_key, meta_key = jax.random.split(rng)
    x, y = batch["image"], batch["label"]
    _, _, mult = class_parameters(ms["lambdas"], mcfg)
    eps = per_example_eps(ctx.config.attack.eps, mult, y)
    x_adv, x_anti = perturbations(ctx, state.params, state.batch_stats, x, y, eps, train_key)
    lr = ctx.lr_fn(state.step)
    loss, grad = meta_gradient(ctx, state, ms["meta_params"], (x, y, x_adv, x_anti),
                               (batch["meta_image"], batch["meta_label"]), meta_key, lr)
    tx = meta_optimizer(mcfg)
    updates, opt_state = tx.update(grad, ms["meta_opt_state"], ms["meta_params"])
    return dict(
        ms,
        meta_params=optax.apply_updates(ms["meta_params"], updates),
        meta_opt_state=opt_state,
        meta_updates=ms["meta_updates"] + 1,
        meta_loss=loss.astype(jnp.float32),
        meta_grad_norm=optax.tree.norm(grad).astype(jnp.float32),
    )


def _meta_ledger(batch: int, meta_batch: int, steps: int) -> Ledger:
    """Approximate example passes of one meta update.

    Training batch: both attacks, the inner loss (3 forwards + backward) and the reverse pass
    through that backward (counted as 3 more forwards + backwards); meta batch: both attacks
    and the meta loss.
    """
    perturb = (attack_ledger(batch, steps, final_eval=True) + attack_ledger(batch, steps)
               + attack_ledger(meta_batch, steps, final_eval=True)
               + attack_ledger(meta_batch, steps))
    return perturb + training_ledger(batch, 6) + training_ledger(meta_batch, 3)


def caat_pre_step(state, batch, rng, ctx):
    """Runs `meta_update` when `meta_due` (lax.cond: no cost on the other steps)."""
    mcfg = ctx.config.method
    fire = meta_due(state.step, ctx.steps_per_epoch, mcfg.meta_interval)
    method_state = jax.lax.cond(
        fire, lambda ms: meta_update(state, batch, rng, ctx), lambda ms: ms, state.method_state)
    cost = _meta_ledger(batch["image"].shape[0], batch["meta_image"].shape[0],
                        ctx.config.attack.steps)
    f = fire.astype(jnp.float32)
    ledger = state.ledger + Ledger(forward=cost.forward * f, backward=cost.backward * f)
    return state.replace(method_state=method_state, ledger=ledger)


# ------------------------------------------------------------------------------ real step
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


# ------------------------------------------------------------------------------ state, epochs
def meta_net_rng(method_config, method_rng: Array) -> Array:
    """The meta-net's init key: `method.meta_init_seed` when set (>= 0), else the run's."""
    seed = int(method_config.get("meta_init_seed", -1))
    return jax.random.PRNGKey(seed) if seed >= 0 else method_rng


def init_meta_net(method_config, rng: Array) -> dict:
    """A fresh meta-net's variables (params and BatchNorm statistics)."""
    return make_meta_net(method_config).init(rng, jnp.zeros((2, NUM_FEATURES), jnp.float32),
                                             use_running_average=False)


def caat_init_state(ctx, rng) -> dict:
    """Multipliers at zero, a fresh meta-net and Adam state, empty accumulators."""
    mcfg = ctx.config.method
    c = ctx.num_classes
    variables = init_meta_net(mcfg, meta_net_rng(mcfg, rng))
    meta_params = variables["params"]

    def zeros():  # a fresh buffer per leaf: the jitted step donates the state
        return jnp.zeros((c,), jnp.float32)

    return {
        "lambdas": init_lambdas(c),
        "margin_bounds": margin_bounds(mcfg),
        "meta_params": meta_params,
        "meta_stats": variables["batch_stats"],
        "meta_opt_state": meta_optimizer(mcfg).init(meta_params),
        "meta_updates": jnp.zeros((), jnp.int32),
        "meta_loss": jnp.zeros((), jnp.float32),
        # |dL_meta/dOmega| of the last meta step: ~0 at T = 0.001 unless an example is near a tie
        "meta_grad_norm": jnp.zeros((), jnp.float32),
        "class_loss_last": jnp.full((c,), float(mcfg.initial_class_loss), jnp.float32),
        "class_loss_sum": zeros(),
        "class_count": zeros(),
        "route_adv": zeros(),
        "route_total": zeros(),
    }


def roll_epoch(method_state: dict) -> dict:
    """End of epoch: feature 2 becomes this epoch's class-average clean CE (classes not seen
    keep their old value); the loss and routing accumulators restart."""
    ms = dict(method_state)
    count = ms["class_count"]
    ms["class_loss_last"] = jnp.where(count > 0, ms["class_loss_sum"] / jnp.maximum(count, 1.0),
                                      ms["class_loss_last"])
    for key in ("class_loss_sum", "class_count", "route_adv", "route_total"):
        ms[key] = jnp.zeros_like(ms[key])
    return ms


def caat_epoch_end(state, ctx, evaluator):
    """FRL multipliers refitted on the meta set; class losses and routing counts rolled over."""
    old = state.method_state
    ms = roll_epoch(old)
    ms["lambdas"] = refit_lambdas(old["lambdas"], state, ctx, evaluator, (True, True, True))
    return state.replace(method_state=place_like(ms, old))


def routing_summary(method_state) -> dict:
    """Routing over the epoch so far (the loop reads it before `epoch_end` resets it).

    adv_fraction: share of examples with alpha > beta; per_class_adv_fraction: the same per
    class (None for a class not seen); meta_updates: meta steps taken so far.
    """
    ms = jax.device_get(method_state)
    adv = np.asarray(ms["route_adv"], np.float64)
    total = np.asarray(ms["route_total"], np.float64)
    per_class = [float(a / t) if t > 0 else None for a, t in zip(adv, total, strict=True)]
    return {
        "adv_fraction": float(adv.sum() / total.sum()) if total.sum() > 0 else None,
        "per_class_adv_fraction": per_class,
        "meta_updates": int(ms["meta_updates"]),
    }


def caat_summarize_state(method_state) -> dict:
    """Logged after each epoch: routing, the FRL multipliers, feature 2, the last meta loss."""
    ms = jax.device_get(method_state)
    out = routing_summary(ms)
    out.update(summarize_lambdas(ms["lambdas"], ms["margin_bounds"]))
    count = np.asarray(ms["class_count"], np.float64)
    loss_sum = np.asarray(ms["class_loss_sum"], np.float64)
    out["class_avg_loss"] = [float(s / c) if c > 0 else None
                             for s, c in zip(loss_sum, count, strict=True)]
    out["meta_loss_last"] = float(ms["meta_loss"])
    out["meta_grad_norm_last"] = float(ms["meta_grad_norm"])
    return out


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
