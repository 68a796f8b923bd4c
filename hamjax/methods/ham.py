"""HAM: Hard Adversarial example Mining (Lin et al. 2023), with its saving realised under jit.

After `warmup_epochs` of plain PGD-AT, every step runs M PGD steps on the whole batch, one
forward pass at x_M to find the hard set H = {i : argmax f(x_M)_i != y_i}, and then only H
continues: the K - M remaining steps and the training pass (mean CE over H, BatchNorm statistics
from H alone). The official code is yyl-github-1896/HAM @e3ee5ff (`GAIRAT_wrong_early_time.py`,
`attack_generator.py`, a fork of GAIRAT): it shrinks the PyTorch batch to H by indexing.

Shapes are static under jit, so a mask alone would save nothing. The hard rows are gathered into
the smallest of a few fixed bucket sizes (`method.buckets`, fractions of the batch) that holds
them, chosen by `lax.switch`: each bucket is compiled once, nothing recompiles as |H| changes,
and padded rows are masked out of the loss and of the BatchNorm statistics. `bucketed=False`
runs the plain masked reference instead (full batch, step mask, masked loss and BN), which gives
the same examples, loss and gradient at full cost.

Under a device mesh (`ctx.mesh`) the packing is per device: each device packs its own selected
rows into a local bucket (`jax.shard_map` over the data axis), the bucket size is chosen from the
largest local count (one `pmax` on a scalar), and the continuation and training pass then run
under the ordinary sharded jit on S/n rows per device. BatchNorm statistics and the loss are
masked sums over the global bucket, so they equal the one-device step's; no image moves between
devices. The ledger counts executed rows, n times the local bucket, padding included.

Gradients are taken inside the branch that ran and handed to the trainer via `attach_gradient`:
differentiating *through* `lax.switch` would make every branch emit the residuals of all
branches (zero-filled), paying memory for the full batch even when a small bucket runs.

Ledger: M*B forward+backward (phase 1), B forward (mining), (K - M)*S + S forward+backward on the
bucket of S rows, padding included since it is executed.

Cross-batch variant (opt-in, `method.cross_batch_rows = R > 0`; the faithful step above is the
default and unchanged): the selected rows do not continue at once but join a buffer in the
method state, with their clean image, x_M, label and kappa, per device (`ham_buffer`). Once some
device holds R/n rows, every device continues its oldest R/n buffered rows (padding masked)
through steps M+1..K with the *current* weights, and one optimiser step trains on them; the
overflow waits for the next step. Steps that do not flush take no optimiser step
(`apply_update`). The ledger counts (M + 1)*B forward and M*B backward every step, and
(K - M + 1)*R forward+backward more on a flush. Staleness:
a trained row waited (steps since it was mined); as weights change only at flushes, its x_M was
made with the current weights unless it was overflow of an earlier flush (then one update old:
the overflow is trained first at the next flush). The epoch record (`summarize_state`) carries
flushes, mean and maximum staleness in steps and the rows one update behind. The state is
replicated, so on a mesh the buffer is gathered onto every device after each step (its images
travel; nothing else does).

XLA:CPU caveat: backward convolutions inside `lax.switch` branches (and `while` bodies) miss the
CPU compiler's layout canonicalisation (jax-ml/jax#12868) and run far slower, which on CPU eats
the bucket saving unless the model's convs have a canonical-layout VJP: `model.conv_vjp="auto"`
(the default) gives them one on CPU (`hamjax.backends.cpu.conv`; `benchmarks/ham_cost.py` times
the step with it). GPUs are not affected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hamjax.attacks import mine_hard, pgd
from hamjax.methods import Method, register
from hamjax.methods.common import (
    attack_logits_fn,
    cross_entropy,
    forward,
    step_aux,
    train_attack,
)
from hamjax.methods.ham_buffer import append_rows, init_buffer, keep_overflow, take_rows
from hamjax.methods.relatives import gair_weights
from hamjax.metrics import Ledger
from hamjax.sharding import max_local_count, mesh_size, per_device, place_like
from hamjax.validation import is_int, is_number, require

Array = jax.Array
Params = Any

# Optional batch entry that replaces the mined hard set: a hook for tests and benchmarks that
# need a chosen hard fraction. Real batches never carry it. bool[B], or int8[B] with -1 for a
# row the mining pass decides: with int8 (`forced_hard_rows`) XLA cannot know that every row is
# forced, so it keeps the mining forward pass that a bool set makes dead code, and a forced step
# costs what a real one does.
FORCE_HARD_KEY = "ham_force_hard"


def forced_hard_rows(hard: np.ndarray) -> np.ndarray:
    """A FORCE_HARD_KEY entry (int8: 1 hard, 0 easy) that leaves the mining pass in the step."""
    return np.asarray(hard, bool).astype(np.int8)

DEFAULTS: dict[str, Any] = {
    # Epochs of plain PGD-AT before HAM. The official code starts HAM when
    # (epoch + 1) >= begin_epoch with 0-based epochs, so its `--begin_epoch 50` is 49 here.
    "warmup_epochs": 49,
    "mining_step": 3,  # M: hard set decided after M of the K attack steps (SVHN: 5)
    # Static bucket sizes, fractions of the batch, spaced at most 1.33x apart over the hard
    # fractions real runs see (0.15-0.6), so padding costs at most a third of the bucket there.
    # Each is one `lax.switch` branch compiled once with the step; nothing recompiles as |H| moves.
    "buckets": (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75, 1.0),
    "bucketed": True,  # False: masked full-batch reference path (same result, full cost)
    "gair": False,  # GAIRAT kappa weights over the trained rows (official `--gair`)
    "gair_lambda": -1.0,
    "keep_easy_fraction": 0.0,  # share of easy rows kept, chosen at random (`keep_bili_high_conf`)
    "hard_keep_fraction": 1.0,  # keep only this least-confident share of H (1 - `drop_bili`)
    # What the rows that stop at step M contribute: "drop" (the official rule: nothing) or
    # "train_at_m" (a variant: they are trained on their step-M adversaries, already computed;
    # the training pass then covers the whole batch).
    "easy_examples": "drop",
    # Opt-in cross-batch variant for small per-device batches; 0 (the default) is the faithful
    # step. R > 0: the rows selected after step M gather across batches, with their step-M
    # adversaries, in a buffer of R rows (R / devices per device); once R have gathered they run
    # the K - M remaining steps with the current weights and are trained on in one optimiser
    # step, and steps in between take none (`hamjax.methods.ham_buffer`, docs/performance.md).
    "cross_batch_rows": 0,
}
EASY_EXAMPLES = ("drop", "train_at_m")


@dataclasses.dataclass(frozen=True)
class HamSettings:
    """Static HAM settings read once from the config (never traced)."""

    steps: int
    mining_step: int
    eps: float
    step_size: float
    bn_mode: str
    warmup_epochs: int
    buckets: tuple[float, ...]
    bucketed: bool
    gair: bool
    gair_lambda: float
    keep_easy_fraction: float
    hard_keep_fraction: float
    easy_examples: str = "drop"
    cross_batch_rows: int = 0

    @classmethod
    def from_config(cls, config) -> HamSettings:
        method = config.method

        def get(name: str) -> Any:
            value = method.get(name, None)
            return DEFAULTS[name] if value is None else value

        return cls(
            steps=int(config.attack.steps),
            mining_step=int(get("mining_step")),
            eps=float(config.attack.eps),
            step_size=float(config.attack.step_size),
            bn_mode=str(config.attack.bn_mode),
            warmup_epochs=int(get("warmup_epochs")),
            buckets=tuple(float(b) for b in get("buckets")),
            bucketed=bool(get("bucketed")),
            gair=bool(get("gair")),
            gair_lambda=float(get("gair_lambda")),
            keep_easy_fraction=float(get("keep_easy_fraction")),
            hard_keep_fraction=float(get("hard_keep_fraction")),
            easy_examples=str(get("easy_examples")),
            cross_batch_rows=int(get("cross_batch_rows")),
        )


@flax.struct.dataclass
class HamOutput:
    """Everything one HAM step computed (per-row arrays are over the whole batch B).

    x_adv: final examples (trained rows after K steps; the others stay at x_M).
    hard: misclassified at x_M. selected: rows trained on. weights: loss weights (0 elsewhere,
    mean 1 over the selected rows). kappa: correctly classified iterates of the trained rows.
    bucket_size: rows executed after mining (0: empty hard set; B in warm-up).
    bucket_index: index into `method.buckets`, -1 when no bucket ran (empty or warm-up).
    """

    loss: Array
    grads: Params
    batch_stats: Any
    x_adv: Array
    hard: Array
    selected: Array
    weights: Array
    kappa: Array
    correct: Array  # trained rows classified right at the training forward pass
    bucket_size: Array
    bucket_index: Array
    warmup: Array
    ledger: Ledger


# ---------------------------------------------------------------------------------------------
# Small pure pieces


def bucket_sizes(fractions: tuple[float, ...], batch: int) -> tuple[int, ...]:
    """Static bucket row counts: ceil(f * B), at least 1, sorted and deduplicated."""
    return tuple(sorted({max(1, math.ceil(round(f * batch, 6))) for f in fractions}))


def bucket_shares(bucket_index: Array, sizes: tuple[int, ...], batch: int) -> dict[str, Array]:
    """One 0/1 metric per bucket, named by its fraction of the (local) batch: averaged over an
    epoch they are the bucket histogram (the share of steps that ran each bucket)."""
    return {f"bucket_share/{size / batch:.4g}": (bucket_index == i).astype(jnp.float32)
            for i, size in enumerate(sizes)}


def choose_branch(n: Array, sizes: tuple[int, ...]) -> Array:
    """`lax.switch` index: 0 = nothing selected, i + 1 = the smallest sizes[i] >= n."""
    smaller = jnp.sum(jnp.asarray(sizes) < n)
    index = jnp.minimum(1 + smaller, len(sizes))
    return jnp.where(n == 0, 0, index).astype(jnp.int32)


def _rank_descending(score: Array) -> Array:
    """rank[i]: position of row i when rows are sorted by score, largest first (stable)."""
    order = jnp.argsort(-score, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def select_rows(
    hard: Array,
    mining_loss: Array,
    key: Array,
    *,
    keep_easy_fraction: float,
    hard_keep_fraction: float,
) -> Array:
    """Rows that continue past step M: the hard set, optionally thinned and topped up.

    hard_keep_fraction r < 1 keeps the ceil(r |H|) hard rows of lowest true-class confidence at
    x_M (largest CE; the official `drop_bili` ranks at x_K, one extra forward pass, and keeps
    int(r |H|) + 1). keep_easy_fraction f > 0 adds floor(f |easy|) easy rows chosen uniformly at
    random by `key` (the official rule for `keep_bili_high_conf` is not in the released code).
    """
    selected = hard
    if hard_keep_fraction < 1.0:
        keep = jnp.ceil(hard_keep_fraction * jnp.sum(hard)).astype(jnp.int32)
        rank = _rank_descending(jnp.where(hard, mining_loss, -jnp.inf))
        selected = hard & (rank < keep)
    if keep_easy_fraction > 0.0:
        easy = ~hard
        keep = jnp.floor(keep_easy_fraction * jnp.sum(easy)).astype(jnp.int32)
        priority = jax.random.uniform(key, hard.shape)
        rank = _rank_descending(jnp.where(easy, priority, -1.0))
        selected = selected | (easy & (rank < keep))
    return selected


def gather_rows(selected: Array, size: int) -> tuple[Array, Array]:
    """Indices of the selected rows packed into `size` slots (padding repeats row 0), validity."""
    index = jnp.nonzero(selected, size=size, fill_value=0)[0]
    valid = jnp.arange(size) < jnp.sum(selected)
    return index, valid


def scatter_rows(full: Array, index: Array, valid: Array, rows: Array) -> Array:
    """Writes the valid bucket rows back into a batch-sized array (padding dropped)."""
    target = jnp.where(valid, index, full.shape[0])
    return full.at[target].set(rows, mode="drop")


def _bn_mask(valid: Array | None) -> Array | None:
    """BatchNorm row mask; an all-False mask (empty set) becomes all-True to avoid NaN stats
    in results that are discarded anyway."""
    if valid is None:
        return None
    return jnp.where(jnp.any(valid), valid, True)


def masked_logits_fn(ctx, params: Params, batch_stats, bn_mode: str, valid: Array) -> Callable:
    """Attack logits on a partly valid batch: padded rows stay out of the BN statistics and
    send no gradient, so with BN in batch mode valid rows see what they would see alone."""
    mask = _bn_mask(valid)

    def logits_fn(x: Array) -> Array:
        logits = forward(ctx, params, batch_stats, x, bn_mode=bn_mode, mask=mask)[0]
        return jnp.where(valid[:, None], logits, jax.lax.stop_gradient(logits))

    return logits_fn


def loss_weights(kappa: Array, valid: Array, settings: HamSettings) -> Array:
    """1 on the trained rows, or GAIRAT's kappa weights normalised to mean 1 over them."""
    if settings.gair:
        return gair_weights(kappa, settings.steps, settings.gair_lambda, valid)
    return valid.astype(jnp.float32)


