"""Quick start: HAM on scikit-learn's bundled digits with the small CNN (no download, ~2 min on
2 CPU cores). Prints the per-class clean and PGD-20 table and HAM's cost relative to PGD-AT.

    python launch.py --config=configs/quickstart.py

8 epochs of PGD-AT warm-up, then HAM (PGD-10, early drop after M = 3 steps, eps 0.1 on [0, 1]
pixels); model selection on a held-out validation split, test numbers for the last and the
validation-selected checkpoints.
"""

from hamjax.config import base_config, method_config


def get_config():
    config = base_config()
    config.data.name = "digits"
    config.data.val_size = 200
    config.data.augment.crop_pad = 1
    config.data.augment.flip = False
    config.model.name = "small_cnn"
    config.method = method_config("ham", warmup_epochs=8, mining_step=3)
    config.attack.eps = 0.1
    config.attack.step_size = 0.025
    config.attack.steps = 10
    config.eval.eps = 0.1
    config.eval.step_size = 0.025
    config.eval.steps = 20
    config.train.epochs = 20
    config.train.batch_size = 64
    config.train.lr = 0.05
    config.train.lr_boundaries = (15, 18)
    config.train.lr_values = (0.005, 0.0005)
    config.train.weight_decay = 5e-4
    config.train.log_every_steps = 19
    return config
