"""The `config.data` block: defaults, and validation that runs before any loading or compiling."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from hamjax.data.specs import DATASETS
from hamjax.errors import ConfigError
from hamjax.validation import is_int, is_number

SOURCES = ("auto", "tfds", "local", "sklearn")

# Label-noise kinds (corruption matrix T, row = clean class c, applied to the training split only):
#   none       T = I
#   uniform    T = (1-r) I + r/C 11^T          (a noisy label may land on the clean class)
#   flip       T[c,c] = 1-r, T[c,t_c] = r       t_c one random other class, fixed per class by seed
#              (CAAT / Meta-Weight-Net "flip1"; "flip1" is accepted as an alias)
#   pair_flip  T[c,c] = 1-r, T[c,(c+1) mod C] = r   (co-teaching "pair flip")
#   flip2      T[c,c] = 1-r, r/2 to each of two random other classes (CAAT / MW-Net "flip2")
NOISE_KINDS = ("none", "uniform", "flip", "flip1", "pair_flip", "flip2")


def default_data_config() -> ml_collections.ConfigDict:
    """The `config.data` block with every field and its default (CIFAR-10, clean, balanced)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "cifar10"
    cfg.source = "auto"  # local archive if found, else a prepared TFDS copy, else an error
    cfg.data_dir = config_dict.placeholder(str)  # extra place to look first; None: system dirs
    cfg.image_size = config_dict.placeholder(int)  # None: native size (Imagenette: 160)
    cfg.val_size = 1000  # clean, stratified, held out of the training set; 0: no val split
    cfg.train_size = 0  # >0: a stratified subset of the training pool (quick CPU-sized runs)
    cfg.meta_per_class = 0  # CAAT meta set: clean, balanced, taken before noise and imbalance
    cfg.label_noise = ml_collections.ConfigDict({"kind": "none", "rate": 0.0})
    cfg.imbalance_factor = 1.0  # long tail: n_max / n_min; 1 = unchanged
    cfg.augment = ml_collections.ConfigDict({"crop_pad": 4, "flip": True})
    return cfg


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ConfigError naming every bad `config.data.*` field and its fix; cheap, touches no
    files."""
    problems: list[str] = []

    def get(path: str) -> object:
        node: object = cfg
        for part in path.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(
                    f"config.data.{path} is missing; start from "
                    "hamjax.data.default_data_config(), which has every field"
                )
            node = node[part]
        return node

    for path in (
        "name", "source", "data_dir", "image_size", "val_size", "train_size", "meta_per_class",
        "label_noise.kind", "label_noise.rate", "imbalance_factor", "augment.crop_pad",
        "augment.flip",
    ):  # fmt: skip
        get(path)

    name = cfg.name
    spec = DATASETS.get(name) if isinstance(name, str) else None
    if spec is None:
        problems.append(f"config.data.name={name!r} is not a known dataset; use one of "
                        f"{', '.join(DATASETS)}")
    if cfg.source not in SOURCES:
        problems.append(f"config.data.source={cfg.source!r} is not valid; use one of "
                        f"{', '.join(SOURCES)}")
    elif spec is not None and cfg.source != "auto" and cfg.source not in spec.sources:
        problems.append(
            f"config.data.source={cfg.source!r} cannot load {name!r}; use 'auto' or one of "
            f"{', '.join(spec.sources)}"
        )
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        problems.append(f"config.data.data_dir={cfg.data_dir!r} must be a path string or None")
    size = cfg.image_size
    if size is not None and (not is_int(size) or size < 4):
        problems.append(f"config.data.image_size={size!r} must be None (native size) or an "
                        "int >= 4")
    if not is_int(cfg.val_size) or cfg.val_size < 0:
        problems.append(f"config.data.val_size={cfg.val_size!r} must be an int >= 0 (0: no "
                        "val split)")
    if not is_int(cfg.train_size) or cfg.train_size < 0:
        problems.append(f"config.data.train_size={cfg.train_size!r} must be an int >= 0 (0: all)")
    if not is_int(cfg.meta_per_class) or cfg.meta_per_class < 0:
        problems.append(
            f"config.data.meta_per_class={cfg.meta_per_class!r} must be an int >= 0 (0: no "
            "meta set)"
        )
    kind, rate = cfg.label_noise.kind, cfg.label_noise.rate
    if kind not in NOISE_KINDS:
        problems.append(
            f"config.data.label_noise.kind={kind!r} is not valid; use one of "
            f"{', '.join(NOISE_KINDS)}"
        )
    if not is_number(rate) or not 0.0 <= rate < 1.0:
        problems.append(f"config.data.label_noise.rate={rate!r} must be a number in [0, 1)")
    elif kind == "none" and rate != 0.0:
        problems.append(
            f"config.data.label_noise.rate={rate!r} has no effect with kind='none'; set "
            "data.label_noise.kind (uniform, flip, pair_flip, flip2) or rate=0"
        )
    if spec is not None and kind == "flip2" and spec.num_classes < 3:
        problems.append("config.data.label_noise.kind='flip2' needs at least 3 classes")
    imb = cfg.imbalance_factor
    if not is_number(imb) or imb < 1.0:
        problems.append(
            f"config.data.imbalance_factor={imb!r} must be a number >= 1 (1 = balanced, 10 or "
            "100 = long tail)"
        )
    pad = cfg.augment.crop_pad
    if not is_int(pad) or pad < 0:
        problems.append(f"config.data.augment.crop_pad={pad!r} must be an int >= 0 (0: no crop)")
    if not isinstance(cfg.augment.flip, bool):
        problems.append(f"config.data.augment.flip={cfg.augment.flip!r} must be True or False")
    if problems:
        raise ConfigError("invalid data config:\n  " + "\n  ".join(problems))
