"""WAT (Li & Liu, AAAI 2023, "WAT: Improve the Worst-class Robustness in Adversarial Training").

As boqili/WAT @62d1184 computes it (`worst_class_adversarial_train.py`):

- K + 1 Hedge weights w: one per class and one for the average ("we add expected training loss
  in the decision set"); w = 1 (sum K + 1) until the first update, so the first epoch trains on
  2 x TRADES.
- Loss, TRADES terms with train-BN forwards (clean first):
    L = sum_c w_c sum_{i: y_i = c} (CE_i + beta KL_i) / B + w_K [mean CE + beta sum KL / B].
- After every epoch: TRADES-attack the validation split (KL-PGD, eval-BN, config.attack's
  eps / step / steps) and take cost_c = class c's mean of CE(f(x)) + beta KL(f(x) || f(x')),
  cost_K = the overall mean; w = K softmax(eta sum_{s <= t} cost_s) (log-sum-exp).

Stated differences: the official normaliser is the padded example count (val_iter * batch:
3072 for 3000 examples), i.e. costs 2.3% low; here each cost is an exact mean. Classes are
averaged as K sum_c / N there, equal to the class mean on its balanced split.

The validation pass runs on the trainer's validation examples (config.data.val_size, the subset
config.eval.num_examples picks: those its model selection uses) through the trainer's
evaluation driver (`evaluator.map_split`), so each example counts once on any mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks import pgd
from hamjax.attacks.losses import kl_divergence
from hamjax.attacks.rng import example_keys
from hamjax.data import images_to_float
from hamjax.errors import ConfigError
from hamjax.methods import Method, register
from hamjax.methods.baselines import trades_adversary, trades_terms
from hamjax.methods.classwise import completed_epochs, number, rounded
from hamjax.methods.common import (
    accuracy,
    attack_ledger,
    cross_entropy,
    forward,
    step_aux,
    training_ledger,
)
from hamjax.sharding import place_like

Array = jax.Array

WAT_DEFAULTS = {
    "beta": 6.0,  # TRADES beta, in the loss and in the validation cost
    "eta": 0.1,  # Hedge learning rate
}


# ------------------------------------------------------------------------------ pure maths
def hedge_weights(cumulative_cost: Array, eta: float) -> Array:
    """w = K softmax(eta * cumulative cost) over the K + 1 experts (sum K); softmax is
    log-sum-exp stable, so a cost sum growing linearly with the epochs cannot overflow."""
    cumulative_cost = jnp.asarray(cumulative_cost, jnp.float32)
    num_classes = cumulative_cost.shape[-1] - 1
    return num_classes * jax.nn.softmax(eta * cumulative_cost, axis=-1)


def validation_cost(per_example_cost: np.ndarray, labels: np.ndarray,
                    num_classes: int) -> np.ndarray:
    """[class means ..., overall mean] of the per-example validation cost, float64 [K + 1]."""
    cost = np.asarray(per_example_cost, np.float64)
    labels = np.asarray(labels)
    sums = np.bincount(labels, weights=cost, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return np.append(means, cost.mean() if len(cost) else 0.0)


def wat_objective(ce: Array, kl: Array, labels: Array, weights: Array, beta: float) -> Array:
    """sum_i w_{y_i} (CE_i + beta KL_i) / B + w_K (mean CE + beta mean KL)."""
    per_ex = ce + beta * kl
    class_part = jnp.sum(weights[labels] * per_ex) / ce.shape[0]
    return class_part + weights[-1] * (jnp.mean(ce) + beta * jnp.mean(kl))


# ------------------------------------------------------------------------------ method
def wat_init_state(ctx, rng) -> dict:
    """w = 1 for the K classes and the average expert; no cost seen yet."""
    del rng
    k = ctx.num_classes + 1
    return {"weights": jnp.ones((k,), jnp.float32),
            "cumulative_cost": jnp.zeros((k,), jnp.float32),
            "last_cost": jnp.zeros((k,), jnp.float32)}


def wat_loss(params, state, batch, rng, ctx):
    """TRADES terms weighted by the Hedge weights (see `wat_objective`)."""
    x, y = batch["image"], batch["label"]
    beta = float(ctx.config.method.beta)
    x_adv, _ = trades_adversary(ctx, params, state.batch_stats, x, y, rng)
    ce, kl, clean_logits, adv_logits, stats = trades_terms(
        ctx, params, state.batch_stats, x, y, x_adv)
    loss = wat_objective(ce, kl, y, state.method_state["weights"], beta)
    ledger = attack_ledger(x.shape[0], ctx.config.attack.steps, final_eval=True)
    ledger = ledger + training_ledger(x.shape[0], 2)
    return loss, step_aux(stats, ledger, train_acc=accuracy(clean_logits, y),
                          train_robust_acc=accuracy(adv_logits, y), kl=jnp.mean(kl))


def validation_cost_fn(ctx):
    """Chunk function (`hamjax.evaluation.driver`): each example's CE(f(x)) + beta KL after a
    TRADES attack, all in eval-BN; the attack's start draws from the example's own key."""
    attack = ctx.config.attack
    beta = float(ctx.config.method.beta)

    def cost(variables, batch, key):
        def logits_fn(z):
            return forward(ctx, variables["params"], variables["batch_stats"], z,
                           bn_mode="eval")[0]

        x, y = images_to_float(batch["image"]), batch["label"]
        clean = logits_fn(x)
        x_adv, _ = pgd(logits_fn, x, y, example_keys(key, batch["index"]), eps=attack.eps,
                       step_size=attack.step_size, steps=attack.steps, loss="kl",
                       init="normal", clean_logits=clean, final_eval=False)
        adv = logits_fn(x_adv)
        return {"cost": cross_entropy(clean, y) + beta * kl_divergence(adv, y,
                                                                       clean_logits=clean)}

    return cost


_COST_FNS: dict = {}


def cost_fn_for(ctx):
    """validation_cost_fn(ctx), made once per context so its pass compiles once."""
    if _COST_FNS.get("ctx") is not ctx:
        _COST_FNS.clear()
        _COST_FNS.update(ctx=ctx, fn=validation_cost_fn(ctx))
    return _COST_FNS["fn"]


def measure_validation_cost(state, ctx, evaluator, epoch: int) -> np.ndarray:
    """cost_t over the K classes and the average, float64 [K + 1], on the trainer's validation
    examples (the split and subset its model selection uses), through its evaluation driver."""
    key = jax.random.fold_in(jax.random.PRNGKey(int(ctx.config.seed)), epoch)
    outputs, labels = evaluator.map_split(state, "val", cost_fn_for(ctx), key)
    return validation_cost(outputs["cost"], labels, ctx.num_classes)


def hedge_step(ms: dict, cost: np.ndarray, eta: float) -> dict:
    """One Hedge update of the state from this epoch's validation cost."""
    cumulative = ms["cumulative_cost"] + jnp.asarray(cost, jnp.float32)
    return {"weights": hedge_weights(cumulative, eta), "cumulative_cost": cumulative,
            "last_cost": jnp.asarray(cost, jnp.float32)}