def weighted_loss(params, ctx, batch_stats, x, y, weights, valid):
    """sum_i w_i CE_i / |valid| with BN in train mode over the valid rows; aux (stats, logits)."""
    logits, stats = forward(ctx, params, batch_stats, x, bn_mode="train", mask=_bn_mask(valid))
    ce = cross_entropy(logits, y)
    count = x.shape[0] if valid is None else jnp.maximum(jnp.sum(valid), 1)
    keep = True if valid is None else valid
    loss = jnp.sum(jnp.where(keep, ce * weights, 0.0)) / count
    return loss, (stats, logits)


@jax.custom_vjp
def attach_gradient(params: Params, loss: Array, grads: Params) -> Array:
    """Returns `loss`, whose gradient w.r.t. `params` is `grads` (computed where the branch ran)."""
    del params, grads
    return loss


def _attach_fwd(params, loss, grads):
    del params
    return loss, grads


def _attach_bwd(grads, g):
    zeros = jax.tree.map(jnp.zeros_like, grads)
    return jax.tree.map(lambda t: g * t, grads), jnp.zeros_like(g), zeros


attach_gradient.defvjp(_attach_fwd, _attach_bwd)


def ham_ledger(batch: int, steps: int, mining_step: int, rows: Array) -> Ledger:
    """Executed passes of a HAM step that continued `rows` rows (padding included)."""
    rows = jnp.asarray(rows, jnp.float32)
    after = (steps - mining_step + 1) * rows
    return Ledger.of(
        forward=(mining_step + 1) * batch + after, backward=mining_step * batch + after
    )


