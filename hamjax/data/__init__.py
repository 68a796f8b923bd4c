"""hamjax.data: datasets by name, held-out splits, noise/long-tail transforms, batches, augment.

Arrays at the edge are numpy uint8 NHWC images and int32 labels; batches are dicts of uint8
images scaled to [0, 1] on the device; augmentation is a jittable function. See docs/DESIGN.md.
"""

from hamjax.data.augment import augment, images_to_float
from hamjax.data.batching import (
    epoch_batch_indices,
    eval_batches,
    iterate_batches,
    meta_batch,
    num_batches,
    padded_chunks,
)
from hamjax.data.config import NOISE_KINDS, SOURCES, default_data_config, validate_data_config
from hamjax.data.sources import (
    DatasetFormatError,
    DatasetNotFoundError,
    RawDataset,
    load_raw,
    search_dirs,
)
from hamjax.data.specs import DATASET_STATS, DATASETS, DatasetSpec, dataset_names
from hamjax.data.splits import (
    ArraySplit,
    Splits,
    apply_label_noise,
    load_splits,
    make_splits,
    stratified_subset,
    transition_matrix,
)

__all__ = [
    "DATASETS",
    "DATASET_STATS",
    "NOISE_KINDS",
    "SOURCES",
    "ArraySplit",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "RawDataset",
    "Splits",
    "apply_label_noise",
    "augment",
    "dataset_names",
    "default_data_config",
    "epoch_batch_indices",
    "images_to_float",
    "eval_batches",
    "iterate_batches",
    "load_raw",
    "load_splits",
    "make_splits",
    "meta_batch",
    "num_batches",
    "padded_chunks",
    "search_dirs",
    "stratified_subset",
    "transition_matrix",
    "validate_data_config",
]
