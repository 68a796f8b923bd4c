"""HAM on Fashion-MNIST with the small CNN: a real run sized for 2 CPU cores.

    python launch.py --config=configs/fashion_mnist_ham.py --workdir=runs/fmnist_ham

Same budget as configs/fashion_mnist_pgdat.py (eps 0.1, PGD-10 with step 0.025, 8 epochs) so the
two compare directly: 3 epochs of PGD-AT (about HAM's 50/120 share), then HAM with M = 3.
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.val_size = 2000
    config.data.augment.crop_pad = 2
    config.data.augment.flip = False
    config.model.name = "small_cnn"
    config.method = method_config("ham", warmup_epochs=3, mining_step=3)
    config.attack.eps = 0.1
    config.attack.step_size = 0.025
    config.attack.steps = 10
    config.eval.eps = 0.1
    config.eval.step_size = 0.025
    config.eval.steps = 20
    config.eval.num_examples = 2000
    config.train.epochs = 8
    config.train.batch_size = 128
    config.train.lr = 0.05
    config.train.lr_boundaries = (5, 7)
    config.train.lr_values = (0.005, 0.0005)
    config.train.weight_decay = 5e-4
    return config
