"""HAM (Lin et al. 2023) on CIFAR-10 with PreAct-ResNet-18, as the official code runs it.

    python launch.py --config=configs/cifar10_ham.py --workdir=runs/cifar10_ham

PGD-10 (eps 8/255, step 2/255, random start, BN in eval mode while attacking); the hard set is
decided after M = 3 steps. HAM starts at the 50th epoch (0-based 49: the code's
`(epoch + 1) >= begin_epoch` with `--begin_epoch 50`); the 49 epochs before are plain PGD-AT.
SGD 0.1, momentum 0.9, weight decay 2e-4, batch 128, 120 epochs, lr x0.1 at 60 and 90, 0.0005
from 110. Hard rows are packed into the smallest default bucket that holds them (1/8, 3/16, 1/4,
5/16, 3/8, 1/2, 5/8, 3/4 or all of the batch; `method.buckets`).
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.model.name = "preact_resnet18"
    config.method = method_config("ham", warmup_epochs=49, mining_step=3)
    return config