def wat_epoch_end(state, ctx, evaluator):
    """After each trained epoch: the validation costs, then the Hedge update. The call a
    fine-tune makes before its first epoch (nothing trained yet) changes nothing."""
    completed = completed_epochs(state, ctx)
    if int(jax.device_get(state.step)) == 0:
        return state
    cfg = ctx.config
    cost = measure_validation_cost(state, ctx, evaluator, completed)
    ms = state.method_state
    return state.replace(method_state=place_like(hedge_step(ms, cost, float(cfg.method.eta)),
                                                 ms))


def wat_summarize_state(method_state) -> dict:
    """The Hedge weights this epoch trained with (K classes, then the average expert) and the
    last validation cost that produced them."""
    ms = jax.device_get(method_state)
    weights = np.asarray(ms["weights"])
    return {"class_weights": rounded(weights[:-1]), "average_weight": rounded(weights[-1]),
            "last_val_cost": rounded(np.asarray(ms["last_cost"])[:-1]),
            "last_val_cost_average": rounded(np.asarray(ms["last_cost"])[-1])}


def validate_wat(config) -> None:
    """Every WAT field, by name, and the validation split it needs."""
    number(config, "beta", lambda v: v >= 0, "must be >= 0 (official: 6)")
    number(config, "eta", lambda v: v >= 0, "must be >= 0 (official: 0.1)")
    if not config.data.val_size:
        raise ConfigError("config.data.val_size=0 but method 'wat' updates its class weights "
                          "on the validation split; set data.val_size > 0 (WAT: 3000 for "
                          "CIFAR-10, 300 per class)")


register(Method(
    "wat",
    wat_loss,
    init_state=wat_init_state,
    epoch_end=wat_epoch_end,
    validate=validate_wat,
    summarize_state=wat_summarize_state,
    defaults=dict(WAT_DEFAULTS),
    description="WAT worst-class adversarial training, Hedge class weights (Li & Liu 2023)",
))
