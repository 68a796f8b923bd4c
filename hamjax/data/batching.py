"""Deterministic, resumable batch order and padded evaluation batches.

The order of epoch e is a pure function of (seed, e), so a run resumed at (epoch, step) replays
exactly the batches an uninterrupted run would have seen. Training batches drop the remainder
and eval batches pad with a mask, so every shape under jit is static.

Images leave the host as uint8 (a quarter of float32's transfer) and are scaled to [0, 1] on the
device (`hamjax.data.augment.images_to_float`). `rows` selects one process's share of each
global batch, so a host gathers only the rows it feeds (see `hamjax.sharding.process_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hamjax.data.splits import ArraySplit

_META_STREAM = 7  # meta batches: default_rng([seed, _META_STREAM, meta_epoch])


def num_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped: static shapes)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if n < batch_size:
        raise ValueError(
            f"batch_size={batch_size} is larger than the split ({n} examples), so an epoch has "
            "no full batch; lower the batch size (e.g. train.batch_size)"
        )
    return n // batch_size


def _permutation_batches(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    steps = num_batches(n, batch_size)
    perm = rng.permutation(n)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(np.int32)


def epoch_batch_indices(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """int32 [steps, batch_size]: positions of each batch of this epoch, a permutation seeded by
    np.random.default_rng([seed, epoch])."""
    return _permutation_batches(n, batch_size, np.random.default_rng([seed, epoch]))


def _to_batch(split: ArraySplit, idx: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "image": np.asarray(split.images[idx], np.uint8),
        "label": split.labels[idx].astype(np.int32),
        "index": idx.astype(np.int32),
    }


def iterate_batches(
    split: ArraySplit,
    batch_size: int,
    seed: int,
    epoch: int,
    start_step: int = 0,
    rows: slice = slice(None),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this epoch's training batches from start_step on: {"image": uint8 NHWC,
    "label": i32 (the possibly noisy label), "index": i32 position in the split}, each holding
    only `rows` of the global batch."""
    order = epoch_batch_indices(len(split), batch_size, seed, epoch)
    if not 0 <= start_step <= len(order):
        raise ValueError(f"start_step={start_step} outside [0, {len(order)}] for this epoch")
    for idx in order[start_step:]:
        yield _to_batch(split, idx[rows])


def padded_chunks(
    positions: np.ndarray, size: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (real, padded) pairs over `positions` in order: `size` positions at a time, the
    last chunk padded to `size` by wrapping its own positions (valid inputs, static shapes).

    The padding rule of `eval_batches`; `hamjax.evaluation.driver` pads its chunks the same
    way (wrapping their own positions) but to smaller sizes for a short tail.
    """
    if size < 1:
        raise ValueError(f"batch_size={size} must be >= 1")
    positions = np.asarray(positions)
    for start in range(0, len(positions), size):
        real = positions[start:start + size]
        yield real, np.resize(real, size)


def eval_batches(
    split: ArraySplit, batch_size: int, rows: slice = slice(None)
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the split in order, every example once; the last batch is padded to batch_size.

    Padding rows repeat real examples of the same batch (valid images, no degenerate inputs)
    and carry "mask" False, so metrics and batch statistics can exclude them. `rows`: this
    process's share of each (global) batch.
    """
    for real, idx in padded_chunks(np.arange(len(split), dtype=np.int32), batch_size):
        batch = _to_batch(split, idx[rows])
        batch["mask"] = (np.arange(batch_size) < len(real))[rows]
        yield batch


def meta_batch(
    meta: ArraySplit, batch_size: int, seed: int, step: int, rows: slice = slice(None)
) -> dict[str, np.ndarray]:
    """The clean meta batch for meta step `step` (CAAT): {"meta_image", "meta_label"}.

    A pure function of (seed, step): the meta set is walked epoch by epoch in a seeded order
    independent of the training order, so a resumed run draws the same meta batches. `rows`:
    this process's share of the batch.
    """
    steps = num_batches(len(meta), batch_size)
    epoch, row = divmod(step, steps)
    order = _permutation_batches(
        len(meta), batch_size, np.random.default_rng([seed, _META_STREAM, epoch])
    )
    batch = _to_batch(meta, order[row][rows])
    return {"meta_image": batch["image"], "meta_label": batch["label"]}
