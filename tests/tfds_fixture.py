"""A tiny CIFAR-10 in TFDS's array_record format, as `tfds build cifar10
--file_format=array_record` writes it, for the data-path tests (no TensorFlow needed to read it).

`python tests/tfds_fixture.py` (in an environment with tensorflow and tensorflow-datasets) runs
TFDS's own `cifar10` builder on a few images in CIFAR-10's binary format instead of the 160 MB
download and writes the result to tests/fixtures/tfds/. The images are a function of their
index (`fixture_images`), so a test can check every pixel hamjax reads back.
"""

from __future__ import annotations

import os
import sys
import tempfile
from unittest import mock

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_DIR = os.path.join(HERE, "fixtures", "tfds")
TRAIN_FILES = 5  # CIFAR-10's data_batch_1..5.bin
PER_TRAIN_FILE = 4
NUM_TEST = 10
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck")


def fixture_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (n, 32, 32, 3), int labels (n,)) of a split, in TFDS's example order."""
    n = TRAIN_FILES * PER_TRAIN_FILE if split == "train" else NUM_TEST
    offset = 0 if split == "train" else 1000
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    images = np.stack([
        np.stack([(rows * (3 + i % 5) + offset + 7 * i) % 256,
                  (cols * (2 + i % 3) + 11 * i) % 256,
                  ((rows + cols) * (1 + i % 4) + 13 * i) % 256], axis=-1)
        for i in range(offset, offset + n)]).astype(np.uint8)
    labels = (np.arange(n) * 3 + (0 if split == "train" else 1)) % 10
    return images, labels


def _write_cifar_binary(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """CIFAR-10's binary format: per image one label byte, then 1024 R, 1024 G, 1024 B bytes."""
    with open(path, "wb") as f:
        for image, label in zip(images, labels, strict=True):
            f.write(bytes([int(label)]))
            f.write(np.ascontiguousarray(image.transpose(2, 0, 1)).tobytes())


def _cifar_download(root: str) -> str:
    """The extracted cifar-10-binary.tar.gz, with the fixture's images."""
    batches = os.path.join(root, "cifar-10-batches-bin")
    os.makedirs(batches)
    images, labels = fixture_images("train")
    for k in range(TRAIN_FILES):
        part = slice(k * PER_TRAIN_FILE, (k + 1) * PER_TRAIN_FILE)
        _write_cifar_binary(os.path.join(batches, f"data_batch_{k + 1}.bin"), images[part],
                            labels[part])
    _write_cifar_binary(os.path.join(batches, "test_batch.bin"), *fixture_images("test"))
    with open(os.path.join(batches, "batches.meta.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    return root


def build(data_dir: str = FIXTURE_DIR) -> None:
    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory() as download:
        extracted = _cifar_download(download)
        builder = tfds.builder("cifar10", data_dir=data_dir, file_format="array_record")
        # The builder's one download, answered with the local files (tfds build would fetch them).
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                               lambda self, url: extracted):
            builder.download_and_prepare(download_dir=os.path.join(download, "downloads"))
    print(f"wrote {data_dir}/cifar10 with tfds {tfds.__version__}")


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else FIXTURE_DIR)
