"""HAM on Fashion-MNIST with the field's MNIST-family CNN: a real run sized for 2 CPU cores.

    python launch.py --config=configs/fashion_mnist_ham.py --workdir=runs/fmnist_ham

Same budget as configs/fashion_mnist_pgdat.py (eps 0.1, PGD-10 with step 0.025, 12 epochs) so
the two compare directly. As the official recipe: PGD-AT until the lr first drops (epoch 6, HAM's
60 of 120 scaled), then HAM with M = 3 over the low-learning-rate phase.
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.val_size = 5000
    config.data.augment.crop_pad = 0
    config.data.augment.flip = False
    config.model.name = "fmnist_cnn"
    config.method = method_config("ham", warmup_epochs=6, mining_step=3)
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
