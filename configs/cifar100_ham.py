"""HAM on CIFAR-100 with PreAct-ResNet-18 (the journal version's CIFAR-100 run).

    python launch.py --config=configs/cifar100_ham.py --workdir=runs/cifar100_ham

As CIFAR-10 (PGD-10, M = 3, 120 epochs, SGD 0.1 with the same steps) but HAM starts at the 60th
epoch (`--begin_epoch 60`: 59 PGD-AT epochs) and 30% of the easy AEs are kept
(`--keep_bili_high_conf 0.3`, chosen at random here: the released code lacks the rule).
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "cifar100"
    config.model.name = "preact_resnet18"
    config.method = method_config("ham", warmup_epochs=59, mining_step=3, keep_easy_fraction=0.3)
    return config
