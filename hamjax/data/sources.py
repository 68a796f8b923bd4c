"""Readers for each dataset source: original archives on disk, TFDS data sources, scikit-learn.

Everything returns a `RawDataset` of uint8 NHWC images and int32 labels, so the split and noise
logic downstream never sees where the data came from. Searching is explicit: every place that was
tried is recorded, and a miss raises `DatasetNotFoundError` listing them with how to get the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from hamjax.data.sampling import stratified_sample
from hamjax.data.specs import DATASETS, IMAGENETTE_WNIDS, DatasetSpec, get_spec
from hamjax.errors import ConfigError, HamjaxError
from hamjax.paths import is_remote, local_cache_dir, resolve, stage_tree

log = logging.getLogger(__name__)

SYSTEM_DATA_DIRS = (resolve("/usr/share/datasets"),)  # where Debian dataset-* packages install
DATA_DIR_ENV = "HAMJAX_DATA_DIR"


class DatasetNotFoundError(HamjaxError, FileNotFoundError):
    """No source holds the dataset; the message lists every place looked and how to get it."""


class DatasetFormatError(HamjaxError, ValueError):
    """A file was found but is not in the expected format (truncated, wrong magic, wrong shape),
    cannot be read, or the data holds labels outside its classes."""


# What reading or decoding a damaged or unreadable file raises (OSError covers gzip's
# BadGzipFile, PIL's UnidentifiedImageError and permission errors).
_READ_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, pickle.UnpicklingError)


@contextlib.contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """Turns a low-level failure to read or decode `path` into a DatasetFormatError naming the
    file, instead of an EOFError or BadGzipFile that does not say which file."""
    try:
        yield
    except HamjaxError:
        raise
    except _READ_ERRORS as err:
        raise DatasetFormatError(
            f"{path}: cannot read {what} ({type(err).__name__}: {err}); the file is truncated, "
            "corrupt or unreadable: download it again (or remove it to use another source)"
        ) from err


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Labels must be class indices in [0, num_classes): one out of range would index past
    the logits (a NaN loss, or a silently wrong class)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
        raise DatasetFormatError(
            f"{where}: labels {bad[:10].tolist()} are outside [0, {num_classes}) (the dataset "
            f"has {num_classes} classes); fix the labels, or the class names if classes are "
            "missing"
        )


@dataclasses.dataclass
class RawDataset:
    """A dataset as its source provides it: the official train and test splits, nothing held out."""

    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    origin: str  # e.g. "local:/usr/share/datasets/fashion-mnist", "tfds:cifar10", "sklearn:digits"

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = np.asarray(getattr(self, f"{split}_labels"))
            if images.dtype != np.uint8 or images.ndim != 4:
                raise DatasetFormatError(
                    f"{self.origin}: {split} images must be uint8 NHWC, got {images.dtype} "
                    f"{images.shape}"
                )
            if labels.shape != (images.shape[0],):
                raise DatasetFormatError(
                    f"{self.origin}: {len(labels)} {split} labels for {images.shape[0]} images"
                )
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise DatasetFormatError(
                    f"{self.origin}: {split} labels must be integers, got {labels.dtype}")
            check_labels(labels, self.num_classes, f"{self.origin}: {split}")
            setattr(self, f"{split}_labels", labels.astype(np.int32))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ---------------------------------------------------------------------------------------------
# Image resizing (PIL, antialiased): image_size for fixed-size sets, square crop for Imagenette.


def _pil_square(image: object, size: int | None) -> np.ndarray:
    """Centre-crop a PIL image to a square and resize it to size x size (None: keep the side)."""
    from PIL import Image

    assert isinstance(image, Image.Image)
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if size is not None and side != size:
        image = image.resize((size, size), Image.BILINEAR)
    out = np.asarray(image, dtype=np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _array_to_pil(image: np.ndarray) -> object:
    from PIL import Image

    if image.shape[-1] == 1:
        return Image.fromarray(image[..., 0], mode="L")
    return Image.fromarray(image, mode="RGB")


def square_resize(image: np.ndarray, size: int | None) -> np.ndarray:
    """uint8 HWC -> uint8 [size, size, C]: centre square crop, then antialiased bilinear resize.

    Imagenette's 160px images are 160 on the short side; HAM trains on them resized to 32x32.
    Cropping first keeps the aspect ratio instead of squashing the image.
    """
    h, w = image.shape[:2]
    if h == w and (size is None or size == h):
        return image
    return _pil_square(_array_to_pil(image), size)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """Resize a uint8 NHWC batch to size x size (no-op when None or already that size)."""
    if size is None or images.shape[1:3] == (size, size):
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), np.uint8)
    for i, image in enumerate(images):
        out[i] = square_resize(image, size)
    return out


# ---------------------------------------------------------------------------------------------
# Local archive readers.


def _unpickle(data: bytes, where: str) -> dict:
    """A CIFAR batch: a Python 2 pickle of a byte-string keyed dict. Garbage may raise almost
    anything from pickle (UnpicklingError, EOFError, KeyError, ...): all say the same."""
    try:
        batch = pickle.loads(data, encoding="bytes")
    except Exception as err:
        raise DatasetFormatError(
            f"{where}: not a CIFAR batch pickle ({type(err).__name__}: {err}); the file is "
            "corrupt: download the dataset again"
        ) from err
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{where}: a CIFAR batch is a dict, this pickle holds a "
                                 f"{type(batch).__name__}")
    return batch


def _cifar_arrays(batch: dict, label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or label_key not in batch:
        raise DatasetFormatError(f"{where}: a CIFAR batch needs b'data' and {label_key!r}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{where}: b'data' has shape {data.shape}, want [N, 3072]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # stored channel-major (CHW)
    return np.ascontiguousarray(images), np.asarray(batch[label_key], dtype=np.int32)


def read_cifar(path: Path, name: str) -> RawDataset:
    """Read the CIFAR-10/100 python version: the .tar.gz itself or its extracted folder."""
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_file, meta_file, label_key, names_key = (
            "test_batch", "batches.meta", b"labels", b"label_names")  # fmt: skip
    else:
        train_files = ["train"]
        test_file, meta_file, label_key, names_key = (
            "test", "meta", b"fine_labels", b"fine_label_names")  # fmt: skip
    wanted = [*train_files, test_file, meta_file]
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for f in wanted:
            if (path / f).is_file():
                with reading(path / f, "a CIFAR batch"):
                    blobs[f] = (path / f).read_bytes()
    else:
        with reading(path, "the CIFAR archive (a .tar.gz)"), path.open("rb") as raw, \
                tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    blobs[base] = extracted.read()
    missing = [f for f in [*train_files, test_file] if f not in blobs]
    if missing:
        raise DatasetFormatError(f"{path}: CIFAR files missing: {', '.join(missing)}")
    where = {f: f"{path}/{f}" if path.is_dir() else f"{path}:{f}" for f in wanted}
    parts = [_cifar_arrays(_unpickle(blobs[f], where[f]), label_key, where[f])
             for f in train_files]
    test_x, test_y = _cifar_arrays(_unpickle(blobs[test_file], where[test_file]), label_key,
                                   where[test_file])
    spec = DATASETS[name]
    names = spec.class_names
    if meta_file in blobs:
        meta = _unpickle(blobs[meta_file], where[meta_file])
        if names_key in meta and len(meta[names_key]) == spec.num_classes:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
    return RawDataset(
        train_images=np.concatenate([x for x, _ in parts]),
        train_labels=np.concatenate([y for _, y in parts]),
        test_images=test_x,
        test_labels=test_y,
        class_names=names,
        origin=f"local:{path}",
    )


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        with path.open("rb") as f:
            mat = scipy.io.loadmat(f)
    except Exception as err:  # scipy raises MatReadError, ValueError, OSError, ... on garbage
        raise DatasetFormatError(
            f"{path}: cannot read the SVHN .mat file ({type(err).__name__}: {err}); the file is "
            "truncated or corrupt: download it again"
        ) from err
    if "X" not in mat or "y" not in mat:
        raise DatasetFormatError(f"{path}: an SVHN .mat file needs variables X and y")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DatasetFormatError(f"{path}: X has shape {x.shape}, want [32, 32, 3, N]")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2).astype(np.uint8))
    labels = np.asarray(mat["y"]).reshape(-1).astype(np.int32) % 10  # label 10 means digit 0
    return images, labels


def read_svhn(directory: Path) -> RawDataset:
    """Read SVHN cropped digits (train_32x32.mat, test_32x32.mat); the 'extra' set is not used."""
    train_x, train_y = _read_svhn_mat(directory / "train_32x32.mat")
    test_x, test_y = _read_svhn_mat(directory / "test_32x32.mat")
    return RawDataset(train_x, train_y, test_x, test_y, DATASETS["svhn"].class_names,
                      f"local:{directory}")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (.gz or plain): magic 0x0000 <dtype> <ndim>, big-endian dims, data."""
    with reading(path, "an IDX file"), path.open("rb") as f:
        data = gzip.decompress(f.read()) if path.suffix == ".gz" else f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path}: not an IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says {dims} ({expected} bytes) but {len(data) - header} follow"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _idx_paths(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _IDX_NAMES.items():
        for candidate in (directory / f"{stem}.gz", directory / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def read_idx_dataset(directory: Path, name: str) -> RawDataset:
    """Read MNIST-format IDX files (MNIST, Fashion-MNIST) from one folder."""
    paths = _idx_paths(directory)
    if paths is None:
        raise DatasetFormatError(f"{directory}: the four IDX files are not all there")
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        images = arrays[f"{split}_images"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{paths[f'{split}_images']}: want uint8 [N, H, W], got {images.dtype} "
                f"{images.shape}"
            )
        arrays[f"{split}_images"] = images[..., None]
    return RawDataset(
        train_images=np.array(arrays["train_images"]),
        train_labels=arrays["train_labels"],
        test_images=np.array(arrays["test_images"]),
        test_labels=arrays["test_labels"],
        class_names=DATASETS[name].class_names,
        origin=f"local:{directory}",
    )


_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _read_image_folder(
    directory: Path, classes: Sequence[str], size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(
            p for p in (directory / cls).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        for file in files:
            with reading(file, "an image"), file.open("rb") as raw, Image.open(raw) as im:
                images.append(_pil_square(im.convert("RGB"), size))
            labels.append(label)
    if not images:
        raise DatasetFormatError(f"{directory}: no images found")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DatasetFormatError(
            f"{directory}: images have different sizes {sorted(shapes)[:3]}...; set data.image_size"
        )
    return np.stack(images), np.asarray(labels, np.int32)


def read_imagenette(directory: Path, image_size: int | None) -> RawDataset:
    """Read an Imagenette folder ({train,val}/<wnid>/*.JPEG); val serves as the test split.

    Classes are the sorted wnid folders (the TFDS order); every image is centre-cropped to a
    square and resized to image_size (default 160).
    """
    spec = DATASETS["imagenette"]
    size = image_size or spec.default_image_size
    classes = sorted(p.name for p in (directory / "train").iterdir() if p.is_dir())
    val_classes = sorted(p.name for p in (directory / "val").iterdir() if p.is_dir())
    if classes != val_classes:
        raise DatasetFormatError(f"{directory}: train/ and val/ hold different class folders")
    train_x, train_y = _read_image_folder(directory / "train", classes, size)
    test_x, test_y = _read_image_folder(directory / "val", classes, size)
    names = spec.class_names if tuple(classes) == IMAGENETTE_WNIDS else tuple(classes)
    return RawDataset(train_x, train_y, test_x, test_y, names, f"local:{directory}")


# ---------------------------------------------------------------------------------------------
# Local search.


def search_dirs(name: str, data_dir: str | None) -> list[Path]:
    """Folders searched for a dataset's local files, in order.

    Roots: data.data_dir, $HAMJAX_DATA_DIR, /usr/share/datasets; in each, the root itself and
    its sub-folders named after the dataset (e.g. fashion-mnist).
    """
    roots: list[Path] = []
    if data_dir:
        roots.append(resolve(data_dir))
    if os.environ.get(DATA_DIR_ENV):
        roots.append(resolve(os.environ[DATA_DIR_ENV]))
    roots.extend(SYSTEM_DATA_DIRS)
    dirs: list[Path] = []
    for root in roots:
        for sub in ("", *DATASETS[name].dir_aliases):
            d = root / sub if sub else root
            if d not in dirs:
                dirs.append(d)
    return dirs


LocalReader = Callable[[], RawDataset]


def _probe_local(spec: DatasetSpec, directory: Path, image_size: int | None) -> LocalReader | None:
    """A reader for the dataset's files in this folder, or None if they are not there."""
    name = spec.name
    if name in ("cifar10", "cifar100"):
        folder, tarball, train_marker, test_marker = {
            "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "data_batch_1",
                        "test_batch"),
            "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", "train", "test"),
        }[name]
        for candidate in (directory / folder, directory):
            if (candidate / train_marker).is_file() and (candidate / test_marker).is_file():
                return lambda c=candidate: read_cifar(c, name)
        if (directory / tarball).is_file():
            return lambda: read_cifar(directory / tarball, name)
        return None
    if name == "svhn":
        if (directory / "train_32x32.mat").is_file() and (directory / "test_32x32.mat").is_file():
            return lambda: read_svhn(directory)
        return None
    if name in ("mnist", "fashion_mnist"):
        if _idx_paths(directory) is not None:
            return lambda: read_idx_dataset(directory, name)
        return None
    if name == "imagenette":
        for candidate in (directory / "imagenette2-160", directory):
            if (candidate / "train").is_dir() and (candidate / "val").is_dir():
                return lambda c=candidate: read_imagenette(c, image_size)
        return None
    return None


def find_local(
    name: str, data_dir: str | None, image_size: int | None, looked: list[str]
) -> LocalReader | None:
    """First local copy of the dataset in the search folders; appends each miss to `looked`."""
    spec = get_spec(name)
    for directory in search_dirs(name, data_dir):
        reader = _probe_local(spec, directory, image_size)
        if reader is not None:
            return reader
        looked.append(f"{directory}/ ({spec.local_files}: not found)")
    return None


# ---------------------------------------------------------------------------------------------
# TFDS (array_record data sources: random access, no TensorFlow needed).


TFDS_CACHE_ENV = "HAMJAX_TFDS_CACHE"  # where TFDS folders read from a bucket are copied
TFDS_CACHE_DEFAULT = "~/.cache/hamjax/tfds"


def stage_remote_tfds(data_dir: str, tfds_name: str) -> str:
    """A local copy of `<data_dir>/<tfds_name>/` from a bucket (gs://...), made once per machine
    and reused while every file's size matches; returns the local data_dir to read from.

    array_record's reader opens files through its own C++ layer, which does not go through
    fsspec/gcsfs (pointed at a gs:// path it waits on the network it cannot reach), and every
    process loads the whole dataset into memory anyway; so the files come over once, through
    the same path layer as workdirs, and are read locally."""
    local = local_cache_dir(data_dir, TFDS_CACHE_ENV, TFDS_CACHE_DEFAULT)
    copied = stage_tree(resolve(data_dir) / tfds_name, os.path.join(local, tfds_name))
    if copied:
        log.info("copied %d files of %s/%s to %s", copied, data_dir, tfds_name, local)
    return local


def _tfds_dirs(data_dir: str | None) -> list[str | None]:
    dirs: list[str | None] = []
    if data_dir:
        dirs.append(os.fspath(resolve(data_dir)))
    dirs.append(None)  # TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets)
    return dirs


def _tfds_default_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", str(Path("~/tensorflow_datasets").expanduser()))


def _records_to_arrays(
    source: Iterable[dict], size: int | None, square: bool
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for record in source:
        image = np.asarray(record["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if square or size is not None:
            image = square_resize(image, size)
        images.append(image)
        labels.append(int(record["label"]))
    return np.stack(images), np.asarray(labels, np.int32)


def read_tfds(name: str, data_dir: str | None, image_size: int | None, looked: list[str]
              ) -> RawDataset | None:
    """Load both splits through `tfds.data_source` (never downloads); None if not prepared."""
    spec = get_spec(name)
    if spec.tfds_name is None:
        return None
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        looked.append(f"TFDS (tensorflow_datasets not importable: {e})")
        return None
    size = image_size or spec.default_image_size
    for tfds_dir in _tfds_dirs(data_dir):
        where = tfds_dir or _tfds_default_dir()
        if tfds_dir is not None and not (resolve(tfds_dir) / spec.tfds_name).is_dir():
            looked.append(f"TFDS {spec.tfds_name} in {where}/ (no {spec.tfds_name}/ folder)")
            continue
        if tfds_dir is not None and is_remote(tfds_dir):
            tfds_dir = stage_remote_tfds(tfds_dir, spec.tfds_name)
            where = f"{where} (copied to {tfds_dir})"
        try:
            sources = [
                tfds.data_source(spec.tfds_name, split=split, data_dir=tfds_dir, download=False)
                for split in spec.tfds_splits
            ]
        except Exception as e:  # tfds raises KeyError, AssertionError, ... when not prepared
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            looked.append(f"TFDS {spec.tfds_name} in {where}/ (not prepared: {reason})")
            continue
        (train_x, train_y), (test_x, test_y) = (
            _records_to_arrays((s[i] for i in range(len(s))), size, spec.native_shape is None)
            for s in sources
        )
        names = spec.class_names
        return RawDataset(train_x, train_y, test_x, test_y, names,
                          f"tfds:{spec.tfds_name}@{where}")
    return None


# ---------------------------------------------------------------------------------------------
# scikit-learn digits.

DIGITS_TEST_SIZE = 360  # ~20% of 1797, stratified, fixed (seed 0) so every run tests the same set


def read_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits (values 0..16 -> uint8 0..255), fixed train/test split.

    The set has no official test split; a fixed stratified 360-image test set keeps results
    comparable across run seeds.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, np.int32)
    test = np.sort(stratified_sample(labels, DIGITS_TEST_SIZE, np.random.default_rng(0), 10))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return RawDataset(images[train], labels[train], images[test], labels[test],
                      DATASETS["digits"].class_names, "sklearn:digits")


# ---------------------------------------------------------------------------------------------


def _not_found(spec: DatasetSpec, source: str, looked: list[str]) -> DatasetNotFoundError:
    lines = [f"dataset {spec.name!r} not found (data.source={source!r}). Looked in:"]
    lines += [f"  - {entry}" for entry in looked]
    lines.append("To get it:")
    lines += [f"  - {how}" for how in spec.how_to_get]
    if spec.tfds_name is not None:
        lines.append(
            f"  - or prepare it for TFDS where internet is available: python -c \"import "
            f"tensorflow_datasets as tfds; tfds.data_source('{spec.tfds_name}', download=True)\" "
            f"(or: tfds build {spec.tfds_name} --file_format=array_record), and copy the "
            f"tensorflow_datasets folder to {_tfds_default_dir()} (or $TFDS_DATA_DIR, or "
            "data.data_dir)"
        )
    lines.append(
        f"then set --config.data.data_dir=<folder> (or ${DATA_DIR_ENV}) if it is not in a "
        "folder listed above."
    )
    return DatasetNotFoundError("\n".join(lines))


def load_raw(
    name: str, source: str = "auto", data_dir: str | None = None, image_size: int | None = None
) -> RawDataset:
    """Load a dataset's official train/test splits as uint8 NHWC + int32, resized if asked.

    source: "auto" (local archive, else prepared TFDS, else error), "local", "tfds", "sklearn".
    """
    spec = get_spec(name)
    if source == "auto":
        source_order = list(spec.sources)
    elif source in spec.sources:
        source_order = [source]
    else:
        raise ConfigError(
            f"data.source={source!r} cannot load {name!r}; use 'auto' or one of "
            f"{', '.join(spec.sources)}"
        )
    looked: list[str] = []
    raw: RawDataset | None = None
    for src in source_order:
        if src == "sklearn":
            raw = read_digits()
        elif src == "local":
            reader = find_local(name, data_dir, image_size, looked)
            raw = reader() if reader is not None else None
        elif src == "tfds":
            raw = read_tfds(name, data_dir, image_size, looked)
        if raw is not None:
            break
    if raw is None:
        raise _not_found(spec, source, looked)
    if spec.native_shape is not None:
        raw.train_images = resize_images(raw.train_images, image_size)
        raw.test_images = resize_images(raw.test_images, image_size)
    if raw.num_classes != spec.num_classes:
        raise DatasetFormatError(
            f"{raw.origin}: {raw.num_classes} class names, {name} has {spec.num_classes}"
        )
    for split in ("train", "test"):
        check_labels(getattr(raw, f"{split}_labels"), spec.num_classes, f"{raw.origin}: {split}")
    log.info("loaded %s from %s: %d train, %d test, %s", name, raw.origin,
             len(raw.train_labels), len(raw.test_labels), raw.train_images.shape[1:])
    return raw