def ham_train_at_m_ledger(batch: int, steps: int, mining_step: int, rows: Array) -> Ledger:
    """`easy_examples="train_at_m"`: the continuation runs on `rows` rows (padding included),
    the training pass on the whole batch."""
    rows = jnp.asarray(rows, jnp.float32)
    after = (steps - mining_step) * rows
    return Ledger.of(forward=(mining_step + 2) * batch + after,
                     backward=(mining_step + 1) * batch + after)


# ---------------------------------------------------------------------------------------------
# The step


def _continue(ctx, s: HamSettings, params, batch_stats, x, y, x_start, kappa_start, valid, key):
    """Steps M+1..K from x_start on the valid rows: (x_adv, kappa)."""
    logits_fn = masked_logits_fn(ctx, params, batch_stats, s.bn_mode, valid)
    x_adv, info = pgd(
        logits_fn, x, y, key, eps=s.eps, step_size=s.step_size,
        steps=s.steps - s.mining_step, x_init=x_start, step_mask=valid, final_eval=False,
    )
    return x_adv, kappa_start + jnp.where(valid, info.kappa, 0)  # rows that continued


def _finish(ctx, s: HamSettings, params, batch_stats, x, y, x_start, kappa_start, valid, key):
    """Steps M+1..K from x_start on the valid rows, then the weighted training loss and grads."""
    x_adv, kappa = _continue(ctx, s, params, batch_stats, x, y, x_start, kappa_start, valid, key)
    weights = loss_weights(kappa, valid, s)
    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    (loss, (stats, logits)), grads = grad_fn(params, ctx, batch_stats, x_adv, y, weights, valid)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) & valid).astype(jnp.float32)
    return x_adv, kappa, weights, loss, grads, stats, correct


