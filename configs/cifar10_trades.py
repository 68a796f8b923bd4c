"""TRADES (Zhang et al. 2019), beta = 6, on CIFAR-10 with PreAct-ResNet-18.

    python launch.py --config=configs/cifar10_trades.py --workdir=runs/cifar10_trades

The same as `--config=configs/cifar10.py:method=trades` (see configs/cifar10.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar10.py", "method=trades")
