"""Held-out splits and the training-set transforms (meta set, long tail, label noise).

Order matters and is fixed (CAAT's protocol): from the official training set take a clean,
stratified validation split, then a clean class-balanced meta set, then make the remaining pool
long-tailed, then corrupt its labels. Validation, meta and test splits are never noised or
imbalanced, so model selection and CAAT's meta step always see clean, representative labels.
Each step draws from its own seeded stream, so e.g. turning on label noise leaves the
validation split and the long-tail subset unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from hamjax.data.config import validate_data_config
from hamjax.data.sampling import balanced_sample, long_tail_sample, stratified_sample
from hamjax.data.sources import RawDataset, check_labels, load_raw
from hamjax.errors import ConfigError

# Independent random streams: np.random.default_rng([seed, STREAM]).
_VAL_STREAM, _META_STREAM, _LONG_TAIL_STREAM, _NOISE_STREAM = 1, 2, 3, 4
_TRAIN_SUBSET_STREAM = 5


@dataclasses.dataclass
class ArraySplit:
    """One split as host arrays: uint8 NHWC images, int32 (possibly noisy) labels.

    clean_labels are the labels before label noise (equal to labels outside the training split);
    source_index is each example's index in the source's official split (default: 0..N-1), which
    shows that train, val and meta never share an example.
    """

    images: np.ndarray
    labels: np.ndarray
    clean_labels: np.ndarray
    source_index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TypeError(
                f"ArraySplit images must be uint8 [N, H, W, C], got {self.images.dtype} "
                f"{self.images.shape}"
            )
        n = self.images.shape[0]
        self.labels = np.asarray(self.labels).astype(np.int32, copy=False)
        self.clean_labels = np.asarray(self.clean_labels).astype(np.int32, copy=False)
        if self.source_index is None:
            self.source_index = np.arange(n, dtype=np.int64)
        self.source_index = np.asarray(self.source_index, dtype=np.int64)
        for field in ("labels", "clean_labels", "source_index"):
            if getattr(self, field).shape != (n,):
                raise ValueError(f"ArraySplit.{field} has shape {getattr(self, field).shape}, "
                                 f"want ({n},)")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: np.ndarray) -> ArraySplit:
        """The examples at positions idx (a copy)."""
        assert self.source_index is not None
        return ArraySplit(self.images[idx], self.labels[idx], self.clean_labels[idx],
                          self.source_index[idx])

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Examples per (possibly noisy) label, int64 [num_classes]."""
        return np.bincount(self.labels, minlength=num_classes)

    @property
    def noise_rate(self) -> float:
        """Fraction of examples whose label differs from the clean label."""
        return float(np.mean(self.labels != self.clean_labels)) if len(self) else 0.0