def _bucket_branch(ctx, s: HamSettings, size: int):
    """Continuation + training on the selected rows, each device packing its own into `size`
    local slots (the bucket is `size` x devices rows, sharded like the batch)."""

    def pack(selected, x, y, x_mid, kappa_mid):
        index, valid = gather_rows(selected, size)
        return index, valid, x[index], y[index], x_mid[index], kappa_mid[index]

    def unpack(index, valid, x_mid, x_b, kappa_mid, k_b, w_b):
        weights = scatter_rows(jnp.zeros(x_mid.shape[0], jnp.float32), index, valid, w_b)
        return (scatter_rows(x_mid, index, valid, x_b), scatter_rows(kappa_mid, index, valid, k_b),
                weights)

    def run(params, batch_stats, x, y, x_mid, kappa_mid, selected, key):
        index, valid, x_p, y_p, x_mid_p, kappa_p = per_device(ctx.mesh, pack)(
            selected, x, y, x_mid, kappa_mid)
        x_b, k_b, w_b, loss, grads, stats, correct = _finish(
            ctx, s, params, batch_stats, x_p, y_p, x_mid_p, kappa_p, valid, key
        )
        x_adv, kappa, weights = per_device(ctx.mesh, unpack)(
            index, valid, x_mid, x_b, kappa_mid, k_b, w_b)
        return loss, grads, stats, x_adv, kappa, weights, correct

    return run


def _full_branch(ctx, s: HamSettings):
    """The batch-sized bucket needs no packing: the selection mask alone keeps the other rows
    still and out of the loss and BN statistics (same results, no gather/scatter copies)."""

    def run(params, batch_stats, x, y, x_mid, kappa_mid, selected, key):
        x_b, k_b, w_b, loss, grads, stats, correct = _finish(
            ctx, s, params, batch_stats, x, y, x_mid, kappa_mid, selected, key
        )
        return loss, grads, stats, x_b, k_b, w_b, correct

    return run


def _empty_branch(params, batch_stats, x, y, x_mid, kappa_mid, selected, key):
    """Nothing selected: no continuation, no training pass, zero loss and gradient."""
    del y, selected, key
    grads = jax.tree.map(jnp.zeros_like, params)
    weights = jnp.zeros(x.shape[0], jnp.float32)
    return jnp.float32(0.0), grads, batch_stats, x_mid, kappa_mid, weights, jnp.float32(0.0)


def _continuation_branch(ctx, s: HamSettings, size: int, local_batch: int):
    """`train_at_m`: steps M+1..K on the selected rows packed per device into `size` slots (the
    batch-sized bucket needs no packing); returns batch-sized (x_adv, kappa)."""

    def pack(selected, x, y, x_mid, kappa_mid):
        index, valid = gather_rows(selected, size)
        return index, valid, x[index], y[index], x_mid[index], kappa_mid[index]

    def unpack(index, valid, x_mid, x_b, kappa_mid, k_b):
        return (scatter_rows(x_mid, index, valid, x_b), scatter_rows(kappa_mid, index, valid, k_b))

    def run(params, batch_stats, x, y, x_mid, kappa_mid, selected, key):
        if size == local_batch:
            return _continue(ctx, s, params, batch_stats, x, y, x_mid, kappa_mid, selected, key)
        index, valid, x_p, y_p, x_mid_p, kappa_p = per_device(ctx.mesh, pack)(
            selected, x, y, x_mid, kappa_mid)
        x_b, k_b = _continue(ctx, s, params, batch_stats, x_p, y_p, x_mid_p, kappa_p, valid, key)
        return per_device(ctx.mesh, unpack)(index, valid, x_mid, x_b, kappa_mid, k_b)

    return run


def _train_at_m_phase(ctx, s, params, batch_stats, x, y, rng, x_mid, hard, selected,
                      kappa_mid) -> HamOutput:
    """The selected rows continue to step K, then every row trains: hard rows at x_K, the
    others at x_M (mean CE over the batch, BN statistics of the whole batch)."""
    batch = x.shape[0]
    operands = (params, batch_stats, x, y, x_mid, kappa_mid, selected, rng)
    if s.bucketed:
        devices = mesh_size(ctx.mesh)
        local_batch = batch // devices
        sizes = bucket_sizes(s.buckets, local_batch)
        branch = choose_branch(max_local_count(ctx.mesh, selected), sizes)

        def nothing(params, batch_stats, x, y, x_mid, kappa_mid, selected, key):
            return x_mid, kappa_mid

        branches = [nothing] + [_continuation_branch(ctx, s, size, local_batch)
                                for size in sizes]
        x_adv, kappa = jax.lax.switch(branch, branches, *operands)
        rows = devices * jnp.asarray((0,) + sizes, jnp.int32)[branch]
        bucket_index = jnp.asarray([-1, *range(len(sizes))], jnp.int32)[branch]
    else:
        x_adv, kappa = _continue(ctx, s, *operands)
        rows, bucket_index = jnp.int32(batch), jnp.int32(-1)
    ones = jnp.ones((batch,), jnp.float32)
    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    (loss, (stats, logits)), grads = grad_fn(params, ctx, batch_stats, x_adv, y, ones, None)
    return HamOutput(
        loss=loss, grads=grads, batch_stats=stats, x_adv=x_adv, hard=hard, selected=selected,
        weights=ones, kappa=kappa,
        correct=jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32), bucket_size=rows,
        bucket_index=bucket_index, warmup=jnp.asarray(False),
        ledger=ham_train_at_m_ledger(batch, s.steps, s.mining_step, rows),
    )


