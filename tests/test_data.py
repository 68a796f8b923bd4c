"""Tests for hamjax.data: every reader on small archives in the real formats, splits, transforms,
batch order and augmentation. All fast (a few seconds on 2 CPU cores)."""

from __future__ import annotations

import functools
import gzip
import io
import math
import pickle
import struct
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hamjax import data
from hamjax.data import sources
from hamjax.data.specs import CIFAR100_CLASSES, IMAGENETTE_CLASSES, IMAGENETTE_WNIDS
from hamjax.errors import ConfigError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def rand_images(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def cfg(**overrides: object):
    """A data config with dotted-path overrides, e.g. cfg(**{"label_noise.kind": "flip"})."""
    c = data.default_data_config()
    for path, value in overrides.items():
        node = c
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


@pytest.fixture
def no_system_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Search only the test's data_dir (not /usr/share/datasets or $HAMJAX_DATA_DIR)."""
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", ())
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)


# ------------------------------------------------------------------------------------------
# Writers for the original archive formats.


def cifar_batch(images: np.ndarray, labels: np.ndarray, key: bytes) -> bytes:
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # channel-major rows
    return pickle.dumps({b"data": flat, key: labels.tolist(), b"batch_label": b"x"}, protocol=2)


def write_cifar10(root: Path, as_tar: bool) -> tuple[np.ndarray, ...]:
    train_x, test_x = rand_images(5 * 3, 32, 32, 3, 1), rand_images(4, 32, 32, 3, 2)
    train_y, test_y = np.arange(15) % 10, np.array([3, 1, 4, 1])
    files = {f"data_batch_{i + 1}": cifar_batch(train_x[3 * i : 3 * i + 3],
                                                 train_y[3 * i : 3 * i + 3], b"labels")
             for i in range(5)}
    files["test_batch"] = cifar_batch(test_x, test_y, b"labels")
    names = [n.encode() for n in data.DATASETS["cifar10"].class_names]
    files["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    write_tree(root, "cifar-10-batches-py", files, as_tar, "cifar-10-python.tar.gz")
    return train_x, train_y, test_x, test_y


def write_tree(root: Path, folder: str, files: dict[str, bytes], as_tar: bool, tar_name: str
               ) -> None:
    if as_tar:
        with tarfile.open(root / tar_name, "w:gz") as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / folder).mkdir(parents=True)
        for name, blob in files.items():
            (root / folder / name).write_bytes(blob)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                       *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def write_idx_set(directory: Path, compress: bool = True) -> tuple[np.ndarray, ...]:
    directory.mkdir(parents=True, exist_ok=True)
    train_x, test_x = rand_images(12, 28, 28, 1, 3)[..., 0], rand_images(5, 28, 28, 1, 4)[..., 0]
    train_y, test_y = np.arange(12) % 10, np.arange(5)[::-1]
    ext = ".gz" if compress else ""
    write_idx(directory / f"train-images-idx3-ubyte{ext}", train_x, compress)
    write_idx(directory / f"train-labels-idx1-ubyte{ext}", train_y, compress)
    write_idx(directory / f"t10k-images-idx3-ubyte{ext}", test_x, compress)
    write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", test_y, compress)
    return train_x, train_y, test_x, test_y


# ------------------------------------------------------------------------------------------
# Readers.


@pytest.mark.parametrize("as_tar", [True, False], ids=["tarball", "folder"])
def test_cifar10_reads_back_exactly(tmp_path: Path, as_tar: bool, no_system_dirs: None) -> None:
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path, as_tar)
    raw = data.load_raw("cifar10", "local", str(tmp_path))
    np.testing.assert_array_equal(raw.train_images, train_x)
    np.testing.assert_array_equal(raw.train_labels, train_y)
    np.testing.assert_array_equal(raw.test_images, test_x)
    np.testing.assert_array_equal(raw.test_labels, test_y)
    assert raw.train_labels.dtype == np.int32 and raw.train_images.dtype == np.uint8
    assert raw.class_names[0] == "airplane" and raw.origin.startswith("local:")


