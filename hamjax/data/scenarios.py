"""Learning scenarios as short tokens: a long tail and label noise on the training split.

`lt10+pairflip20` is CAAT's paper's naming (imbalance factor 10, 20% pair-flip noise); the
tokens only set `config.data` fields (`imbalance_factor`, `label_noise`), which the splits
(`hamjax.data.splits`) apply. Configs take them as a variant (`configs/common.py`).
"""

from __future__ import annotations

import re

import ml_collections

from hamjax.errors import ConfigError

# The learning scenarios of CAAT's paper as tokens: noise kind per token prefix.
_NOISE_TOKENS = {"uniform": "uniform", "flip": "flip1", "flip1_": "flip1", "flip2_": "flip2",
                 "pairflip": "flip2"}


def apply_scenario(data_config: ml_collections.ConfigDict,
                   spec: str) -> ml_collections.ConfigDict:
    """Applies tokens like "lt10", "pairflip20", "lt100+uniform40" to `data_config` (a
    config's `data` section), in place, and returns it.

    lt<IF>: long tail with imbalance factor IF. uniform<r>, flip<r> (= flip1_<r>), flip2_<r>
    (= pairflip<r>): label noise at r percent on the training split. CAAT's "pair-flip" is
    Meta-Weight-Net's flip2 (r/2 to each of two other classes); co-teaching's (c -> c+1) is
    data.label_noise.kind="pair_flip". Unknown tokens raise ConfigError.
    """
    for token in filter(None, re.split(r"[+,\s]+", spec.strip().lower())):
        if match := re.fullmatch(r"lt(\d+(?:\.\d+)?)", token):
            data_config.imbalance_factor = float(match.group(1))
            continue
        match = re.fullmatch(r"(uniform|pairflip|flip1_|flip2_|flip)(\d+(?:\.\d+)?)", token)
        if match is None:
            raise ConfigError(
                f"config variant {token!r} is not understood; use lt<IF> (lt10), uniform<r>, "
                "flip<r>, flip2_<r> or pairflip<r> (r in percent), joined with '+'"
            )
        data_config.label_noise.kind = _NOISE_TOKENS[match.group(1)]
        data_config.label_noise.rate = float(match.group(2)) / 100.0
    return data_config