def _mine_and_select(ctx, s, params, batch_stats, x, y, rng, force_hard):
    """M steps on the whole batch and the rows that continue: (x_M, hard, selected, info)."""
    x_mid, mined, info = mine_hard(
        attack_logits_fn(ctx, params, batch_stats), x, y, rng, eps=s.eps,
        step_size=s.step_size, mining_step=s.mining_step,
        random_start=bool(ctx.config.attack.random_start),
    )
    if force_hard is None:
        hard = mined
    elif force_hard.dtype == jnp.bool_:
        hard = force_hard
    elif jnp.issubdtype(force_hard.dtype, jnp.signedinteger):  # -1: as mined (FORCE_HARD_KEY)
        hard = jnp.where(force_hard < 0, mined, force_hard > 0)
    else:
        raise ValueError(f"batch[{FORCE_HARD_KEY!r}] has dtype {force_hard.dtype}: it takes bool, "
                         "or a signed integer with 1 hard, 0 easy, -1 as mined "
                         "(forced_hard_rows)")
    selected = select_rows(
        hard, info.loss, jax.random.fold_in(rng, 1),
        keep_easy_fraction=s.keep_easy_fraction, hard_keep_fraction=s.hard_keep_fraction,
    )
    return x_mid, hard, selected, info


def _ham_phase(ctx, s, params, batch_stats, x, y, rng, force_hard) -> HamOutput:
    """M steps on the batch, mining, then the rest on the selected rows only."""
    batch = x.shape[0]
    x_mid, hard, selected, info = _mine_and_select(ctx, s, params, batch_stats, x, y, rng,
                                                   force_hard)
    if s.easy_examples == "train_at_m":
        return _train_at_m_phase(ctx, s, params, batch_stats, x, y, rng, x_mid, hard, selected,
                                 info.kappa)
    operands = (params, batch_stats, x, y, x_mid, info.kappa, selected, rng)
    n = jnp.sum(selected)
    if s.bucketed:
        devices = mesh_size(ctx.mesh)
        local_batch = batch // devices
        sizes = bucket_sizes(s.buckets, local_batch)  # per device
        branch = choose_branch(max_local_count(ctx.mesh, selected), sizes)
        branches = [_empty_branch] + [
            _full_branch(ctx, s) if size == local_batch else _bucket_branch(ctx, s, size)
            for size in sizes
        ]
        results = jax.lax.switch(branch, branches, *operands)
        rows = devices * jnp.asarray((0,) + sizes, jnp.int32)[branch]
        bucket_index = jnp.asarray([-1, *range(len(sizes))], jnp.int32)[branch]
    else:
        x_adv, kappa, weights, loss, grads, stats, correct = _finish(
            ctx, s, params, batch_stats, x, y, x_mid, info.kappa, selected, rng
        )
        # An empty set still ran (all-True BN mask, zero weights): keep the statistics as the
        # bucketed path does.
        stats = jax.tree.map(lambda new, old: jnp.where(n > 0, new, old), stats, batch_stats)
        results = (loss, grads, stats, x_adv, kappa, weights, correct)
        rows = jnp.int32(batch)
        bucket_index = jnp.int32(-1)
    loss, grads, stats, x_adv, kappa, weights, correct = results
    return HamOutput(
        loss=loss, grads=grads, batch_stats=stats, x_adv=x_adv, hard=hard, selected=selected,
        weights=weights, kappa=kappa, correct=correct, bucket_size=rows,
        bucket_index=bucket_index, warmup=jnp.asarray(False),
        ledger=ham_ledger(batch, s.steps, s.mining_step, rows),
    )


def _warmup_phase(ctx, s, params, batch_stats, x, y, rng) -> HamOutput:
    """Plain PGD-AT (same attack key and loss as `pgd_at`)."""
    batch = x.shape[0]
    x_adv, info = train_attack(ctx, params, batch_stats, x, y, rng)
    ones = jnp.ones((batch,), jnp.float32)
    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    (loss, (stats, logits)), grads = grad_fn(params, ctx, batch_stats, x_adv, y, ones, None)
    every = jnp.ones((batch,), bool)
    passes = (s.steps + 1) * batch
    return HamOutput(
        loss=loss, grads=grads, batch_stats=stats, x_adv=x_adv, hard=jnp.zeros((batch,), bool),
        selected=every, weights=ones, kappa=info.kappa,
        correct=jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
        bucket_size=jnp.int32(batch), bucket_index=jnp.int32(-1), warmup=jnp.asarray(True),
        ledger=Ledger.of(forward=passes, backward=passes),
    )


def ham_terms(
    ctx,
    settings: HamSettings,
    params: Params,
    batch_stats,
    x: Array,
    y: Array,
    rng: Array,
    epoch: Array,
    force_hard: Array | None = None,
) -> HamOutput:
    """One HAM step's loss, gradient (w.r.t. params) and bookkeeping; jittable, one compile.

    The attack's random start uses `rng` itself, as `pgd_at` does, so warm-up steps reproduce
    PGD-AT exactly; the easy-row choice uses fold_in(rng, 1).
    """
    params = jax.lax.stop_gradient(params)

    def ham():
        return _ham_phase(ctx, settings, params, batch_stats, x, y, rng, force_hard)

    if settings.warmup_epochs <= 0:
        return ham()

    def warmup():
        return _warmup_phase(ctx, settings, params, batch_stats, x, y, rng)

    return jax.lax.cond(epoch < settings.warmup_epochs, warmup, ham)


# ---------------------------------------------------------------------------------------------
# Cross-batch variant (`method.cross_batch_rows` > 0, opt-in)

# Per-step counters of a flush, summed over the epoch in the method state.
FLUSH_COUNTERS = ("flushes", "trained_rows", "padded_rows", "dropped_rows", "staleness_sum",
                  "staleness_max", "stale_rows", "updates_behind_max", "correct")
_MAX_COUNTERS = ("staleness_max", "updates_behind_max")


