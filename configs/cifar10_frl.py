"""FRL (Xu et al., ICML 2021) on CIFAR-10 with PreAct-ResNet-18: the official scripts' settings.

    python launch.py --config=configs/cifar10_frl.py --workdir=runs/cifar10_frl \
        --config.train.init_from=runs/cifar10_trades          # frl_rwrm
    python launch.py --config=configs/cifar10_frl.py:method=frl_rw,scenario=lt10 ...

The same as `--config=configs/cifar10.py:method=frl_rwrm` (see configs/cifar10.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "cifar10.py", "method=frl_rwrm")