@pytest.mark.parametrize("as_tar", [True, False], ids=["tarball", "folder"])
def test_cifar100_reads_fine_labels(tmp_path: Path, as_tar: bool, no_system_dirs: None) -> None:
    train_x, test_x = rand_images(6, 32, 32, 3, 5), rand_images(2, 32, 32, 3, 6)
    train_y, test_y = np.array([0, 99, 50, 7, 7, 1]), np.array([98, 2])
    files = {
        "train": cifar_batch(train_x, train_y, b"fine_labels"),
        "test": cifar_batch(test_x, test_y, b"fine_labels"),
        "meta": pickle.dumps({b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES]}),
    }
    write_tree(tmp_path, "cifar-100-python", files, as_tar, "cifar-100-python.tar.gz")
    raw = data.load_raw("cifar100", "auto", str(tmp_path))
    np.testing.assert_array_equal(raw.train_images, train_x)
    np.testing.assert_array_equal(raw.train_labels, train_y)
    np.testing.assert_array_equal(raw.test_images, test_x)
    np.testing.assert_array_equal(raw.test_labels, test_y)
    assert raw.num_classes == 100 and raw.class_names[-1] == "worm"


def test_svhn_mat_maps_label_10_to_0(tmp_path: Path, no_system_dirs: None) -> None:
    import scipy.io

    train_x, test_x = rand_images(7, 32, 32, 3, 7), rand_images(3, 32, 32, 3, 8)
    train_y, test_y = np.array([10, 1, 2, 3, 9, 10, 5]), np.array([10, 4, 6])
    scipy.io.savemat(tmp_path / "train_32x32.mat",
                     {"X": train_x.transpose(1, 2, 3, 0), "y": train_y[:, None]})
    scipy.io.savemat(tmp_path / "test_32x32.mat",
                     {"X": test_x.transpose(1, 2, 3, 0), "y": test_y[:, None]})
    raw = data.load_raw("svhn", "local", str(tmp_path))
    np.testing.assert_array_equal(raw.train_images, train_x)
    np.testing.assert_array_equal(raw.test_images, test_x)
    np.testing.assert_array_equal(raw.train_labels, [0, 1, 2, 3, 9, 0, 5])
    np.testing.assert_array_equal(raw.test_labels, [0, 4, 6])


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_idx_reads_back_exactly(tmp_path: Path, compress: bool, no_system_dirs: None) -> None:
    # Files in a sub-folder named after the dataset are found too.
    train_x, train_y, test_x, test_y = write_idx_set(tmp_path / "mnist", compress)
    raw = data.load_raw("mnist", "local", str(tmp_path))
    np.testing.assert_array_equal(raw.train_images[..., 0], train_x)
    np.testing.assert_array_equal(raw.train_labels, train_y)
    np.testing.assert_array_equal(raw.test_images[..., 0], test_x)
    np.testing.assert_array_equal(raw.test_labels, test_y)
    assert raw.train_images.shape == (12, 28, 28, 1)
    resized = data.load_raw("mnist", "local", str(tmp_path), image_size=32)
    assert resized.train_images.shape == (12, 32, 32, 1)


def test_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(data.DatasetFormatError, match="not an IDX file"):
        sources.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(data.DatasetFormatError, match="header says"):
        sources.read_idx(short)


def test_truncated_gz_idx_file_names_the_file(tmp_path: Path, no_system_dirs: None) -> None:
    write_idx_set(tmp_path / "mnist")
    damaged = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:200])  # cut mid-stream
    with pytest.raises(data.DatasetFormatError, match=f"{damaged}: cannot read an IDX file"):
        data.load_raw("mnist", "local", str(tmp_path))
    damaged.write_bytes(b"not gzip at all")
    with pytest.raises(data.DatasetFormatError, match=f"{damaged}: cannot read an IDX file"):
        data.load_raw("mnist", "local", str(tmp_path))