@dataclasses.dataclass
class Splits:
    """Everything a run trains and evaluates on; `info` is a JSON-ready record of its making."""

    train: ArraySplit
    val: ArraySplit | None  # None when data.val_size == 0
    test: ArraySplit
    meta: ArraySplit | None  # None when data.meta_per_class == 0
    num_classes: int
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def transition_matrix(
    kind: str, rate: float, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Label-corruption matrix T (row c: distribution of the noisy label of clean class c).

    none: I.  uniform: (1-r) I + r/C 11^T.  flip (alias flip1): r to one random other class t_c,
    fixed per class.  pair_flip: r to (c+1) mod C.  flip2: r/2 to each of two random other
    classes.
    """
    c_ = num_classes
    eye = np.eye(c_)
    if kind == "none" or rate == 0.0:
        return eye
    if kind == "uniform":
        return (1.0 - rate) * eye + rate / c_ * np.ones((c_, c_))
    t = (1.0 - rate) * eye
    for c in range(c_):
        others = np.delete(np.arange(c_), c)
        if kind in ("flip", "flip1"):
            t[c, rng.choice(others)] += rate
        elif kind == "pair_flip":
            t[c, (c + 1) % c_] += rate
        elif kind == "flip2":
            for target in rng.choice(others, size=2, replace=False):
                t[c, target] += rate / 2.0
        else:
            raise ConfigError(f"data.label_noise.kind={kind!r} is not a known noise kind")
    return t


def apply_label_noise(
    labels: np.ndarray, matrix: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw each noisy label from row labels[i] of the corruption matrix (inverse CDF)."""
    if len(labels) == 0 or np.array_equal(matrix, np.eye(len(matrix))):
        return labels.astype(np.int32, copy=True)
    cdf = np.cumsum(matrix, axis=1)
    cdf[:, -1] = 1.0  # guard against rounding
    u = rng.random(len(labels))
    return np.argmax(u[:, None] < cdf[labels], axis=1).astype(np.int32)


def stratified_subset(split: ArraySplit, size: int, seed: int, num_classes: int) -> ArraySplit:
    """A seeded, class-stratified subset (e.g. eval.num_examples of the test set); a size of 0,
    or of the split or more, is all of it (`eval.num_examples = 0`)."""
    if not size or size >= len(split):
        return split
    idx = stratified_sample(split.clean_labels, size, np.random.default_rng([seed, 5]),
                            num_classes)
    return split.take(idx)


def make_splits(raw: RawDataset, data_config: ml_collections.ConfigDict, seed: int) -> Splits:
    """Apply the held-out splits and training transforms of `data_config` to a raw dataset."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an int >= 0")
    seed = int(seed)
    num_classes = raw.num_classes
    for split in ("train", "test"):  # again: the arrays may have changed since RawDataset()
        check_labels(getattr(raw, f"{split}_labels"), num_classes, f"{raw.origin}: {split}")
    full = ArraySplit(raw.train_images, raw.train_labels, raw.train_labels)
    n = len(full)
    pool = np.arange(n, dtype=np.int64)

    val = None
    if data_config.val_size > 0:
        if data_config.val_size >= n:
            raise ConfigError(
                f"data.val_size={data_config.val_size} leaves no training data ({n} training "
                f"examples); lower data.val_size"
            )
        pos = stratified_sample(full.labels, data_config.val_size,
                                np.random.default_rng([seed, _VAL_STREAM]), num_classes)
        val = full.take(pos)
        pool = np.setdiff1d(pool, pos)

    meta = None
    if data_config.meta_per_class > 0:
        pos = balanced_sample(full.labels[pool], data_config.meta_per_class,
                              np.random.default_rng([seed, _META_STREAM]), num_classes)
        meta = full.take(pool[pos])
        pool = np.delete(pool, pos)

    if data_config.train_size > 0:
        if data_config.train_size > len(pool):
            raise ConfigError(f"data.train_size={data_config.train_size} exceeds the "
                              f"{len(pool)} training examples left; lower it (0: all)")
        pos = stratified_sample(full.labels[pool], data_config.train_size,
                                np.random.default_rng([seed, _TRAIN_SUBSET_STREAM]), num_classes)
        pool = np.sort(pool[pos])

    pos, class_order = long_tail_sample(
        full.labels[pool], float(data_config.imbalance_factor),
        np.random.default_rng([seed, _LONG_TAIL_STREAM]), num_classes)
    pool = pool[pos]
    if len(pool) == 0:
        raise ConfigError("no training examples left after the val/meta splits; lower "
                          "data.val_size or data.meta_per_class")

    noise_rng = np.random.default_rng([seed, _NOISE_STREAM])
    matrix = transition_matrix(data_config.label_noise.kind, float(data_config.label_noise.rate),
                               num_classes, noise_rng)
    train = full.take(pool)
    train.labels = apply_label_noise(train.clean_labels, matrix, noise_rng)

    test = ArraySplit(raw.test_images, raw.test_labels, raw.test_labels)
    h, w, c = (int(d) for d in train.images.shape[1:])
    info = {
        "dataset": data_config.name,
        "origin": raw.origin,
        "seed": seed,
        "num_train": len(train),
        "num_val": len(val) if val is not None else 0,
        "num_meta": len(meta) if meta is not None else 0,
        "num_test": len(test),
        "image_shape": list(train.images.shape[1:]),
        "train_class_counts": np.bincount(train.clean_labels, minlength=num_classes).tolist(),
        "imbalance_factor": float(data_config.imbalance_factor),
        "long_tail_class_order": class_order.tolist(),
        "label_noise": {
            "kind": data_config.label_noise.kind,
            "rate": float(data_config.label_noise.rate),
            "actual_rate": train.noise_rate,
            "transition_matrix": np.round(matrix, 6).tolist(),
        },
    }
    return Splits(
        train=train, val=val, test=test, meta=meta, num_classes=num_classes,
        class_names=tuple(raw.class_names), image_shape=(h, w, c), info=info,
    )


def load_splits(data_config: ml_collections.ConfigDict, seed: int) -> Splits:
    """Validate `config.data`, load the dataset and build train/val/test/meta splits.

    Deterministic in (data_config, seed); raises ConfigError for a bad config and
    DatasetNotFoundError (listing where it looked) when the data is not there.
    """
    validate_data_config(data_config)
    raw = load_raw(data_config.name, data_config.source, data_config.data_dir,
                   data_config.image_size)
    return make_splits(raw, data_config, seed)
