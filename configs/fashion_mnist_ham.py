"""HAM on Fashion-MNIST with the MNIST-family CNN (fmnist_cnn), on the PGD-AT run's budget.

    python launch.py --config=configs/fashion_mnist_ham.py --workdir=runs/fashion_mnist_ham

The same as `--config=configs/fashion_mnist.py:method=ham` (see configs/fashion_mnist.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "fashion_mnist.py", "method=ham")
