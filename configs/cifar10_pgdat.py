"""PGD-AT (Madry et al. 2018) on CIFAR-10 with PreAct-ResNet-18, HAM's baseline settings.

    python launch.py --config=configs/cifar10_pgdat.py --workdir=runs/cifar10_pgdat

The same as `--config=configs/cifar10.py:method=pgd_at` (see configs/cifar10.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar10.py", "method=pgd_at")
