"""Auto-PGD (Croce & Hein, ICML 2020): PGD with momentum and a step size that adapts itself.

The loop follows the reference `fra31/auto-attack` (autopgd_base.py, `APGDAttack` /
`APGDAttack_targeted`) step for step, so robust accuracies are comparable with published
AutoAttack numbers:

- start at x + eps * u / ||u|| (u uniform in [-1, 1]^d for L_inf, Gaussian for L_2), clipped;
- step size 2 eps; the first step is plain PGD, later ones mix in momentum with alpha = 0.75;
- checkpoints from `apgd_checkpoints` (the reference's integer form of p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)); at a checkpoint an example halves its step
  size and restarts from its best point when (1) the loss rose on at most rho * h_j of the h_j
  steps since the last checkpoint or (2) its step size was not halved at the last checkpoint and
  its best loss has not improved since then.

Two deliberate details (see `checkpoint_decision`): condition (1) uses `<=` as the reference code
does (the paper writes `<`; they differ only when rho * h_j is an integer, e.g. h_j = 16), and the
first window compares f(x_1) with f(x_0) as the paper says (the reference compares it with an
uninitialised 0).

Batching differs from the reference only in form: restarts and targets are a `lax.scan` over
runs on the whole batch, and an example already fooled keeps its adversarial point (masks instead
of the reference's index selection), so the result is the per-example worst case over runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks import rng
from hamjax.attacks.losses import LOSSES, per_example_loss
from hamjax.attacks.pgd_attack import NORMS, project

Array = jax.Array
LogitsFn = Callable[[Array], Array]

MOMENTUM = 0.75  # alpha in the paper: weight of the new gradient step after the first step


@flax.struct.dataclass
class APGDInfo:
    """Per-example outcome of `apgd` / `apgd_targeted`.

    success: misclassified at the returned point (clean-misclassified examples included; they are
      returned unchanged, as the reference does not attack them).
    loss: highest attack loss reached over all runs (for targeted runs, over all targets).
    trace: with return_trace=True, per-run per-iteration arrays [runs, steps, B]: `step_size`
      (the step size the iteration used), `loss` (at the new iterate), `reduced` (halved at this
      iteration's checkpoint), `cond1`, `cond2` (which condition fired; False off checkpoints).
    """

    success: Array
    loss: Array
    trace: dict[str, Array] | None = None


def apgd_checkpoints(steps: int) -> list[int]:
    """Iteration counts after which APGD checks its step size, starting with 0.

    The reference's integer rule: first window h_1 = max(int(0.22 N), 1), each next window shrinks
    by max(int(0.03 N), 1) down to max(int(0.06 N), 1). For N = 100 this equals ceil(p_j N) with
    the paper's p_j: [0, 22, 41, 57, 70, 80, 87, 93, 99].
    """
    if steps < 1:
        return [0]
    window = max(int(0.22 * steps), 1)
    min_window = max(int(0.06 * steps), 1)
    decrease = max(int(0.03 * steps), 1)
    points = [0]
    while points[-1] + window <= steps:
        points.append(points[-1] + window)
        window = max(window - decrease, min_window)
    return points


def checkpoint_decision(n_increase, window, rho, loss_best, loss_best_last_check,
                        reduced_last_check) -> tuple[Array, Array]:
    """APGD's two step-size conditions at a checkpoint, per example: (cond1, cond2).

    n_increase: steps in the window whose loss beat the previous iterate's; window: its length
    h_j. cond1: too few increases (the reference's `<=`). cond2: not halved last time and the best
    loss did not improve since the last checkpoint. The step is halved where either holds.
    """
    n_increase = jnp.asarray(n_increase, jnp.float32)
    cond1 = n_increase <= rho * jnp.asarray(window, jnp.float32)
    cond2 = ~jnp.asarray(reduced_last_check, bool) & (loss_best_last_check >= loss_best)
    return cond1, cond2


def _bcast(v: Array, ndim: int) -> Array:
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _flat_max_abs(v: Array) -> Array:
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=-1)


def _flat_l2(v: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.square(v.reshape(v.shape[0], -1)), axis=-1))


def apgd_start(key: Array, x: Array, eps: Array, norm: str) -> Array:
    """The reference's random start: a point on the eps sphere's direction u / ||u||, clipped."""
    if norm == "linf":
        u = rng.batch_draw(jax.random.uniform, key, x.shape, x.dtype, minval=-1.0, maxval=1.0)
        u = u / _bcast(_flat_max_abs(u) + 1e-12, x.ndim)
    else:
        u = rng.batch_draw(jax.random.normal, key, x.shape, x.dtype)
        u = u / _bcast(_flat_l2(u) + 1e-12, x.ndim)
    return jnp.clip(x + _bcast(eps, x.ndim) * u, 0.0, 1.0)


def _direction(grad: Array, norm: str) -> Array:
    if norm == "linf":
        return jnp.sign(grad)
    return grad / _bcast(_flat_l2(grad) + 1e-12, grad.ndim)


def _single_run(logits_fn: LogitsFn, x: Array, y: Array, x0: Array, eps: Array, target, *,
                norm: str, loss: str, steps: int, rho: float, return_trace: bool):
    """One APGD run from x0. Returns (x_best, loss_best, fooled, x_best_adv, trace)."""
    ndim = x.ndim
    eps_b = _bcast(eps, ndim)

    def objective(xa):
        logits = logits_fn(xa)
        per_ex = per_example_loss(loss, logits, y, target=target)
        return jnp.sum(per_ex), (logits, per_ex)

    grad_fn = jax.grad(objective, has_aux=True)
    grad0, (logits0, loss0) = grad_fn(x0)
    wrong0 = jnp.argmax(logits0, axis=-1) != y

    points = apgd_checkpoints(steps)
    is_ckpt = np.zeros((steps,), bool)
    window = np.zeros((steps,), np.float32)
    for prev, cur in zip(points[:-1], points[1:], strict=True):
        is_ckpt[cur - 1] = True
        window[cur - 1] = cur - prev

    batch = x.shape[0]
    carry = dict(
        x_adv=x0, x_old=x0, grad=grad0, step=2.0 * eps, x_best=x0, grad_best=grad0,
        loss_best=loss0, x_best_adv=x0, fooled=wrong0, loss_prev=loss0,
        n_increase=jnp.zeros((batch,), jnp.int32), loss_best_last=loss0,
        reduced_last=jnp.ones((batch,), bool),
    )

    def body(c, xs):
        i, ckpt, win = xs
        a = jnp.where(i > 0, MOMENTUM, 1.0)
        x_adv = c["x_adv"]
        momentum = x_adv - c["x_old"]
        z = project(x, x_adv + _bcast(c["step"], ndim) * _direction(c["grad"], norm), eps_b, norm)
        x_new = project(x, x_adv + a * (z - x_adv) + (1.0 - a) * momentum, eps_b, norm)

        grad, (logits, cur) = grad_fn(x_new)
        wrong = jnp.argmax(logits, axis=-1) != y
        fooled = c["fooled"] | wrong
        x_best_adv = jnp.where(_bcast(wrong, ndim), x_new, c["x_best_adv"])

        improved = cur > c["loss_best"]
        x_best = jnp.where(_bcast(improved, ndim), x_new, c["x_best"])
        grad_best = jnp.where(_bcast(improved, ndim), grad, c["grad_best"])
        loss_best = jnp.where(improved, cur, c["loss_best"])
        n_increase = c["n_increase"] + (cur > c["loss_prev"]).astype(jnp.int32)

        cond1, cond2 = checkpoint_decision(n_increase, win, rho, loss_best, c["loss_best_last"],
                                           c["reduced_last"])
        cond1, cond2 = cond1 & ckpt, cond2 & ckpt
        reduce = cond1 | cond2
        reduce_b = _bcast(reduce, ndim)
        new = dict(
            x_adv=jnp.where(reduce_b, x_best, x_new), x_old=x_adv,
            grad=jnp.where(reduce_b, grad_best, grad),
            step=jnp.where(reduce, 0.5 * c["step"], c["step"]),
            x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_best_adv=x_best_adv,
            fooled=fooled, loss_prev=cur,
            n_increase=jnp.where(ckpt, 0, n_increase),
            loss_best_last=jnp.where(ckpt, loss_best, c["loss_best_last"]),
            reduced_last=jnp.where(ckpt, reduce, c["reduced_last"]),
        )
        out = None
        if return_trace:
            out = dict(step_size=c["step"], loss=cur, reduced=reduce, cond1=cond1, cond2=cond2)
        return new, out

    xs = (jnp.arange(steps), jnp.asarray(is_ckpt), jnp.asarray(window))
    c, trace = jax.lax.scan(body, carry, xs, length=steps)
    return c["x_best"], c["loss_best"], c["fooled"], c["x_best_adv"], trace


def _check(norm: str, loss: str, steps: int, n_runs: int) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: APGD supports {NORMS}")
    if loss not in LOSSES or loss == "kl":
        raise ValueError(f"loss={loss!r}: choose one of {sorted(set(LOSSES) - {'kl'})}")
    if steps < 0 or n_runs < 1:
        raise ValueError(f"steps={steps}, runs={n_runs}: need steps >= 0 and at least one run")


def _apgd_runs(logits_fn: LogitsFn, x: Array, y: Array, key: Array, *, eps, norm: str, loss: str,
               steps: int, rho: float, targets: Array | None, n_runs: int, x_init: Array | None,
               return_trace: bool, clean_logits: Array | None = None) -> tuple[Array, APGDInfo]:
    """Runs `n_runs` APGD runs (restarts and/or targets) and keeps the per-example worst case.

    A run is skipped (lax.cond) once every example is fooled, as the reference skips restarts
    and targets with nothing left to attack.
    """
    _check(norm, loss, steps, n_runs)
    batch, ndim = x.shape[0], x.ndim
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (batch,))  # float64 stays float64
    if clean_logits is None:
        clean_logits = logits_fn(x)
    clean_wrong = jnp.argmax(clean_logits, axis=-1) != y

    def attack(c, run_key, target):
        start = apgd_start(run_key, x, eps, norm) if x_init is None else jnp.clip(x_init, 0, 1)
        x_best, loss_best, fooled, x_best_adv, trace = _single_run(
            logits_fn, x, y, start, eps, target, norm=norm, loss=loss, steps=steps, rho=rho,
            return_trace=return_trace)
        done, x_adv, x_hi, loss_hi = c
        newly = ~done & fooled
        x_adv = jnp.where(_bcast(newly, ndim), x_best_adv, x_adv)
        better = loss_best > loss_hi
        x_hi = jnp.where(_bcast(better, ndim), x_best, x_hi)
        return (done | fooled, x_adv, x_hi, jnp.maximum(loss_hi, loss_best)), trace

    def skip(c, run_key, target):
        del run_key, target
        if not return_trace:
            return c, None
        zeros = functools.partial(jnp.zeros, (steps, batch))
        return c, dict(step_size=zeros(eps.dtype), loss=zeros(jnp.float32), reduced=zeros(bool),
                       cond1=zeros(bool), cond2=zeros(bool))

    def run(c, xs):
        run_key, target = xs
        return jax.lax.cond(jnp.all(c[0]), skip, attack, c, run_key, target)

    keys = rng.split(key, n_runs)
    tgt = jnp.zeros((n_runs, batch), jnp.int32) if targets is None else targets
    init = (clean_wrong, x, x, jnp.full((batch,), -jnp.inf, jnp.float32))
    if targets is None:
        (done, x_adv, x_hi, loss_hi), trace = jax.lax.scan(
            lambda c, k: run(c, (k, None)), init, keys)
    else:
        (done, x_adv, x_hi, loss_hi), trace = jax.lax.scan(run, init, (keys, tgt))
    # Fooled: the adversarial point; clean-misclassified: x itself; robust: the highest-loss point.
    x_out = jnp.where(_bcast(done & ~clean_wrong, ndim), x_adv,
                      jnp.where(_bcast(clean_wrong, ndim), x, x_hi))
    info = APGDInfo(success=done, loss=loss_hi, trace=trace if return_trace else None)
    return jax.lax.stop_gradient(x_out), info


def apgd(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 100,
    n_restarts: int = 1,
    rho: float = 0.75,
    target: Array | None = None,
    x_init: Array | None = None,
    return_trace: bool = False,
) -> tuple[Array, APGDInfo]:
    """APGD on `loss` ("ce", "dlr", or a targeted loss with `target`), worst case over restarts.

    eps: scalar or f32[B]. Returns (x_adv, APGDInfo): x_adv is the adversarial point where one
    was found, x where the clean input is already misclassified, else the highest-loss point.
    Restarts run on the whole batch (static shapes); a fooled example keeps its first success.
    x_init: start every run here instead of the random start (the reference's `x_init`).
    """
    if loss in ("dlr_targeted", "ce_targeted") and target is None:
        raise ValueError(f"loss={loss!r} needs target (int32[B]); or use apgd_targeted")
    targets = None if target is None else jnp.broadcast_to(target, (n_restarts,) + y.shape)
    return _apgd_runs(logits_fn, x, y, key, eps=eps, norm=norm, loss=loss, steps=steps, rho=rho,
                      targets=targets, n_runs=n_restarts, x_init=x_init,
                      return_trace=return_trace)


def top_target_classes(clean_logits: Array, y: Array, n_target_classes: int) -> Array:
    """The n highest-scoring classes other than the label, by clean logits: int32[n, B]."""
    onehot = jax.nn.one_hot(y, clean_logits.shape[-1], dtype=bool)
    masked = jnp.where(onehot, -jnp.inf, clean_logits.astype(jnp.float32))
    _, idx = jax.lax.top_k(masked, n_target_classes)
    return idx.T.astype(jnp.int32)


def apgd_targeted(
    logits_fn: LogitsFn,
    x: Array,
    y: Array,
    key: Array,
    *,
    eps,
    norm: str = "linf",
    steps: int = 100,
    n_target_classes: int = 9,
    n_restarts: int = 1,
    rho: float = 0.75,
    loss: str = "dlr_targeted",
    x_init: Array | None = None,
    return_trace: bool = False,
) -> tuple[Array, APGDInfo]:
    """APGD-T: targeted DLR towards each of the top-n non-true classes, n_restarts per target.

    Targets are ranked by the clean logits (the reference ranks among all classes, which is the
    same for the correctly classified examples it attacks). Needs >= 4 classes for the targeted
    DLR loss and n_target_classes <= num_classes - 1.
    """
    clean_logits = jax.lax.stop_gradient(logits_fn(jnp.asarray(x, jnp.float32)))
    num_classes = clean_logits.shape[-1]
    if loss == "dlr_targeted" and num_classes < 4:
        raise ValueError(f"targeted DLR needs >= 4 classes, the model has {num_classes}; "
                         "use loss='ce_targeted' or leave APGD-T out (version='custom')")
    if not 1 <= n_target_classes <= num_classes - 1:
        raise ValueError(f"n_target_classes={n_target_classes}: must be in 1..{num_classes - 1}")
    targets = top_target_classes(clean_logits, y, n_target_classes)
    targets = jnp.repeat(targets, n_restarts, axis=0)  # run r attacks target r // n_restarts
    return _apgd_runs(logits_fn, x, y, key, eps=eps, norm=norm, loss=loss, steps=steps, rho=rho,
                      targets=targets, n_runs=n_target_classes * n_restarts, x_init=x_init,
                      return_trace=return_trace, clean_logits=clean_logits)
