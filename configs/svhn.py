"""SVHN with PreAct-ResNet-18.

    python launch.py --config=configs/svhn.py:method=ham --workdir=runs/svhn_ham

PGD-10 (eps 8/255, step 2/255), random crop and flip as in HAM's code; SVHN starts at lr 0.01
(x0.1 at 60 and 90, 0.00005 from 110). HAM decides the hard set after M = 5 steps and starts at
the 50th epoch (49 PGD-AT epochs).
"""

from hamjax.config import base_config, compose


def setup():
    config = base_config()
    config.data.name = "svhn"
    config.model.name = "preact_resnet18"
    config.train.lr = 0.01
    config.train.lr_values = (0.001, 0.0001, 0.00005)
    return config


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=300,
                   recipes={"ham": lambda c: c.method.update(warmup_epochs=49, mining_step=5)})