@pytest.mark.parametrize("damage", ["not_a_tarball", "truncated"])
def test_corrupt_cifar_archive_names_the_file(tmp_path: Path, damage: str,
                                              no_system_dirs: None) -> None:
    write_cifar10(tmp_path, as_tar=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    blob = archive.read_bytes()
    damaged = b"not a tarball " * 300 if damage == "not_a_tarball" else blob[: len(blob) // 2]
    archive.write_bytes(damaged)
    with pytest.raises(data.DatasetFormatError) as info:
        data.load_raw("cifar10", "local", str(tmp_path))
    assert f"{archive}: cannot read the CIFAR archive" in str(info.value)


@pytest.mark.parametrize("garbage", [b"garbage", pickle.dumps([1, 2, 3])], ids=["bytes", "list"])
def test_garbage_cifar_pickle_names_the_file(tmp_path: Path, garbage: bytes,
                                             no_system_dirs: None) -> None:
    write_cifar10(tmp_path, as_tar=False)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(garbage)
    with pytest.raises(data.DatasetFormatError, match=str(batch)):
        data.load_raw("cifar10", "local", str(tmp_path))


def test_labels_out_of_range_are_rejected_in_memory() -> None:
    """A RawDataset built from arrays, or changed after it was built, with a label outside its
    classes never reaches training (it would index past the logits)."""
    images = rand_images(6, 4, 4, 1)
    names = ("a", "b", "c")
    with pytest.raises(data.DatasetFormatError, match=r"labels \[3\] are outside \[0, 3\)"):
        data.RawDataset(images, np.array([0, 1, 2, 3, 0, 1]), images, np.zeros(6, int), names,
                        "arrays")
    with pytest.raises(data.DatasetFormatError, match=r"test: labels \[-1\]"):
        data.RawDataset(images, np.zeros(6, int), images, np.full(6, -1), names, "arrays")
    raw = data.RawDataset(images, np.array([0, 1, 2, 0, 1, 2]), images, np.zeros(6, int), names,
                          "arrays")
    raw.train_labels[2] = 7
    with pytest.raises(data.DatasetFormatError, match=r"arrays: train: labels \[7\]"):
        data.make_splits(raw, cfg(val_size=0), seed=0)


def test_imagenette_folder(tmp_path: Path, no_system_dirs: None) -> None:
    from PIL import Image

    root = tmp_path / "imagenette2-160"
    colours = {}
    for split, n in (("train", 2), ("val", 1)):
        for k, wnid in enumerate(IMAGENETTE_WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                colour = (20 * k + 10, 255 - 20 * k, 100 + i)
                colours[(split, k, i)] = colour
                # Non-square, like Imagenette's 160px (short side 160).
                Image.new("RGB", (200, 160), colour).save(root / split / wnid / f"{i}.JPEG")
    raw = data.load_raw("imagenette", "local", str(tmp_path), image_size=32)
    assert raw.train_images.shape == (20, 32, 32, 3) and raw.test_images.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(raw.train_labels, np.repeat(np.arange(10), 2))
    np.testing.assert_array_equal(raw.test_labels, np.arange(10))
    assert raw.class_names == IMAGENETTE_CLASSES
    for j, label in enumerate(raw.train_labels):  # JPEG is lossy: colours within a few levels
        want = np.array(colours[("train", int(label), j % 2)])
        assert np.abs(raw.train_images[j].astype(int) - want).max() <= 4
    native = data.load_raw("imagenette", "local", str(tmp_path))
    assert native.train_images.shape == (20, 160, 160, 3)


def test_tfds_data_source_under_mock() -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        splits = data.load_splits(cfg(name="cifar10", source="tfds", val_size=10), seed=0)
        assert splits.train.images.shape == (30, 32, 32, 3)
        assert splits.val is not None and len(splits.val) == 10
        assert splits.test.images.shape == (40, 32, 32, 3)
        assert splits.info["origin"].startswith("tfds:cifar10")
        assert splits.class_names == data.DATASETS["cifar10"].class_names
        mnist = data.load_raw("mnist", "tfds")
        assert mnist.train_images.shape == (40, 28, 28, 1)
        assert mnist.train_labels.dtype == np.int32 and mnist.train_labels.max() < 10
    with tfds.testing.mock_data(num_examples=4):  # mock Imagenette images have random sizes
        nette = data.load_raw("imagenette", "tfds", image_size=32)
        assert nette.train_images.shape == (4, 32, 32, 3)


@pytest.fixture(scope="module")
def fashion() -> data.Splits:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian package dataset-fashion-mnist not installed (no {FASHION_DIR}); "
                    "apt-get install dataset-fashion-mnist")
    return data.load_splits(cfg(name="fashion_mnist", val_size=1000), seed=0)


def test_real_fashion_mnist_from_debian_package(fashion: data.Splits) -> None:
    assert fashion.info["origin"] == f"local:{FASHION_DIR}"
    assert len(fashion.train) + len(fashion.val) == 60000  # type: ignore[arg-type]
    assert fashion.test.images.shape == (10000, 28, 28, 1)
    assert fashion.image_shape == (28, 28, 1) and fashion.num_classes == 10
    np.testing.assert_array_equal(np.bincount(fashion.test.labels), [1000] * 10)
    np.testing.assert_array_equal(fashion.val.class_counts(10), [100] * 10)  # type: ignore[union-attr]
    mean = fashion.test.images.mean() / 255
    assert abs(mean - data.DATASET_STATS["fashion_mnist"][0][0]) < 0.01


def test_digits_native_and_resized() -> None:
    splits = data.load_splits(cfg(name="digits", val_size=137), seed=0)
    assert splits.train.images.shape == (1300, 8, 8, 1) and len(splits.test) == 360
    assert splits.train.images.dtype == np.uint8 and splits.train.images.max() == 255
    assert splits.info["origin"] == "sklearn:digits"
    again = data.load_splits(cfg(name="digits", val_size=137), seed=1)
    np.testing.assert_array_equal(again.test.images, splits.test.images)  # fixed test set
    big = data.load_raw("digits", "sklearn", image_size=16)
    assert big.train_images.shape == (1437, 16, 16, 1)


def test_missing_dataset_names_every_place_and_how_to_get_it(
    tmp_path: Path, no_system_dirs: None
) -> None:
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_splits(cfg(name="svhn", source="local", data_dir=str(tmp_path)), seed=0)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert f"{tmp_path}/ " in msg and f"{tmp_path}/svhn/" in msg
    assert "http://ufldl.stanford.edu/housenumbers/train_32x32.mat" in msg
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_raw("fashion_mnist", "auto", str(tmp_path))
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "TFDS fashion_mnist" in msg
    assert f"{tmp_path}/fashion-mnist/" in msg and "tfds build fashion_mnist" in msg


def test_system_dir_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_set(tmp_path / "fashion-mnist")
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", (tmp_path,))
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    raw = data.load_raw("fashion_mnist")
    assert raw.origin == f"local:{tmp_path / 'fashion-mnist'}"


# ------------------------------------------------------------------------------------------
# Config.


def test_default_config_is_valid_and_stats_cover_every_dataset() -> None:
    data.validate_data_config(data.default_data_config())
    assert set(data.DATASET_STATS) == set(data.DATASETS)
    for name, (mean, std) in data.DATASET_STATS.items():
        spec = data.DATASETS[name]
        channels = spec.native_shape[2] if spec.native_shape else 3
        assert len(mean) == len(std) == channels and min(std) > 0
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "cifar11"}, "data.name='cifar11'"),
        ({"source": "web"}, "data.source"),
        ({"source": "sklearn"}, "data.source='sklearn' cannot load 'cifar10'"),
        ({"name": "digits", "source": "tfds"}, "data.source='tfds' cannot load 'digits'"),
        ({"label_noise.rate": 1.0, "label_noise.kind": "uniform"}, "data.label_noise.rate"),
        ({"label_noise.rate": -0.1, "label_noise.kind": "uniform"}, "data.label_noise.rate"),
        ({"label_noise.rate": 0.2}, "has no effect with kind='none'"),
        ({"label_noise.kind": "symmetric"}, "data.label_noise.kind"),
        ({"imbalance_factor": 0.5}, "data.imbalance_factor"),
        ({"val_size": -1}, "data.val_size"),
        ({"meta_per_class": -3}, "data.meta_per_class"),
        ({"image_size": 2}, "data.image_size"),
        ({"augment.crop_pad": -1}, "data.augment.crop_pad"),
    ],
)
def test_bad_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        data.validate_data_config(cfg(**overrides))
    assert field in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        data.load_splits(cfg(name="imagenet"), seed=0)
    assert "cifar10, cifar100, svhn, imagenette, mnist, fashion_mnist, digits" in str(err.value)


