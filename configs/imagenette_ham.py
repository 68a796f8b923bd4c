"""HAM on Imagenette (160px images resized to 32x32) with PreAct-ResNet-18.

    python launch.py --config=configs/imagenette_ham.py --workdir=runs/imagenette_ham

As CIFAR-10: PGD-10 at eps 8/255, M = 3, HAM from the 50th epoch, SGD 0.1 for 120 epochs.
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "imagenette"
    config.data.image_size = 32
    config.model.name = "preact_resnet18"
    config.method = method_config("ham", warmup_epochs=49, mining_step=3)
    return config
