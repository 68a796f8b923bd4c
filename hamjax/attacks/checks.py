"""Gradient-masking and misuse checks that the AutoAttack reference runs (autoattack/checks.py).

A low robust accuracy is only trustworthy when gradient attacks had gradients to follow. These
checks turn the usual symptoms into readable warnings: inputs with all-zero gradients, a
non-deterministic `logits_fn`, probabilities passed as logits, too many target classes, attack
outputs outside the threat model, and a black-box attack (Square) breaking examples that every
white-box attack missed. The numeric parts are jittable; `format_warnings` runs on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks.losses import cw_margin

Array = jax.Array
LogitsFn = Callable[[Array], Array]

RANDOMIZED_TOL = 1e-4  # reference: max L2 distance of L2-normalised outputs
VALID_TOL = 1e-5  # slack on the eps ball and the box when judging attack outputs
SQUARE_TOL = 0.002  # reference: Square may lower robust accuracy by at most 0.2 points
WHITE_BOX_PREFIXES = ("apgd", "fab", "pgd")
BLACK_BOX = ("square",)


def judge(logits_fn: LogitsFn, x: Array, y: Array, x_adv: Array, eps: Array, norm: str):
    """(fooled, valid) per example: an attack output counts only inside the threat model.

    valid: finite, in [0, 1] and within eps (+1e-5) of x. fooled: valid and misclassified when
    the model is re-evaluated on it (the reference trusts only this re-evaluation).
    """
    delta = (x_adv - x).reshape(x.shape[0], -1)
    size = (jnp.max(jnp.abs(delta), axis=-1) if norm == "linf"
            else jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1)))
    flat = x_adv.reshape(x.shape[0], -1)
    valid = (jnp.all(jnp.isfinite(flat), axis=-1) & (size <= eps + VALID_TOL)
             & jnp.all((flat >= -VALID_TOL) & (flat <= 1.0 + VALID_TOL), axis=-1))
    safe = jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, x)
    fooled = valid & (jnp.argmax(logits_fn(safe), axis=-1) != y)
    return fooled, valid


def zero_gradients(logits_fn: LogitsFn, x: Array, y: Array) -> Array:
    """bool[B]: the example's margin-loss input gradient is exactly zero.

    The reference looks at the DLR gradient at APGD's start; the CW margin has the same zero set
    (both vanish only where the logits do not depend on the input) and exists for 2 classes too.
    """
    def total(xa):
        return jnp.sum(cw_margin(logits_fn(xa), y))

    grad = jax.grad(total)(jnp.asarray(x, jnp.float32))
    return jnp.sum(jnp.abs(grad.reshape(grad.shape[0], -1)), axis=-1) == 0


def zero_gradient_count(logits_fn: LogitsFn, x: Array, y: Array, mask: Array | None = None):
    """(n_zero, n_checked): examples in `mask` whose input gradient is zero (`zero_gradients`)."""
    zero = zero_gradients(logits_fn, x, y)
    mask = jnp.ones(zero.shape, bool) if mask is None else mask
    return jnp.sum(zero & mask).astype(jnp.int32), jnp.sum(mask).astype(jnp.int32)


def output_gap(outputs: Sequence[Array]) -> Array:
    """Max L2 distance between L2-normalised outputs of repeated calls on the same input."""
    normed = [o / (jnp.linalg.norm(o, axis=-1, keepdims=True) + 1e-10)
              for o in (jnp.asarray(o, jnp.float32) for o in outputs)]
    gap = jnp.float32(0.0)
    for i in range(len(normed)):
        for j in range(i + 1, len(normed)):
            gap = jnp.maximum(gap, jnp.max(jnp.linalg.norm(normed[i] - normed[j], axis=-1)))
    return gap


def randomness_gap(logits_fn: LogitsFn, x: Array, n_calls: int = 2) -> float:
    """Host-side check: calls logits_fn eagerly n_calls times; a deterministic model gives 0.

    Run outside jit: randomness drawn in Python (or a stateful host RNG) is frozen by tracing.
    """
    outputs = [np.asarray(logits_fn(x)) for _ in range(n_calls)]
    return float(output_gap(outputs))


def probability_rows(logits: Array, tol: float = 1e-5) -> Array:
    """bool[B]: the row is in [0, 1] and sums to 1 (a softmax output, not logits)."""
    logits = jnp.asarray(logits, jnp.float32)
    return ((jnp.max(logits, axis=-1) < 1.0 + tol) & (jnp.min(logits, axis=-1) > -tol)
            & (jnp.abs(jnp.sum(logits, axis=-1) - 1.0) < tol))


def looks_like_probabilities(logits: Array, tol: float = 1e-5) -> Array:
    """True when every row looks like probabilities (`probability_rows`)."""
    return jnp.all(probability_rows(logits, tol))


def is_white_box(name: str) -> bool:
    return name.startswith(WHITE_BOX_PREFIXES)


def black_box_only(fooled_by: Mapping[str, Array]):
    """Examples a black-box attack fooled that no white-box attack (APGD, FAB) fooled: bool[B]."""
    black = [v for k, v in fooled_by.items() if k in BLACK_BOX]
    white = [v for k, v in fooled_by.items() if is_white_box(k)]
    if not black or not white:
        return None
    any_black = black[0]
    for v in black[1:]:
        any_black = any_black | v
    any_white = white[0]
    for v in white[1:]:
        any_white = any_white | v
    return any_black & ~any_white


def target_class_warnings(attack_names: Sequence[str], num_classes: int,
                          n_targets: Mapping[str, int]) -> list[str]:
    """The reference's `check_n_classes`: DLR needs >= 3 classes, targeted DLR >= 4."""
    out = []
    if "apgd-dlr" in attack_names and num_classes <= 2:
        out.append(f"with only {num_classes} classes the DLR loss (apgd-dlr) is undefined")
    if "apgd-t" in attack_names and num_classes <= 3:
        out.append(f"with only {num_classes} classes the targeted DLR loss (apgd-t) is undefined")
    for name, n in n_targets.items():
        if name in attack_names and n + 1 > num_classes:
            out.append(f"{name} asks for {n} target classes but only {num_classes - 1} exist")
    return out


