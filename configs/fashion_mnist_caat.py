"""CAAT on Fashion-MNIST with the MNIST-family CNN: fine-tunes a robust run (train.init_from).

    python launch.py --config=configs/fashion_mnist_caat.py --workdir=runs/fashion_mnist_caat \
        --config.train.init_from=runs/fashion_mnist_pgdat
    python launch.py --config=configs/fashion_mnist_caat.py:pairflip20 ...

The same as `--config=configs/fashion_mnist.py:method=caat,budget=finetune` (see
configs/fashion_mnist.py).
"""

from hamjax.config import variant

get_config = variant(__file__, "fashion_mnist.py", "method=caat,budget=finetune")
