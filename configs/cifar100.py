"""CIFAR-100 with PreAct-ResNet-18 (the HAM journal version's CIFAR-100 run).

    python launch.py --config=configs/cifar100.py:method=ham --workdir=runs/cifar100_ham

As CIFAR-10 (PGD-10, 120 epochs, SGD 0.1 with the same steps). HAM: M = 3, starting at the 60th
epoch (`--begin_epoch 60`: 59 PGD-AT epochs), 30% of the easy AEs kept (`--keep_bili_high_conf
0.3`, chosen at random here: the released code lacks the rule).
"""

from hamjax.config import base_config, compose

HAM = {"warmup_epochs": 59, "mining_step": 3, "keep_easy_fraction": 0.3}


def setup():
    config = base_config()
    config.data.name = "cifar100"
    config.model.name = "preact_resnet18"
    return config


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=30,
                   recipes={"ham": lambda c: c.method.update(**HAM)})