@flax.struct.dataclass
class CrossBatchOutput:
    """One cross-batch HAM step. out: the step as HamOutput (x_adv: the batch at x_M; weights 0:
    the batch's own rows are trained later, from the buffer). buffer: the method state's buffer
    after the step. flushed: this step trained. counters: FLUSH_COUNTERS of this step.
    trained: the flushed rows (clean, x_adv after K steps, label, index, mined_step, valid,
    weights; zeros when nothing flushed), n * R/n rows."""

    out: HamOutput
    buffer: dict
    flushed: Array
    counters: dict
    trained: dict


def _no_flush_record(rows: int, image_shape: tuple[int, ...]) -> tuple[dict, dict]:
    """(counters, trained) of a step that did not flush: zeros of the flush's shapes."""
    images = jnp.zeros((rows, *image_shape), jnp.float32)
    ints = jnp.zeros((rows,), jnp.int32)
    trained = {"clean": images, "x_adv": jnp.copy(images), "label": ints, "index": ints,
               "mined_step": ints, "valid": jnp.zeros((rows,), bool),
               "weights": jnp.zeros((rows,), jnp.float32)}
    return {k: jnp.float32(0.0) for k in FLUSH_COUNTERS}, trained


def _flush(ctx, s: HamSettings, rows: int, step: Array, params, batch_stats, buffer, key):
    """Steps M+1..K with the current weights on each device's oldest `rows` buffered rows, the
    training loss and gradient over them, and the buffer that keeps the overflow."""
    taken, valid = per_device(ctx.mesh, lambda b: take_rows(b, rows))(buffer)
    x_adv, _, weights, loss, grads, stats, correct = _finish(
        ctx, s, params, batch_stats, taken["clean"], taken["label"], taken["adv"],
        taken["kappa"], valid, key)
    kept, dropped = per_device(ctx.mesh, lambda b: keep_overflow(b, rows))(buffer)
    age = jnp.where(valid, step - taken["mined_step"], 0).astype(jnp.float32)
    behind = jnp.where(valid, taken["updates_behind"], 0).astype(jnp.float32)
    trained_rows = jnp.sum(valid).astype(jnp.float32)
    counters = {"flushes": jnp.float32(1.0), "trained_rows": trained_rows,
                "padded_rows": valid.shape[0] - trained_rows,
                "dropped_rows": jnp.sum(dropped).astype(jnp.float32),
                "staleness_sum": jnp.sum(age), "staleness_max": jnp.max(age),
                "stale_rows": jnp.sum(behind > 0).astype(jnp.float32),
                "updates_behind_max": jnp.max(behind), "correct": correct}
    trained = {"clean": taken["clean"], "x_adv": x_adv, "label": taken["label"],
               "index": taken["index"], "mined_step": taken["mined_step"], "valid": valid,
               "weights": weights}
    return loss, grads, stats, kept, counters, trained


def _cross_batch_phase(ctx, s, params, batch_stats, x, y, index, rng, step, buffer,
                       force_hard) -> CrossBatchOutput:
    """M steps on the batch and mining as the faithful step; the selected rows join the buffer
    with their x_M; a full buffer (on any device) continues and trains (see ham_buffer)."""
    batch = x.shape[0]
    x_mid, hard, selected, info = _mine_and_select(ctx, s, params, batch_stats, x, y, rng,
                                                   force_hard)
    devices = mesh_size(ctx.mesh)
    rows = s.cross_batch_rows // devices
    new = {"clean": x, "adv": x_mid, "label": y, "kappa": info.kappa, "index": index,
           "mined_step": jnp.full((batch,), step, jnp.int32)}
    buffer = per_device(ctx.mesh, append_rows)(buffer, selected, new)
    flushed = max_local_count(ctx.mesh, buffer["count"]) >= rows

    def flush(params, batch_stats, buffer):
        return _flush(ctx, s, rows, step, params, batch_stats, buffer, rng)

    def wait(params, batch_stats, buffer):
        counters, trained = _no_flush_record(devices * rows, x.shape[1:])
        return (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, params), batch_stats, buffer,
                counters, trained)

    loss, grads, stats, buffer, counters, trained = jax.lax.cond(
        flushed, flush, wait, params, batch_stats, buffer)
    executed = jnp.where(flushed, devices * rows, 0).astype(jnp.int32)
    out = HamOutput(
        loss=loss, grads=grads, batch_stats=stats, x_adv=x_mid, hard=hard, selected=selected,
        weights=jnp.zeros((batch,), jnp.float32), kappa=info.kappa, correct=counters["correct"],
        bucket_size=executed, bucket_index=jnp.int32(-1), warmup=jnp.asarray(False),
        ledger=ham_ledger(batch, s.steps, s.mining_step, executed),
    )
    return CrossBatchOutput(out=out, buffer=buffer, flushed=flushed, counters=counters,
                            trained=trained)


def cross_batch_terms(ctx, settings: HamSettings, params: Params, batch_stats, x: Array,
                      y: Array, index: Array, rng: Array, epoch: Array, step: Array,
                      buffer: dict, force_hard: Array | None = None) -> CrossBatchOutput:
    """One cross-batch HAM step (`method.cross_batch_rows` > 0); jittable, one compile. The
    warm-up is PGD-AT as in `ham_terms` and leaves the buffer alone."""
    params = jax.lax.stop_gradient(params)

    def ham():
        return _cross_batch_phase(ctx, settings, params, batch_stats, x, y, index, rng, step,
                                  buffer, force_hard)

    if settings.warmup_epochs <= 0:
        return ham()

    def warmup():
        out = _warmup_phase(ctx, settings, params, batch_stats, x, y, rng)
        counters, trained = _no_flush_record(settings.cross_batch_rows, x.shape[1:])
        return CrossBatchOutput(out=out, buffer=buffer, flushed=jnp.asarray(False),
                                counters=counters, trained=trained)

    return jax.lax.cond(epoch < settings.warmup_epochs, warmup, ham)


