"""Pure, jittable attacks on any `logits_fn(x) -> logits` over [0, 1] NHWC images."""

from hamjax.attacks.losses import LOSSES, per_example_loss
from hamjax.attacks.pgd import PGDInfo, fgsm, pgd, project, random_init

__all__ = ["LOSSES", "PGDInfo", "fgsm", "per_example_loss", "pgd", "project", "random_init"]
