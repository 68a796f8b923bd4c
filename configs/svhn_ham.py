"""HAM on SVHN with PreAct-ResNet-18.

    python launch.py --config=configs/svhn_ham.py --workdir=runs/svhn_ham

The same as `--config=configs/svhn.py:method=ham` (see configs/svhn.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "svhn.py", "method=ham")
