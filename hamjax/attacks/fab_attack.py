"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), as run inside AutoAttack.

FAB searches for the *smallest* adversarial perturbation rather than the worst loss in a ball:
it linearises the decision boundary at the current iterate, projects both the iterate and the
clean point onto that linearised boundary (inside the [0, 1] box), steps to a convex combination
biased towards the clean point, and keeps the smallest adversarial point it meets. An example
counts as broken when that minimum is <= eps, so one run answers every smaller eps too.

The loop follows the reference `fra31/auto-attack` (fab_base.py, fab_pt.py, fab_projections.py)
step for step; what differs is only how it is batched: a lax loop over the (target, restart)
runs and over the steps, masks instead of index selection, and a run skipped (lax.cond) once no
example is left to attack.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from hamjax.attacks import rng

Array = jax.Array
LogitsFn = Callable[[Array], Array]

NORMS = ("linf",)


@flax.struct.dataclass
class FABInfo:
    """Minimal adversarials found, for minimum-norm evaluation and tests.

    norm: L_inf norm of the smallest adversarial perturbation found over the runs that attacked
      the example; 0 for examples misclassified when clean, inf where no run found one. Once an
      example is broken (norm <= eps) later runs skip it, as in the reference, so pass eps=0 to
      get the minimum over every target and restart.
    x_min: that adversarial point (x itself where none was found).
    """

    norm: Array
    x_min: Array


def projection_linf(t: Array, w: Array, b: Array) -> Array:
    """Smallest L_inf step d with w.(t + d) = b and t + d in [0, 1], per row.

    t, w: f32[N, D]; b: f32[N]. The reference `projection_linf`'s answer: with the sign of w
    chosen so that w.z must fall by c >= 0, a radius lam buys g(lam) = sum_i |w_i| min(lam, room_i)
    where room_i is how far z_i can move towards its box face; g is piecewise linear and
    non-decreasing, and lam solves g(lam) = c (`_solve_radius`). When the box makes the
    hyperplane unreachable (g(max room) <= c) every coordinate moves all the way to its face:
    the closest the box gets, which is what FAB needs.
    """
    t, w, b = (jnp.asarray(a, jnp.float32) for a in (t, w, b))
    excess = jnp.sum(w * t, axis=-1) - b
    w = w * jnp.where(excess >= 0, 1.0, -1.0)[:, None]
    c = jnp.abs(excess)
    neg = w < 0
    face = neg.astype(jnp.float32)
    room = jnp.maximum(jnp.where(neg, 1.0 - t, t), 0.0) + 0.0  # +0.0: no -0.0 (see below)
    absw = jnp.abs(w)
    feasible = jnp.sum(absw * room, axis=-1) > c  # g(max room) > c
    lam = _solve_radius(room, absw, c)[:, None]
    d_feasible = jnp.where(neg, jnp.minimum(lam, 1.0 - t), jnp.maximum(-lam, -t))
    d = jnp.where(feasible[:, None], d_feasible, face - t)
    return jnp.where(w != 0, d, 0.0)


def _solve_radius(room: Array, absw: Array, c: Array) -> Array:
    """lam >= 0 with sum_i absw_i min(lam, room_i) = c, per row (rows where no lam reaches c
    get a value that is not used).

    Bisection on the bit patterns of float32 (for floats >= +0 their order is that of the bits),
    31 halvings of [0, max room]: the bracket ends as two adjacent floats lo < hi with no room
    strictly between them, so the rooms split into those <= lo (spent whole) and >= hi (spending
    lam each), and lam = (c - spent) / slope is exact on that piece, as the reference's sorted
    cumsum gives it. Elementwise passes over D instead of a sort (XLA:CPU sorts slowly).
    """

    def g(bits: Array) -> Array:
        lam = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(absw * jnp.minimum(lam[:, None], room), axis=-1)

    def halve(_, bracket):
        lo, hi = bracket
        mid = lo + (hi - lo) // 2
        above = g(mid) > c
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    hi = jax.lax.bitcast_convert_type(jnp.max(room, axis=-1), jnp.uint32)
    lo, hi = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(hi), hi))
    lo_f = jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]
    hi_f = jax.lax.bitcast_convert_type(hi, jnp.float32)[:, None]
    spent = jnp.sum(jnp.where(room <= lo_f, absw * room, 0.0), axis=-1)
    slope = jnp.sum(jnp.where(room >= hi_f, absw, 0.0), axis=-1)
    safe = jnp.where(slope > 0, slope, 1.0)
    return jnp.maximum(jnp.where(slope > 0, (c - spent) / safe, 0.0), 0.0)


