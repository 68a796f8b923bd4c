"""HAM on CIFAR-100 with PreAct-ResNet-18 (the journal version's CIFAR-100 run).

    python launch.py --config=configs/cifar100_ham.py --workdir=runs/cifar100_ham

The same as `--config=configs/cifar100.py:method=ham` (see configs/cifar100.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar100.py", "method=ham")