def test_missing_field_is_named() -> None:
    c = data.default_data_config()
    del c.label_noise["rate"]
    with pytest.raises(ConfigError, match="data.label_noise.rate is missing"):
        data.validate_data_config(c)


# ------------------------------------------------------------------------------------------
# Splits and transforms (synthetic raw data: fast and exact).


def synthetic(per_class: int = 100, num_classes: int = 10, seed: int = 0) -> data.RawDataset:
    labels = np.repeat(np.arange(num_classes), per_class)
    labels = np.random.default_rng(seed).permutation(labels)
    images = rand_images(len(labels), 4, 4, 1, seed)
    return data.RawDataset(images, labels, images[:50], labels[:50],
                           tuple(str(i) for i in range(num_classes)), "synthetic")


def test_splits_are_deterministic_disjoint_and_stratified() -> None:
    raw = synthetic()
    c = cfg(name="digits", val_size=100, meta_per_class=5, imbalance_factor=10.0,
            **{"label_noise.kind": "uniform", "label_noise.rate": 0.3})
    a, b, other = (data.make_splits(raw, c, s) for s in (3, 3, 4))
    for x, y in ((a.train, b.train), (a.val, b.val), (a.meta, b.meta)):
        np.testing.assert_array_equal(x.source_index, y.source_index)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert not np.array_equal(a.val.source_index, other.val.source_index)
    sets = [set(s.source_index.tolist()) for s in (a.train, a.val, a.meta)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    np.testing.assert_array_equal(a.val.class_counts(10), [10] * 10)
    for split in (a.train, a.val, a.meta):  # each example keeps its own image and clean label
        np.testing.assert_array_equal(split.images, raw.train_images[split.source_index])
        np.testing.assert_array_equal(split.clean_labels, raw.train_labels[split.source_index])


def test_val_meta_test_stay_clean_and_meta_is_balanced() -> None:
    raw = synthetic()
    c = cfg(name="digits", val_size=50, meta_per_class=7, imbalance_factor=5.0,
            **{"label_noise.kind": "flip", "label_noise.rate": 0.4})
    s = data.make_splits(raw, c, 0)
    for split in (s.val, s.meta, s.test):
        np.testing.assert_array_equal(split.labels, split.clean_labels)
    np.testing.assert_array_equal(s.meta.class_counts(10), [7] * 10)
    assert s.train.noise_rate > 0.2
    # Noise and imbalance draw from their own streams: the held-out splits do not move.
    clean = data.make_splits(raw, cfg(name="digits", val_size=50, meta_per_class=7), 0)
    np.testing.assert_array_equal(clean.val.source_index, s.val.source_index)
    np.testing.assert_array_equal(clean.meta.source_index, s.meta.source_index)


def test_meta_per_class_too_large_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.meta_per_class=95"):
        data.make_splits(synthetic(), cfg(name="digits", val_size=100, meta_per_class=95), 0)


def test_long_tail_counts_follow_the_formula() -> None:
    s = data.make_splits(synthetic(), cfg(name="digits", val_size=100, meta_per_class=5,
                                          imbalance_factor=10.0), seed=2)
    n_max = 100 - 10 - 5
    order = s.info["long_tail_class_order"]
    counts = s.train.class_counts(10)
    for rank, c in enumerate(order):
        assert counts[c] == math.floor(n_max / 10.0 ** (rank / 9) + 1e-9)
    assert counts[order[0]] == 85 and counts[order[-1]] == 8
    assert sorted(order) == list(range(10)) and order != list(range(10))
    other = data.make_splits(synthetic(), cfg(name="digits", val_size=100, meta_per_class=5,
                                              imbalance_factor=10.0), seed=3)
    assert other.info["long_tail_class_order"] != order  # class order shuffled by seed


@pytest.mark.parametrize(
    ("kind", "rate", "expected"),
    [("uniform", 0.4, 0.4 * 9 / 10), ("flip", 0.2, 0.2), ("pair_flip", 0.3, 0.3),
     ("flip2", 0.4, 0.4)],
)
def test_noise_rate_matches_and_is_seeded(kind: str, rate: float, expected: float) -> None:
    raw = synthetic(per_class=1000)
    c = cfg(name="digits", val_size=0, **{"label_noise.kind": kind, "label_noise.rate": rate})
    s, again = data.make_splits(raw, c, 0), data.make_splits(raw, c, 0)
    np.testing.assert_array_equal(s.train.labels, again.train.labels)
    assert abs(s.train.noise_rate - expected) < 0.02
    assert abs(s.info["label_noise"]["actual_rate"] - expected) < 0.02
    np.testing.assert_array_equal(s.train.clean_labels, raw.train_labels)
    matrix = np.array(s.info["label_noise"]["transition_matrix"])
    np.testing.assert_allclose(matrix.sum(1), 1.0)
    targets = {int(c): set(s.train.labels[(s.train.clean_labels == c)
                                          & (s.train.labels != c)].tolist()) for c in range(10)}
    if kind == "pair_flip":
        assert all(targets[c] == {(c + 1) % 10} for c in range(10))
    elif kind == "flip":
        assert all(len(t) == 1 and c not in t for c, t in targets.items())
    elif kind == "flip2":
        assert all(len(t) == 2 and c not in t for c, t in targets.items())
    else:
        assert all(len(t) == 9 for t in targets.values())


def test_transition_matrices() -> None:
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(data.transition_matrix("uniform", 0.5, 4, rng),
                               0.5 * np.eye(4) + 0.125)
    pair = data.transition_matrix("pair_flip", 0.2, 3, rng)
    np.testing.assert_allclose(pair, [[0.8, 0.2, 0], [0, 0.8, 0.2], [0.2, 0, 0.8]])
    np.testing.assert_array_equal(data.transition_matrix("none", 0.0, 3, rng), np.eye(3))
    flip2 = data.transition_matrix("flip2", 0.4, 5, rng)
    assert ((flip2 == 0.2).sum(1) == 2).all() and np.allclose(np.diag(flip2), 0.6)


def test_val_size_too_large_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.val_size=1000"):
        data.make_splits(synthetic(), cfg(name="digits"), 0)


def test_stratified_subset() -> None:
    s = data.make_splits(synthetic(), cfg(name="digits", val_size=0), 0)
    sub = data.stratified_subset(s.train, 200, seed=0, num_classes=10)
    np.testing.assert_array_equal(sub.class_counts(10), [20] * 10)


# ------------------------------------------------------------------------------------------
# Batches.


def small_split(n: int = 23) -> data.ArraySplit:
    labels = np.arange(n) % 10
    return data.ArraySplit(rand_images(n, 4, 4, 3, 9), labels, labels)


def test_epoch_batch_indices_deterministic_per_seed_and_epoch() -> None:
    order = data.epoch_batch_indices(23, 5, seed=1, epoch=0)
    assert order.shape == (4, 5) and order.dtype == np.int32
    assert len(set(order.ravel().tolist())) == 20 and order.max() < 23
    np.testing.assert_array_equal(order, data.epoch_batch_indices(23, 5, seed=1, epoch=0))
    assert not np.array_equal(order, data.epoch_batch_indices(23, 5, seed=1, epoch=1))
    assert not np.array_equal(order, data.epoch_batch_indices(23, 5, seed=2, epoch=0))
    assert data.num_batches(23, 5) == 4
    with pytest.raises(ValueError, match="batch_size=30 is larger"):
        data.num_batches(23, 30)


def test_resume_from_step_gives_the_same_batches() -> None:
    split = small_split()
    full = list(data.iterate_batches(split, 5, seed=7, epoch=3))
    resumed = list(data.iterate_batches(split, 5, seed=7, epoch=3, start_step=2))
    assert len(full) == 4 and len(resumed) == 2
    for a, b in zip(full[2:], resumed, strict=True):
        for key in ("image", "label", "index"):
            np.testing.assert_array_equal(a[key], b[key])
    batch = full[0]
    # uint8 to the device (a quarter of float32's transfer), scaled there
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (5, 4, 4, 3)
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"], split.images[batch["index"]])
    np.testing.assert_array_equal(batch["label"], split.labels[batch["index"]])
    scaled = np.asarray(jax.jit(data.images_to_float)(batch["image"]))
    assert scaled.dtype == np.float32
    np.testing.assert_array_equal(scaled, split.images[batch["index"]].astype(np.float32)
                                  * np.float32(1.0 / 255.0))
    floats = jnp.asarray(scaled)
    assert data.images_to_float(floats) is floats  # float images pass through untouched


def test_each_process_gathers_only_its_rows_of_every_batch() -> None:
    split, meta = small_split(), small_split(20)
    halves = (slice(0, 3), slice(3, 6))
    full = list(data.iterate_batches(split, 6, seed=7, epoch=1))
    parts = [list(data.iterate_batches(split, 6, seed=7, epoch=1, rows=r)) for r in halves]
    for whole, first, second in zip(full, *parts, strict=True):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    evals = [list(data.eval_batches(split, 10, rows=r)) for r in (slice(0, 5), slice(5, 10))]
    seen = np.concatenate([b["index"][b["mask"]] for pair in zip(*evals, strict=True)
                           for b in pair])
    np.testing.assert_array_equal(np.sort(seen), np.arange(23))  # each example once
    whole = data.meta_batch(meta, 8, seed=0, step=3)
    halves_meta = [data.meta_batch(meta, 8, seed=0, step=3, rows=r)
                   for r in (slice(0, 4), slice(4, 8))]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves_meta]), whole[key])