def _per_example(v, batch: int) -> Array:
    v = jnp.asarray(v, jnp.float32)
    return jnp.broadcast_to(v, (batch,)) if v.ndim == 0 else v


def _linf(v: Array) -> Array:
    return jnp.max(jnp.abs(v), axis=-1)


def _take(logits: Array, idx: Array) -> Array:
    return jnp.take_along_axis(logits, idx[:, None], axis=-1)[:, 0]


def _boundary(flat_logits: LogitsFn, z: Array, y: Array, target: Array | None):
    """Logit difference f and its input gradient for the boundary FAB linearises at z.

    Targeted: f = z_t - z_y. Untargeted: the class j != y whose linearised boundary is closest in
    L_inf (|f_j| / ||grad f_j||_1), from the full input Jacobian (one vjp per class, vmapped;
    examples are independent so the batch shares each vjp).
    """
    if target is not None:
        def diff(zz):
            logits = flat_logits(zz).astype(jnp.float32)
            return _take(logits, target) - _take(logits, y)

        val, vjp = jax.vjp(diff, z)
        (grad,) = vjp(jnp.ones_like(val))
        return val, grad
    logits, vjp = jax.vjp(lambda zz: flat_logits(zz).astype(jnp.float32), z)
    batch, num_classes = logits.shape
    cot = jnp.broadcast_to(jnp.eye(num_classes)[:, None, :], (num_classes, batch, num_classes))
    (jac,) = jax.vmap(vjp)(cot)  # [C, B, D]
    jac = jnp.swapaxes(jac, 0, 1)
    df = logits - _take(logits, y)[:, None]
    dg = jac - jnp.take_along_axis(jac, y[:, None, None], axis=1)
    dist = jnp.abs(df) / (1e-12 + jnp.sum(jnp.abs(dg), axis=-1))
    dist = jnp.where(jax.nn.one_hot(y, num_classes, dtype=bool), jnp.inf, dist)
    j = jnp.argmin(dist, axis=-1)
    return _take(df, j), jnp.take_along_axis(dg, j[:, None, None], axis=1)[:, 0]


def _single_run(flat_logits, x0, y, target, x_start, active, *, steps, alpha_max, eta, beta):
    """One FAB run from x_start (reference `attack_single_run`); returns (best, best_norm)."""
    batch = x0.shape[0]

    def body(_, carry):
        x1, best, best_norm = carry
        df, dg = _boundary(flat_logits, x1, y, target)
        b = jnp.sum(dg * x1, axis=-1) - df
        d = projection_linf(jnp.concatenate([x1, x0]), jnp.concatenate([dg, dg]),
                            jnp.concatenate([b, b]))
        d1, d2 = d[:batch], d[batch:]
        a = jnp.maximum(_linf(d), 1e-8)
        a1, a2 = a[:batch], a[batch:]
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x_new = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        is_adv = jnp.argmax(flat_logits(x_new), axis=-1) != y
        norm = _linf(x_new - x0)
        better = active & is_adv & (norm < best_norm)
        best = jnp.where(better[:, None], x_new, best)
        best_norm = jnp.where(better, norm, best_norm)
        x_new = jnp.where(is_adv[:, None], x0 + (x_new - x0) * beta, x_new)
        x1 = jnp.where(active[:, None], x_new, x1)
        return x1, best, best_norm

    init = (x_start, x0, jnp.full((batch,), jnp.inf, jnp.float32))
    _, best, best_norm = jax.lax.fori_loop(0, steps, body, init)
    return best, best_norm


