"""HAM on SVHN with PreAct-ResNet-18.

    python launch.py --config=configs/svhn_ham.py --workdir=runs/svhn_ham

PGD-10 (eps 8/255, step 2/255) with the hard set decided after M = 5 steps; HAM from the 50th
epoch (49 PGD-AT epochs). SVHN starts at lr 0.01 (x0.1 at 60 and 90, 0.00005 from 110), with
random crop and flip as in the official code.
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "svhn"
    config.model.name = "preact_resnet18"
    config.method = method_config("ham", warmup_epochs=49, mining_step=5)
    config.train.lr = 0.01
    config.train.lr_values = (0.001, 0.0001, 0.00005)
    return config