def test_prefetch_yields_everything_in_order_and_reraises() -> None:
    from hamjax.data.prefetch import prefetch

    assert list(prefetch(iter(range(50)), size=2)) == list(range(50))
    assert list(prefetch(iter(range(5)), size=0)) == list(range(5))

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetch(failing(), size=2)
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)
    endless = prefetch(iter(int, 1), size=1)  # never ends: closing must stop the producer
    assert next(endless) == 0
    endless.close()


def test_eval_batches_cover_every_example_once_with_static_shapes() -> None:
    split = small_split()
    batches = list(data.eval_batches(split, 10))
    assert [b["image"].shape[0] for b in batches] == [10, 10, 10]
    seen = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(23))
    assert batches[-1]["mask"].sum() == 3 and batches[-1]["mask"].dtype == bool


def test_meta_batch_is_a_function_of_step() -> None:
    meta = small_split(20)
    a, b = data.meta_batch(meta, 8, seed=0, step=5), data.meta_batch(meta, 8, seed=0, step=5)
    np.testing.assert_array_equal(a["meta_image"], b["meta_image"])
    assert a["meta_image"].shape == (8, 4, 4, 3) and a["meta_label"].dtype == np.int32
    epoch0 = np.concatenate([data.meta_batch(meta, 8, 0, s)["meta_label"] for s in range(2)])
    assert len(epoch0) == 16