def _mining_metrics(out, n: Array, batch_size: int) -> dict:
    """The per-step mining record both HAM steps log: phase, hard and trained shares, bucket."""
    return {
        "warmup": out.warmup,
        "hard_fraction": jnp.sum(out.hard) / batch_size,
        "train_fraction": n / batch_size,
        "bucket_size": out.bucket_size,
        "bucket_fraction": out.bucket_size / batch_size,
        "bucket_index": out.bucket_index,
    }


def cross_batch_loss(params, state, batch, rng, ctx, settings: HamSettings):
    """ham_loss for `cross_batch_rows` > 0: an optimiser step only in warm-up or on a flush."""
    x, y = batch["image"], batch["label"]
    index = batch.get("index", jnp.full(y.shape, -1, jnp.int32))
    epoch = state.step // ctx.steps_per_epoch
    method_state = state.method_state
    result = cross_batch_terms(ctx, settings, params, state.batch_stats, x, y, index, rng,
                               epoch, state.step, method_state["buffer"],
                               batch.get(FORCE_HARD_KEY))
    out = result.out
    loss = attach_gradient(params, out.loss, out.grads)
    batch_size = x.shape[0]
    n = jnp.sum(out.selected)
    trained = jnp.where(out.warmup, batch_size, result.counters["trained_rows"])
    metrics = {
        **_mining_metrics(out, n, batch_size),
        "empty_batch": (~out.warmup) & (n == 0),
        "cross_batch_flush": result.flushed,
        "cross_batch_buffered": jnp.sum(result.buffer["count"]) / settings.cross_batch_rows,
        "train_robust_acc": out.correct / jnp.maximum(trained, 1),
    }
    aux = step_aux(out.batch_stats, out.ledger, apply_update=out.warmup | result.flushed,
                   **metrics)
    counts = count_hard_per_class(method_state, out.hard, y, out.warmup, ctx.num_classes)
    aux["method_state"] = {**counts, "buffer": result.buffer,
                           "cross_batch": add_counters(method_state["cross_batch"],
                                                       result.counters)}
    return loss, aux


def add_counters(total: dict, step: dict) -> dict:
    """The epoch's flush counters with one step's added (the *_max ones: the maximum)."""
    return {k: jnp.maximum(total[k], step[k]) if k in _MAX_COUNTERS else total[k] + step[k]
            for k in FLUSH_COUNTERS}


def ham_loss(params, state, batch, rng, ctx):
    """The Method loss_fn: HAM's loss with its in-branch gradient attached (see module doc)."""
    settings = HamSettings.from_config(ctx.config)
    if settings.cross_batch_rows:
        return cross_batch_loss(params, state, batch, rng, ctx, settings)
    x, y = batch["image"], batch["label"]
    epoch = state.step // ctx.steps_per_epoch
    out = ham_terms(
        ctx, settings, params, state.batch_stats, x, y, rng, epoch, batch.get(FORCE_HARD_KEY)
    )
    loss = attach_gradient(params, out.loss, out.grads)
    batch_size = x.shape[0]
    local_batch = batch_size // mesh_size(ctx.mesh)
    n = jnp.sum(out.selected)
    # train_at_m always trains (every row, easy ones at x_M): an empty hard set is no skip.
    empty = (~out.warmup) & (n == 0) & (settings.easy_examples == "drop")
    metrics = {
        **_mining_metrics(out, n, batch_size),
        **bucket_shares(out.bucket_index, bucket_sizes(settings.buckets, local_batch),
                         local_batch),
        "empty_batch": empty,
        "train_robust_acc": out.correct / jnp.maximum(
            n if settings.easy_examples == "drop" else batch_size, 1),
    }
    aux = step_aux(out.batch_stats, out.ledger, apply_update=~empty, **metrics)
    aux["method_state"] = count_hard_per_class(state.method_state, out.hard, y, out.warmup,
                                               ctx.num_classes)
    return loss, aux


# ---------------------------------------------------------------------------------------------
# Per-class record: the epoch's hard fraction of each class (HAM steps only)


def init_hard_counts(ctx, rng) -> dict:
    """Per-class counts of mined-hard and mined rows over the current epoch's HAM steps; with
    `cross_batch_rows` > 0 also the empty buffer and the epoch's flush counters."""
    del rng
    zeros = jnp.zeros((ctx.num_classes,), jnp.float32)
    state = {"hard": zeros, "mined": jnp.copy(zeros)}
    rows = HamSettings.from_config(ctx.config).cross_batch_rows
    if rows:
        devices = mesh_size(ctx.mesh)
        batch = int(ctx.config.train.batch_size)
        require(rows % devices == 0 and batch % devices == 0, "method.cross_batch_rows", rows,
                f"must be divisible by the {devices} devices of the mesh (each device keeps "
                f"cross_batch_rows / {devices} rows of its own)")
        state["buffer"] = init_buffer(rows // devices, batch // devices, devices,
                                      tuple(ctx.image_shape))
        state["cross_batch"] = {k: jnp.float32(0.0) for k in FLUSH_COUNTERS}
    return state


def count_hard_per_class(counts: dict, hard: Array, labels: Array, warmup: Array,
                         num_classes: int) -> dict:
    """Adds a step's hard and mined rows per class (nothing during the PGD-AT warm-up)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    on = jnp.where(warmup, 0.0, 1.0)
    return {"hard": counts["hard"] + on * (hard.astype(jnp.float32) @ onehot),
            "mined": counts["mined"] + on * jnp.sum(onehot, axis=0)}


def summarize_hard_counts(counts: dict) -> dict:
    """The epoch's hard fraction per class (None for a class never mined, e.g. in warm-up)."""
    hard, mined = (np.asarray(counts[k], np.float64) for k in ("hard", "mined"))
    summary = {"hard_fraction_per_class": [None if m == 0 else float(h / m)
                                           for h, m in zip(hard, mined, strict=True)]}
    if "cross_batch" in counts:
        summary["cross_batch"] = summarize_flushes(counts["cross_batch"], counts["buffer"])
    return summary