def _fab(logits_fn, x, y, key, *, eps, targeted, num_classes, n_target_classes, steps,
         n_restarts, norm, alpha_max, eta, beta, return_info):
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: FAB supports {NORMS}")
    if steps < 0 or n_restarts < 1:
        raise ValueError(f"steps={steps}, n_restarts={n_restarts}: need steps >= 0, restarts >= 1")
    shape = x.shape
    batch = shape[0]
    x0 = x.reshape(batch, -1).astype(jnp.float32)
    y = y.astype(jnp.int32)
    eps_b = _per_example(eps, batch)

    def flat_logits(z):
        return logits_fn(z.reshape(shape).astype(x.dtype))

    clean_logits = flat_logits(x0)
    classes = clean_logits.shape[-1]
    if num_classes is not None and num_classes != classes:
        raise ValueError(f"num_classes={num_classes} but logits_fn returns {classes} classes")
    correct = jnp.argmax(clean_logits, axis=-1) == y
    # Reference targets: the 2nd, 3rd, ... highest clean logits (the true class is the top one on
    # every example it attacks); capped at C - 1 so small label sets still work.
    n_targets = max(1, min(n_target_classes, classes - 1)) if targeted else 1
    ranked = jnp.argsort(clean_logits, axis=-1)

    def run(i, state):
        x_adv, broken, norm_min, x_min = state
        active = correct & ~broken

        def attack(state):
            x_adv, broken, norm_min, x_min = state
            restart = i % n_restarts
            target = None
            if targeted:
                target = jnp.take(ranked, classes - 2 - i // n_restarts, axis=-1)
            u = rng.batch_draw(jax.random.uniform, rng.fold_in(key, i), x0.shape, jnp.float32,
                               minval=-1.0, maxval=1.0)
            rand = x0 + eps_b[:, None] * u / jnp.maximum(_linf(u), 1e-12)[:, None] * 0.5
            x_start = jnp.where(restart > 0, jnp.clip(rand, 0.0, 1.0), x0)
            best, best_norm = _single_run(flat_logits, x0, y, target, x_start, active,
                                          steps=steps, alpha_max=alpha_max, eta=eta, beta=beta)
            smaller = active & (best_norm < norm_min)
            norm_min = jnp.where(smaller, best_norm, norm_min)
            x_min = jnp.where(smaller[:, None], best, x_min)
            newly = active & (best_norm <= eps_b)
            x_adv = jnp.where(newly[:, None], best, x_adv)
            return x_adv, broken | newly, norm_min, x_min

        return jax.lax.cond(jnp.any(active), attack, lambda s: s, state)

    norm0 = jnp.where(correct, jnp.inf, 0.0)
    state = (x0, jnp.zeros((batch,), bool), norm0, x0)
    x_adv, broken, norm_min, x_min = jax.lax.fori_loop(0, n_targets * n_restarts, run, state)
    x_adv = jax.lax.stop_gradient(x_adv.reshape(shape).astype(x.dtype))
    robust = correct & ~broken
    if not return_info:
        return x_adv, robust
    info = FABInfo(norm=norm_min, x_min=jax.lax.stop_gradient(x_min.reshape(shape)))
    return x_adv, robust, info


def fab_targeted(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    num_classes: int | None = None,
    n_target_classes: int = 9,
    steps: int = 100,
    n_restarts: int = 1,
    norm: str = "linf",
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    return_info: bool = False,
):
    """FAB-T of AutoAttack: one run per target, the top `n_target_classes` non-true classes.

    eps: scalar or f32[B]. Returns (x_adv, robust: bool[B]); x_adv differs from x only where
    the example was broken (an adversarial within eps was found), as in the reference. With
    return_info=True also returns FABInfo (minimal norms found). Restarts after the first start
    from a random point at L_inf radius eps / 2. num_classes, if given, is checked against the
    logits; the target count is capped at C - 1.
    """
    return _fab(logits_fn, x, y, key, eps=eps, targeted=True, num_classes=num_classes,
                n_target_classes=n_target_classes, steps=steps, n_restarts=n_restarts, norm=norm,
                alpha_max=alpha_max, eta=eta, beta=beta, return_info=return_info)


def fab(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    num_classes: int | None = None,
    steps: int = 100,
    n_restarts: int = 1,
    norm: str = "linf",
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    return_info: bool = False,
):
    """Untargeted FAB: each step linearises the closest boundary (needs the full Jacobian).

    Same contract as `fab_targeted`; costs C backward passes per step instead of one.
    """
    return _fab(logits_fn, x, y, key, eps=eps, targeted=False, num_classes=num_classes,
                n_target_classes=1, steps=steps, n_restarts=n_restarts, norm=norm,
                alpha_max=alpha_max, eta=eta, beta=beta, return_info=return_info)
