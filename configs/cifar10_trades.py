"""TRADES (Zhang et al. 2019), beta = 6, on CIFAR-10 with PreAct-ResNet-18.

    python launch.py --config=configs/cifar10_trades.py --workdir=runs/cifar10_trades

Inner maximisation: 10 steps of 2/255 on KL(p(x) || p(x')), start x + 0.001 N(0, 1).
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.model.name = "preact_resnet18"
    config.method = method_config("trades", beta=6.0)
    return config
