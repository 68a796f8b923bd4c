"""CAAT on Fashion-MNIST with the small CNN: a real run sized for 2 CPU cores.

    python launch.py --config=configs/fashion_mnist_pgdat.py --workdir=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist_caat.py --workdir=runs/fmnist_caat \
        --config.train.init_from=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist_caat.py:pairflip20 ...

Like the official recipe it fine-tunes a robust model (here the PGD-AT run above) at a small
lr; without init_from it trains from scratch. Scaled down from CIFAR-10: 100 meta images per
class, base bound 0.1 (times each class's ReMargin multiplier), 5 attack steps of 0.025 for both
the adversary and the anti-adversary, 4 epochs, PGD-20 at 0.1 on 1000 examples for the per-epoch
FRL evaluation and the test report. Variant tokens as in configs/cifar10_caat.py.
"""

from hamjax.config import base_config, method_config
from hamjax.data.scenarios import apply_scenario


def get_config(variant: str = ""):
    config = base_config()
    config.seed = 100
    config.data.name = "fashion_mnist"
    config.data.val_size = 0
    config.data.meta_per_class = 100
    config.data.augment.crop_pad = 2
    config.data.augment.flip = False
    config.model.name = "small_cnn"
    config.method = method_config("caat")
    config.attack.eps = 0.1
    config.attack.step_size = 0.025
    config.attack.steps = 5
    config.eval.eps = 0.1
    config.eval.step_size = 0.025
    config.eval.steps = 20
    config.eval.num_examples = 1000
    config.train.epochs = 4
    config.train.batch_size = 128
    config.train.lr = 0.005
    config.train.lr_schedule = "constant"
    config.train.lr_boundaries = ()
    config.train.lr_values = ()
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.init_from = ""
    apply_scenario(config.data, variant)
    return config
