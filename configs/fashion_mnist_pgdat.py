"""PGD-AT on Fashion-MNIST with the field's MNIST-family CNN: a real run sized for 2 CPU cores.

    python launch.py --config=configs/fashion_mnist_pgdat.py --workdir=runs/fmnist_pgdat

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (found automatically) or
TFDS. The budget of the independent PyTorch reference the evidence is checked against: 55k/5k
train/validation, no augmentation, 12 epochs, eps 0.1 (the usual MNIST-family budget is 0.1-0.3),
PGD-10 with step 0.025, the lr dropping 10x at epochs 6 and 9 (HAM's 60/90 of 120, scaled).
"""

from hamjax.config import base_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.val_size = 5000
    config.data.augment.crop_pad = 0
    config.data.augment.flip = False
    config.model.name = "fmnist_cnn"
    config.method.name = "pgd_at"
    config.attack.eps = 0.1
    config.attack.step_size = 0.025
    config.attack.steps = 10
    config.eval.eps = 0.1
    config.eval.step_size = 0.025
    config.eval.steps = 20
    config.eval.num_examples = 2000
    config.train.epochs = 12
    config.train.batch_size = 128
    config.train.lr = 0.05
    config.train.lr_boundaries = (6, 9)
    config.train.lr_values = (0.005, 0.0005)
    config.train.weight_decay = 5e-4
    return config