# ------------------------------------------------------------------------------------------
# Augmentation.


@functools.partial(jax.jit, static_argnames=("crop_pad", "flip"))
def jit_augment(rng: jax.Array, images: jax.Array, *, crop_pad: int, flip: bool) -> jax.Array:
    return data.augment(rng, images, crop_pad=crop_pad, flip=flip)


def test_augment_shape_range_and_identity() -> None:
    images = jnp.asarray(rand_images(8, 6, 6, 3, 1), jnp.float32) / 255.0
    out = jit_augment(jax.random.key(0), images, crop_pad=2, flip=True)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    same = data.augment(jax.random.key(0), images, crop_pad=0, flip=False)
    np.testing.assert_array_equal(same, images)


def test_augment_flip_gives_image_or_its_mirror() -> None:
    image = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1) / 10.0  # asymmetric
    images = jnp.asarray(np.broadcast_to(image, (64, 2, 5, 1)))
    out = np.asarray(jit_augment(jax.random.key(1), images, crop_pad=0, flip=True))
    is_same = (out == image).all(axis=(1, 2, 3))
    is_mirror = (out == image[:, ::-1]).all(axis=(1, 2, 3))
    assert (is_same ^ is_mirror).all()
    assert 10 < is_mirror.sum() < 54  # about half flipped, per example


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pad=st.sampled_from([1, 3]))
def test_augment_crop_is_a_window_of_the_padded_image(seed: int, pad: int) -> None:
    images = np.random.default_rng(seed).random((4, 5, 5, 2)).astype(np.float32)
    out = np.asarray(jit_augment(jax.random.key(seed), jnp.asarray(images), crop_pad=pad,
                                 flip=False))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i in range(4):
        windows = [padded[i, y : y + 5, x : x + 5] for y in range(2 * pad + 1)
                   for x in range(2 * pad + 1)]
        assert any(np.array_equal(out[i], w) for w in windows)


def test_train_size_takes_a_stratified_subset_after_val_and_meta():
    from hamjax.data import default_data_config, load_splits

    cfg = default_data_config()
    cfg.name, cfg.source, cfg.val_size, cfg.meta_per_class = "digits", "sklearn", 100, 5
    full = load_splits(cfg, seed=3)
    cfg.train_size = 500
    small = load_splits(cfg, seed=3)
    assert len(small.train) == 500
    np.testing.assert_array_equal(small.val.source_index, full.val.source_index)
    np.testing.assert_array_equal(small.meta.source_index, full.meta.source_index)
    assert set(small.train.source_index) <= set(full.train.source_index)
    counts = np.bincount(small.train.labels, minlength=10)
    expected = np.bincount(full.train.labels, minlength=10) * 500 / len(full.train)
    assert np.all(np.abs(counts - expected) < 1.0)  # proportional, largest remainder
