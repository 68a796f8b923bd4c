"""Pure, jittable attacks on any `logits_fn(x) -> logits` over [0, 1] NHWC images.

Every attack takes one key for the batch or one key per example (`example_keys`, see
`hamjax.attacks.rng`). Modules are named after what they hold (`pgd_attack`, `apgd_attack`,
`fab_attack`, `square_attack`, `autoattack_ensemble`), so no function shadows its module.
The attacks know nothing of data, devices or models: AutoAttack over numpy arrays, chunked and
sharded, is the evaluation driver's `hamjax.evaluation.autoattack.run_autoattack`.
"""

from hamjax.attacks.apgd_attack import APGDInfo, apgd, apgd_checkpoints, apgd_targeted
from hamjax.attacks.autoattack_ensemble import (
    ATTACKS,
    STANDARD_ATTACKS,
    AutoAttackResult,
    autoattack,
    chunked,
    default_attack_kwargs,
)
from hamjax.attacks.checks import judge
from hamjax.attacks.fab_attack import fab, fab_targeted
from hamjax.attacks.losses import LOSSES, per_example_loss
from hamjax.attacks.mining import MiningResult, ham_mine, mine_hard
from hamjax.attacks.pgd_attack import PGDInfo, fgsm, pgd, project, random_init
from hamjax.attacks.rng import example_keys
from hamjax.attacks.square_attack import square

__all__ = [
    "ATTACKS", "APGDInfo", "AutoAttackResult", "LOSSES", "MiningResult", "PGDInfo",
    "STANDARD_ATTACKS", "apgd", "apgd_checkpoints", "apgd_targeted", "autoattack", "chunked",
    "default_attack_kwargs", "example_keys", "fab", "fab_targeted", "fgsm", "ham_mine", "judge",
    "mine_hard", "per_example_loss", "pgd", "project", "random_init", "square",
]

