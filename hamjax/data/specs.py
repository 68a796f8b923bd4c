"""What hamjax knows about each dataset: shape, classes, sources, where to get it, statistics.

One table keeps the loaders, the config validation, the error messages and the models'
normalisation constants in agreement.
"""

from __future__ import annotations

import dataclasses

from hamjax.errors import ConfigError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

DIGIT_CLASSES = tuple(str(i) for i in range(10))

FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip

# Imagenette's WordNet ids in sorted order (= folder order = TFDS label order) and their names.
IMAGENETTE_WNIDS = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888605",
)  # fmt: skip
IMAGENETTE_CLASSES = (
    "tench", "english_springer", "cassette_player", "chain_saw", "church",
    "french_horn", "garbage_truck", "gas_pump", "golf_ball", "parachute",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset (native_shape None: images vary in size, e.g. Imagenette)."""

    name: str
    num_classes: int
    native_shape: tuple[int, int, int] | None
    class_names: tuple[str, ...]
    sources: tuple[str, ...]  # besides "auto"
    tfds_name: str | None = None
    tfds_splits: tuple[str, str] = ("train", "test")
    dir_aliases: tuple[str, ...] = ()  # sub-folders of a search root that may hold the files
    local_files: str = ""  # what the local reader looks for, for error messages
    how_to_get: tuple[str, ...] = ()
    default_image_size: int | None = None  # Imagenette: 160 (square centre crop)


_IDX_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same names without .gz)"
)

DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            name="cifar10",
            num_classes=10,
            native_shape=(32, 32, 3),
            class_names=CIFAR10_CLASSES,
            sources=("local", "tfds"),
            tfds_name="cifar10",
            dir_aliases=("cifar10", "cifar-10"),
            local_files="cifar-10-python.tar.gz or its extracted folder cifar-10-batches-py/",
            how_to_get=(
                "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz into the "
                "data_dir (no need to extract)",
            ),
        ),
        DatasetSpec(
            name="cifar100",
            num_classes=100,
            native_shape=(32, 32, 3),
            class_names=CIFAR100_CLASSES,
            sources=("local", "tfds"),
            tfds_name="cifar100",
            dir_aliases=("cifar100", "cifar-100"),
            local_files="cifar-100-python.tar.gz or its extracted folder cifar-100-python/",
            how_to_get=(
                "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz into the "
                "data_dir (no need to extract)",
            ),
        ),
        DatasetSpec(
            name="svhn",
            num_classes=10,
            native_shape=(32, 32, 3),
            class_names=DIGIT_CLASSES,
            sources=("local", "tfds"),
            tfds_name="svhn_cropped",
            dir_aliases=("svhn",),
            local_files="train_32x32.mat and test_32x32.mat",
            how_to_get=(
                "download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and "
                "http://ufldl.stanford.edu/housenumbers/test_32x32.mat into the data_dir",
            ),
        ),
        DatasetSpec(
            name="imagenette",
            num_classes=10,
            native_shape=None,
            class_names=IMAGENETTE_CLASSES,
            sources=("local", "tfds"),
            tfds_name="imagenette/160px-v2",
            tfds_splits=("train", "validation"),
            dir_aliases=("imagenette",),
            local_files="imagenette2-160/{train,val}/<wnid>/*.JPEG",
            how_to_get=(
                "download https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz and "
                "extract it into the data_dir (tar xzf imagenette2-160.tgz)",
            ),
            default_image_size=160,
        ),
        DatasetSpec(
            name="mnist",
            num_classes=10,
            native_shape=(28, 28, 1),
            class_names=DIGIT_CLASSES,
            sources=("local", "tfds"),
            tfds_name="mnist",
            dir_aliases=("mnist",),
            local_files=_IDX_FILES,
            how_to_get=(
                "download the four IDX files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
                "into the data_dir",
            ),
        ),
        DatasetSpec(
            name="fashion_mnist",
            num_classes=10,
            native_shape=(28, 28, 1),
            class_names=FASHION_MNIST_CLASSES,
            sources=("local", "tfds"),
            tfds_name="fashion_mnist",
            dir_aliases=("fashion_mnist", "fashion-mnist"),
            local_files=_IDX_FILES,
            how_to_get=(
                "on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                "(files land in /usr/share/datasets/fashion-mnist, found automatically)",
                "or download the four IDX files from "
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ into the data_dir",
            ),
        ),
        DatasetSpec(
            name="digits",
            num_classes=10,
            native_shape=(8, 8, 1),
            class_names=DIGIT_CLASSES,
            sources=("sklearn",),
            local_files="(bundled with scikit-learn)",
            how_to_get=("pip install scikit-learn (the 8x8 digits ship inside the package)",),
        ),
    )
}

# Per-channel mean and std of the training images in [0, 1] pixel units; the models normalise
# inside __call__ with these so that every attack works on [0, 1] pixels.
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3053,), (0.3759,)),
}


def dataset_names() -> tuple[str, ...]:
    """The dataset names `data.name` accepts."""
    return tuple(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of a dataset; an unknown name raises ConfigError listing the valid ones."""
    if name not in DATASETS:
        raise ConfigError(
            f"data.name={name!r} is not a known dataset; use one of {', '.join(DATASETS)}"
        )
    return DATASETS[name]
