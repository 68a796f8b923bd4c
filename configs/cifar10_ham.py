"""HAM (Lin et al. 2023) on CIFAR-10 with PreAct-ResNet-18, as the official code runs it.

    python launch.py --config=configs/cifar10_ham.py --workdir=runs/cifar10_ham

The same as `--config=configs/cifar10.py:method=ham` (see configs/cifar10.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar10.py", "method=ham")
