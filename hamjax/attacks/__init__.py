"""Pure, jittable attacks on any `logits_fn(x) -> logits` over [0, 1] NHWC images."""

from hamjax.attacks.apgd import APGDInfo, apgd, apgd_checkpoints, apgd_targeted
from hamjax.attacks.autoattack import (
    ATTACKS,
    STANDARD_ATTACKS,
    AutoAttackResult,
    autoattack,
    run_autoattack,
)
from hamjax.attacks.losses import LOSSES, per_example_loss
from hamjax.attacks.mining import MiningResult, ham_mine, mine_hard
from hamjax.attacks.pgd import PGDInfo, fgsm, pgd, project, random_init

__all__ = [
    "ATTACKS", "APGDInfo", "AutoAttackResult", "LOSSES", "MiningResult", "PGDInfo",
    "STANDARD_ATTACKS", "apgd", "apgd_checkpoints", "apgd_targeted", "autoattack", "fgsm",
    "ham_mine", "mine_hard", "per_example_loss", "pgd", "project", "random_init",
    "run_autoattack",
]
