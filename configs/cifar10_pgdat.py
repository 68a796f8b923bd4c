"""PGD-AT (Madry et al. 2018) on CIFAR-10 with PreAct-ResNet-18, HAM's baseline settings.

    python launch.py --config=configs/cifar10_pgdat.py --workdir=runs/cifar10_pgdat

PGD-10 (eps 8/255, step 2/255, random start, BN in eval mode while attacking), SGD 0.1 with
momentum 0.9 and weight decay 2e-4, 120 epochs, lr x0.1 at 60 and 90, 0.0005 from 110.
"""

from hamjax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.model.name = "preact_resnet18"
    config.method.name = "pgd_at"
    return config
