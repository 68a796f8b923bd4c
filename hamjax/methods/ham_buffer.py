"""The bookkeeping of HAM's cross-batch buffer (`method.cross_batch_rows`), one device's part.

At a small per-device batch the faithful step's buckets hold a handful of rows and leave an
accelerator idle. With `cross_batch_rows = R` the rows selected after step M gather, with their
step-M adversaries (already computed), in a buffer of fixed shape; once R rows have gathered
they continue and are trained on together (see `hamjax.methods.ham`). These functions are the
pure, static-shape bookkeeping of one device's buffer, each called per device under
`hamjax.sharding.per_device`; the global buffer is the devices' buffers stacked on the leading
axis (`count` holds one entry per device).

A device's buffer holds `rows + local_batch` slots: rows are appended in batch order after the
ones already there, so with fewer than `rows` rows held before a step every selected row of the
step fits. A flush trains the oldest `rows` slots; the rest (the overflow) moves to the front
for the next step, at most `rows - 1` of it, so the next step fits again. Any beyond that is
dropped and counted, which can only happen when `rows` is smaller than the local batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Per-row fields: the (augmented) clean image, its step-M adversary, label, the attack's kappa
# at step M, the example's index in its split, the step that mined it, and how many optimiser
# updates (flushes) happened since then (its x_M was made with weights that many updates old).
ROW_FIELDS = ("clean", "adv", "label", "kappa", "index", "mined_step", "updates_behind")


def init_buffer(rows: int, local_batch: int, devices: int, image_shape: tuple[int, ...]) -> dict:
    """An empty buffer for `devices` devices of `rows + local_batch` slots each."""
    slots = devices * (rows + local_batch)
    images = jnp.zeros((slots, *image_shape), jnp.float32)
    ints = jnp.zeros((slots,), jnp.int32)
    return {"clean": images, "adv": jnp.copy(images), "label": ints, "kappa": jnp.copy(ints),
            "index": jnp.copy(ints), "mined_step": jnp.copy(ints),
            "updates_behind": jnp.copy(ints), "count": jnp.zeros((devices,), jnp.int32)}


def append_rows(buffer: dict, selected: Array, new: dict) -> dict:
    """The selected rows of `new` (per-row arrays over the local batch, the ROW_FIELDS but
    updates_behind, which starts at 0) written in batch order after the rows already held;
    `count` grows by their number."""
    new = {**new, "updates_behind": jnp.zeros_like(new["label"])}
    count = buffer["count"][0]
    slots = buffer["label"].shape[0]
    slot = count + jnp.cumsum(selected.astype(jnp.int32)) - 1
    target = jnp.where(selected, slot, slots)  # unselected rows go nowhere
    out = {k: buffer[k].at[target].set(new[k].astype(buffer[k].dtype), mode="drop")
           for k in ROW_FIELDS}
    out["count"] = buffer["count"] + jnp.sum(selected, dtype=jnp.int32)
    return out


def take_rows(buffer: dict, rows: int) -> tuple[dict, Array]:
    """The oldest `rows` slots (what a flush trains on) and which of them hold a row."""
    taken = {k: buffer[k][:rows] for k in ROW_FIELDS}
    valid = jnp.arange(rows) < buffer["count"][0]
    return taken, valid


def keep_overflow(buffer: dict, rows: int) -> tuple[dict, Array]:
    """After a flush of the oldest `rows` slots: the rest moved to the front (at most
    `rows - 1` of it, oldest first; the flush's update makes each one update older), empty
    slots zeroed; and the number of rows dropped, [1]."""
    count = buffer["count"][0]
    overflow = jnp.maximum(count - rows, 0)
    kept = jnp.minimum(overflow, rows - 1)
    slots = buffer["label"].shape[0]
    live = jnp.arange(slots) < kept
    out = {}
    for k in ROW_FIELDS:
        shifted = jnp.concatenate([buffer[k][rows:], jnp.zeros_like(buffer[k][:rows])])
        mask = live.reshape((slots,) + (1,) * (shifted.ndim - 1))
        out[k] = jnp.where(mask, shifted, jnp.zeros_like(shifted))
    out["updates_behind"] = jnp.where(live, out["updates_behind"] + 1, 0)
    out["count"] = kept.reshape(1)
    return out, (overflow - kept).reshape(1)
