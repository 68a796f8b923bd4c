"""TFDS in the array_record format, as the TPU guide prepares it: built once (`tfds build cifar10
--file_format=array_record`, here TFDS's own cifar10 builder on a few images:
tests/tfds_fixture.py), put in a bucket, and read either from a copy on the worker or from the
bucket itself (a local stand-in for gs://, tests/bucket_standin.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from bucket_standin import local_bucket
from tfds_fixture import FIXTURE_DIR, fixture_images

from hamjax.data import load_raw, load_splits
from hamjax.data.sources import TFDS_CACHE_ENV
from hamjax.paths import stage_tree

VERSION_DIR = os.path.join(FIXTURE_DIR, "cifar10", "3.0.2")


def _as_set(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """Examples as sortable (pixels, label) pairs: TFDS stores them in its own shuffled order."""
    return sorted((image.tobytes(), int(label)) for image, label in zip(images, labels,
                                                                        strict=True))


def _assert_is_the_fixture(raw) -> None:
    for split in ("train", "test"):
        images, labels = getattr(raw, f"{split}_images"), getattr(raw, f"{split}_labels")
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert _as_set(images, labels) == _as_set(*fixture_images(split))


def test_the_fixture_is_tfds_cifar10_in_array_record():
    info = json.loads(open(os.path.join(VERSION_DIR, "dataset_info.json")).read())
    assert (info["name"], info["version"], info["fileFormat"]) == ("cifar10", "3.0.2",
                                                                   "array_record")
    assert {s["name"]: s["shardLengths"] for s in info["splits"]} == {"train": ["20"],
                                                                      "test": ["10"]}


def test_a_local_copy_is_read_pixel_for_pixel(tmp_path):
    """The guide's first option: the prepared folder copied to each worker's disk."""
    shutil.copytree(os.path.join(FIXTURE_DIR, "cifar10"), tmp_path / "tfds" / "cifar10")
    raw = load_raw("cifar10", "tfds", data_dir=str(tmp_path / "tfds"))
    _assert_is_the_fixture(raw)
    assert raw.origin == f"tfds:cifar10@{tmp_path / 'tfds'}"


def test_a_bucket_is_copied_once_to_the_machine_and_read(tmp_path, monkeypatch):
    """The guide's second option, data.data_dir=gs://...: the folder comes over once through
    the path layer (array_record cannot read gs:// itself) and is read locally; a damaged local
    copy is fetched again; training reads it as any dataset."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(TFDS_CACHE_ENV, str(cache))
    with local_bucket(str(tmp_path / "bucket"), monkeypatch) as root:
        # gcloud storage cp -r tfds_data/cifar10 gs://bkt/tfds/
        stage_tree(os.path.join(FIXTURE_DIR, "cifar10"), os.path.join(root, "bkt", "tfds",
                                                                      "cifar10"))
        raw = load_raw("cifar10", "tfds", data_dir="gs://bkt/tfds")
        _assert_is_the_fixture(raw)
        copy = cache / "gs" / "bkt" / "tfds" / "cifar10" / "3.0.2"
        assert raw.origin == f"tfds:cifar10@gs://bkt/tfds (copied to {cache}/gs/bkt/tfds)"
        assert sorted(os.listdir(copy)) == sorted(os.listdir(VERSION_DIR))

        shard = copy / "cifar10-train.array_record-00000-of-00001"
        before = shard.stat().st_mtime_ns
        assert stage_tree("gs://bkt/tfds/cifar10", str(cache / "gs/bkt/tfds/cifar10")) == 0
        assert shard.stat().st_mtime_ns == before  # nothing fetched twice
        shard.write_bytes(shard.read_bytes()[:1000])  # a copy cut short
        _assert_is_the_fixture(load_raw("cifar10", "tfds", data_dir="gs://bkt/tfds"))
        assert not [p for p in os.listdir(copy) if ".partial-" in p]

        from hamjax.config import base_config

        data = base_config().data
        data.update(name="cifar10", source="tfds", data_dir="gs://bkt/tfds", val_size=4)
        splits = load_splits(data, seed=0)
        assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 10)


def test_a_bucket_without_the_dataset_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(TFDS_CACHE_ENV, str(tmp_path / "cache"))
    with local_bucket(str(tmp_path / "bucket"), monkeypatch):
        with pytest.raises(Exception, match=r"TFDS cifar10 in gs://empty/tfds/ \(no cifar10/"):
            load_raw("cifar10", "tfds", data_dir="gs://empty/tfds")
    assert not (tmp_path / "cache").exists()