def clean_warnings(*, n_zero_grad, n_grad_checked, output_gap_value,
                   probabilities) -> list[str]:
    """Readable warnings from the checks on the clean model (host side, concrete values)."""
    out = []
    n_zero, n_checked = int(n_zero_grad), int(n_grad_checked)
    if n_zero > 0:
        out.append(
            f"zero gradients: {n_zero} of {n_checked} attacked examples ({n_zero / n_checked:.1%})"
            " have an all-zero input gradient, so gradient attacks cannot move them and robust "
            "accuracy may be overestimated (gradient masking: look for round/argmax/quantisation"
            " or saturated outputs in the model)")
    gap = float(output_gap_value)
    if gap > RANDOMIZED_TOL:
        out.append(
            f"randomised outputs: logits_fn gives different outputs for the same input (max "
            f"normalised difference {gap:.2e}); deterministic attacks misjudge a randomised "
            "defence, evaluate it with expectation over transformation (AutoAttack 'rand')")
    if bool(probabilities):
        out.append("outputs look like probabilities (in [0, 1], rows sum to 1): pass logits, "
                   "since CE/DLR on probabilities saturate and mask gradients")
    return out


def attack_warnings(fooled_by: Mapping[str, Array], invalid: Mapping[str, Array],
                    batch_size: int) -> list[str]:
    """Readable warnings from what the attacks did: a black-box attack beating every white-box
    one, outputs outside the threat model (host side, concrete values)."""
    out = []
    only = black_box_only(fooled_by)
    if only is not None:
        n_only = int(np.sum(np.asarray(only)))
        if batch_size and n_only / batch_size > SQUARE_TOL:
            out.append(
                f"black-box beats white-box: Square fooled {n_only} examples "
                f"({n_only / batch_size:.2%} of the batch) that every white-box attack missed; "
                "the white-box gradients are probably masked, so consider more Square queries "
                "and restarts or an adaptive attack")
    for name, n in invalid.items():
        if int(n) > 0:
            out.append(f"{name} returned {int(n)} points outside the eps ball or [0, 1] (or not "
                       "finite); they were not counted as adversarial")
    return out


def format_warnings(*, n_zero_grad, n_grad_checked, output_gap_value, probabilities,
                    fooled_by: Mapping[str, Array], invalid: Mapping[str, Array],
                    batch_size: int) -> list[str]:
    """Every readable warning: `clean_warnings` then `attack_warnings`."""
    return clean_warnings(n_zero_grad=n_zero_grad, n_grad_checked=n_grad_checked,
                          output_gap_value=output_gap_value, probabilities=probabilities) + \
        attack_warnings(fooled_by, invalid, batch_size)
