"""Why CAAT routes the way it does: its router's decisions on the training pool, explained.

Faithful CAAT (T = 0.001) can send about half of the examples, and whole classes, to the
anti-adversarial branch. These functions take a trained CAAT state and answer three questions
from the model's own features:

- Did the meta-net learn? Its weights' drift from their seeded initialisation, and how often the
  trained router decides like the untrained one.
- Is routing a class decision? How often an example goes where most of its class goes, and how
  much the routing moves when the two class-level features (last epoch's class loss, class
  proportion) are replaced by the batch mean (standardised to 0 by the router's BatchNorm).
- Does it find the noisy labels? The anti-adversary share among mislabelled and correctly
  labelled examples (the paper's theory sends mislabelled ones to the anti-adversary).

Routing is computed batch by batch, as in training (the router's BatchNorm standardises with
the batch's statistics under the official `meta_bn = "batch"`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.methods.caat_router import (
    FEATURE_NAMES,
    class_proportion,
    init_meta_net,
    make_meta_net,
    meta_features,
    meta_net_rng,
    route,
)
from hamjax.methods.common import forward

Array = jax.Array
CLASS_FEATURES = tuple(FEATURE_NAMES.index(n) for n in
                       ("class_avg_loss_last_epoch", "class_proportion"))


def without_class_features(features: Array) -> Array:
    """Features with the class-level columns set to their batch mean (0 after the router's
    batch standardisation): what the router decides from the per-example features alone."""
    cols = jnp.asarray(CLASS_FEATURES)
    means = jnp.mean(features[:, cols], axis=0)
    return features.at[:, cols].set(jnp.broadcast_to(means, (features.shape[0], cols.size)))


def routed_to_adversary(ctx, method_state, meta_params, features: Array) -> Array:
    """bool[B]: alpha > beta for one batch's features under `meta_params` (as the real step)."""
    weights, _ = route(make_meta_net(ctx.config.method), meta_params, method_state["meta_stats"],
                       features, batch_stats=ctx.config.method.meta_bn == "batch")
    return weights[:, 0] > weights[:, 1]


def batch_features(ctx, params, batch_stats, method_state, x, y) -> Array:
    """The router's six features from clean logits in BatchNorm batch mode (as the training
    step sees them)."""
    logits, _ = forward(ctx, params, batch_stats, x, bn_mode="batch")
    return meta_features(logits, y, method_state["class_loss_last"], class_proportion(ctx))


def batch_routing(ctx, params, batch_stats, method_state, meta_params, x, y) -> dict[str, Array]:
    """One batch's routing (True = adversary) by `meta_params`, with and without the
    class-level features, and the features (raw, and as the router's BatchNorm standardises
    them)."""
    features = batch_features(ctx, params, batch_stats, method_state, x, y)
    standardised = (features - jnp.mean(features, 0)) / jnp.sqrt(jnp.var(features, 0) + 1e-5)
    return {"adv": routed_to_adversary(ctx, method_state, meta_params, features),
            "adv_without_class_features": routed_to_adversary(
                ctx, method_state, meta_params, without_class_features(features)),
            "features": features, "standardised_features": standardised}


def initial_meta_params(ctx, seed: int):
    """The meta-net weights a run with config.seed = `seed` started from (the trainer's method
    key, or `method.meta_init_seed` when the config sets one)."""
    method_rng = jax.random.split(jax.random.PRNGKey(seed), 3)[1]
    return init_meta_net(ctx.config.method, meta_net_rng(ctx.config.method, method_rng))["params"]


def untrained_meta_params(ctx, meta_init_seed: int):
    """The meta-net weights `method.meta_init_seed = meta_init_seed` starts from."""
    return init_meta_net(ctx.config.method, jax.random.PRNGKey(int(meta_init_seed)))["params"]


def relative_drift(trained, initial) -> float:
    """||trained - initial|| / ||initial|| over all meta-net weights."""
    diff = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32),
                        trained, initial)
    sq = lambda t: sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(t))  # noqa: E731
    return float(np.sqrt(sq(diff) / max(sq(initial), 1e-30)))


def _share(mask: np.ndarray, where: np.ndarray) -> float | None:
    return float(mask[where].mean()) if where.any() else None


def _per_class(adv: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Share of each class's examples routed to the adversary (None: class not present)."""
    return [_share(adv, labels == c) for c in range(num_classes)]


def _class_majority_agreement(adv: np.ndarray, labels: np.ndarray,
                              per_class: list[float | None]) -> float:
    """Share of examples routed like most of their class (a tie counts as adversary)."""
    majority = np.array([(p or 0.0) >= 0.5 for p in per_class])
    return float(np.mean(adv == majority[labels]))


def routing_report(adv: np.ndarray, adv_init: np.ndarray, adv_no_class: np.ndarray,
                   labels: np.ndarray, clean_labels: np.ndarray, num_classes: int,
                   standardised_features: np.ndarray | None = None) -> dict[str, Any]:
    """Summary of per-example routing decisions (bool arrays, True = adversary).

    standardised_features (optional, [N, 6], each batch's features standardised as the
    router's BatchNorm does) gives each feature's mean on either branch.

    class_majority_agreement: share of examples routed like most of their (given) label's class
    (1.0: routing is a class decision; ~max(p, 1 - p) when it ignores the class);
    agreement_with_initial_router / agreement_without_class_features: shares of equal decisions.
    """
    adv, adv_init, adv_no_class = (np.asarray(a, bool) for a in (adv, adv_init, adv_no_class))
    labels, clean_labels = np.asarray(labels), np.asarray(clean_labels)
    noisy = labels != clean_labels
    per_class = _per_class(adv, labels, num_classes)
    out: dict[str, Any] = {
        "examples": int(adv.size),
        "adv_fraction": float(adv.mean()),
        "per_class_adv_fraction": per_class,
        "per_class_adv_fraction_initial_router": _per_class(adv_init, labels, num_classes),
        "per_class_adv_fraction_without_class_features": _per_class(adv_no_class, labels,
                                                                    num_classes),
        "class_majority_agreement": _class_majority_agreement(adv, labels, per_class),
        "agreement_with_initial_router": float(np.mean(adv == adv_init)),
        "agreement_without_class_features": float(np.mean(adv == adv_no_class)),
        "mislabelled_fraction": float(noisy.mean()),
        "anti_share_mislabelled": _share(~adv, noisy),
        "anti_share_correctly_labelled": _share(~adv, ~noisy),
    }
    if standardised_features is not None:  # where each branch's examples sit in their batch
        f = np.asarray(standardised_features, np.float64)
        out["standardised_feature_mean"] = {
            name: {"adversary": _mean(f[adv, i]), "anti_adversary": _mean(f[~adv, i])}
            for i, name in enumerate(FEATURE_NAMES)}
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def initialisation_lottery(adv_by_seed: dict[int, np.ndarray], labels: np.ndarray,
                           num_classes: int) -> list[dict[str, Any]]:
    """Per meta-net initialisation seed: where its untrained router sends the examples (the
    share to the adversary, per class, and how much of it is a class decision)."""
    out = []
    for seed, adv in adv_by_seed.items():
        adv = np.asarray(adv, bool)
        per_class = _per_class(adv, labels, num_classes)
        out.append({"seed": int(seed), "adv_fraction": float(adv.mean()),
                    "per_class_adv_fraction": per_class,
                    "class_majority_agreement": _class_majority_agreement(adv, labels,
                                                                          per_class)})
    return out
