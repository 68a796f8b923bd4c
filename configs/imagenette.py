"""Imagenette (160px images resized to 32x32) with PreAct-ResNet-18.

    python launch.py --config=configs/imagenette.py:method=ham --workdir=runs/imagenette_ham

As CIFAR-10: PGD-10 at eps 8/255, SGD 0.1 for 120 epochs; HAM with M = 3 from the 50th epoch.
"""

from hamjax.config import base_config, compose


def setup():
    config = base_config()
    config.data.name = "imagenette"
    config.data.image_size = 32
    config.model.name = "preact_resnet18"
    return config


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=50,
                   recipes={"ham": lambda c: c.method.update(warmup_epochs=49, mining_step=3)})