def summarize_flushes(counters: dict, buffer: dict) -> dict:
    """The epoch's cross-batch record: flushes, rows trained / padded / dropped, the staleness
    of the trained rows (steps between mining a row and training it; and the rows whose x_M was
    made with weights older than the current ones, by how many optimiser updates at most),
    their robust accuracy, and the rows left in the buffer."""
    c = {k: float(np.asarray(v)) for k, v in counters.items()}
    trained = c["trained_rows"]
    return {"flushes": int(c["flushes"]), "trained_rows": int(trained),
            "padded_rows": int(c["padded_rows"]), "dropped_rows": int(c["dropped_rows"]),
            "mean_staleness_steps": c["staleness_sum"] / trained if trained else None,
            "max_staleness_steps": int(c["staleness_max"]),
            "stale_weight_rows": int(c["stale_rows"]),
            "max_updates_behind": int(c["updates_behind_max"]),
            "train_robust_acc": c["correct"] / trained if trained else None,
            "buffered_rows": int(np.sum(np.asarray(buffer["count"])))}


def reset_hard_counts(state, ctx, evaluator):
    """Starts the next epoch's per-class (and flush) counts from zero (after they were logged);
    the cross-batch buffer carries over into the next epoch."""
    del ctx, evaluator
    zeros = {k: v if k == "buffer" else jax.tree.map(jnp.zeros_like, v)
             for k, v in state.method_state.items()}
    return state.replace(method_state=place_like(zeros, state.method_state))


# ---------------------------------------------------------------------------------------------
# Config validation


def _fail(field: str, value: Any, fix: str) -> None:
    require(False, f"method.{field}", value, fix)


def validate(config) -> None:
    """Rejects a bad HAM field before anything compiles, naming it and the fix."""
    method = config.method
    get = lambda name: DEFAULTS[name] if method.get(name, None) is None else method.get(name)
    steps = int(config.attack.steps)
    m = get("mining_step")
    if not is_int(m) or not 1 <= m < steps:
        _fail("mining_step", m, f"needs an int with 1 <= M < attack.steps={steps}")
    w = get("warmup_epochs")
    if not is_int(w) or w < 0:
        _fail("warmup_epochs", w, "needs an int >= 0 (epochs of PGD-AT before HAM)")
    buckets = get("buckets")
    if isinstance(buckets, (str, bytes)) or not hasattr(buckets, "__len__") or not buckets:
        _fail("buckets", buckets, "needs a non-empty tuple of fractions, e.g. (0.25, 0.5, 1.0)")
    if not all(is_number(b) and 0.0 < b <= 1.0 for b in buckets):
        _fail("buckets", buckets, "every bucket is a fraction of the batch in (0, 1]")
    if any(a >= b for a, b in zip(buckets[:-1], buckets[1:], strict=True)):
        _fail("buckets", buckets, "must be strictly increasing")
    if buckets[-1] != 1.0:
        _fail("buckets", buckets, "the last bucket must be 1.0 (all rows hard)")
    for flag in ("bucketed", "gair"):
        if not isinstance(get(flag), bool):
            _fail(flag, get(flag), "needs True or False")
    if not is_number(get("gair_lambda")):
        _fail("gair_lambda", get("gair_lambda"), "needs a number (GAIRAT default -1.0)")
    easy = get("keep_easy_fraction")
    if not is_number(easy) or not 0.0 <= easy <= 1.0:
        _fail("keep_easy_fraction", easy, "needs a fraction in [0, 1] (0: drop every easy AE)")
    hard = get("hard_keep_fraction")
    if not is_number(hard) or not 0.0 < hard <= 1.0:
        _fail("hard_keep_fraction", hard, "needs a fraction in (0, 1] (1: keep every hard AE)")
    easy_examples = get("easy_examples")
    if easy_examples not in EASY_EXAMPLES:
        _fail("easy_examples", easy_examples, f"choose one of {EASY_EXAMPLES} ('drop': the "
              "official rule)")
    rows = get("cross_batch_rows")
    if not is_int(rows) or rows < 0:
        _fail("cross_batch_rows", rows, "needs an int >= 0 (0: the faithful step; R > 0: train "
              "once R selected rows have gathered across batches, e.g. train.batch_size)")
    if rows and easy_examples != "drop":
        _fail("cross_batch_rows", rows, "needs easy_examples='drop' (train_at_m trains every "
              "row every step; set cross_batch_rows=0)")
    if rows and not get("bucketed"):
        _fail("cross_batch_rows", rows, "needs bucketed=True (the masked reference path is the "
              "faithful step's; set cross_batch_rows=0 to use it)")
    if easy_examples == "train_at_m" and get("gair"):
        _fail("gair", True, "GAIRAT weights need easy_examples='drop' (train_at_m trains every "
              "row with weight 1)")


register(
    Method(
        "ham",
        ham_loss,
        init_state=init_hard_counts,
        epoch_end=reset_hard_counts,
        summarize_state=summarize_hard_counts,
        validate=validate,
        defaults=dict(DEFAULTS),
        description="Hard Adversarial example Mining (Lin et al. 2023), bucketed under jit",
        starts_at={"warmup_epochs": "HAM's mining starts"},
    )
)
