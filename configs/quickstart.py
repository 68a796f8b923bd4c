"""Quick start: scikit-learn's bundled digits with the small CNN (no download, ~2 min on 2 CPU
cores). Prints the per-class clean and PGD-20 table and the method's cost relative to PGD-AT.

    python launch.py --config=configs/quickstart.py
    python launch.py --config=configs/quickstart.py:method=trades --workdir=runs/qs_trades

HAM by default: 8 epochs of PGD-AT warm-up, then HAM (PGD-10, early drop after M = 3 steps, eps
0.1 on [0, 1] pixels); any registered method by `:method=NAME`. Model selection on a held-out
validation split, test numbers for the last and the validation-selected checkpoints.
"""

from hamjax.config import base_config, compose, config_module

common = config_module(__file__, "common.py")


def setup():
    config = base_config()
    config.data.name = "digits"
    config.data.val_size = 200
    config.data.augment.crop_pad = 1
    common.small_images(config)
    config.train.epochs = 20
    config.train.batch_size = 64
    config.train.lr_boundaries = (15, 18)
    config.train.log_every_steps = 19
    return config


RECIPES = {"ham": lambda c: c.method.update(warmup_epochs=8, mining_step=3)}


def get_config(arg=None):
    return compose(setup, arg, default_method="ham", meta_per_class=20, recipes=RECIPES)
