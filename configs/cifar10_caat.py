"""CAAT (Zhou, Yang & Wu, AAAI 2023) on CIFAR-10 with PreAct-ResNet-18: official hyperparameters.

    python launch.py --config=configs/cifar10_caat.py --workdir=runs/cifar10_caat \
        --config.train.init_from=runs/cifar10_trades
    python launch.py --config=configs/cifar10_caat.py:pairflip20 ...   # 20% pair-flip noise
    python launch.py --config=configs/cifar10_caat.py:lt10+uniform20 ...

The same as `--config=configs/cifar10.py:method=caat` (see configs/cifar10.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar10.py", "method=caat")
