"""PGD-AT on Fashion-MNIST with the MNIST-family CNN (fmnist_cnn): a real run sized for 2 CPU cores.

    python launch.py --config=configs/fashion_mnist_pgdat.py --workdir=runs/fashion_mnist_pgdat

The same as `--config=configs/fashion_mnist.py:method=pgd_at` (see configs/fashion_mnist.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "fashion_mnist.py", "method=pgd_at")
