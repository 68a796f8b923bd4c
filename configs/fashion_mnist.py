"""Fashion-MNIST with the small CNN: real runs sized for 2 CPU cores, any method on one budget.

    python launch.py --config=configs/fashion_mnist.py:method=pgd_at --workdir=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist.py:method=ham --workdir=runs/fmnist_ham
    python launch.py --config=configs/fashion_mnist.py:method=caat,budget=finetune \
        --workdir=runs/fmnist_caat --config.train.init_from=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist.py:method=trades,scenario=pairflip20 ...

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (found automatically) or
TFDS. The budget (configs/common.py's small-image budget: eps 0.1, PGD-10 with step 0.025) is 8
epochs, lr x0.1 at 5 and 7, PGD-20 on 2000 validation/test examples; HAM spends 3 epochs on
PGD-AT first (about HAM's 50/120 share), then mines with M = 3. `budget=finetune` is the CAAT
recipe scaled down from CIFAR-10: fine-tune a robust run (`train.init_from`) for 4 epochs at a
constant lr 0.005 with 5 attack steps (CAAT attacks twice per step), PGD-20 on 1000 examples.
CAAT holds out 100 clean images per class as its meta set (and FRL's), with no validation split
(as the official code); `scenario` tokens as in hamjax.data.scenarios (lt10, pairflip20, ...).
"""

from hamjax.config import base_config, compose, config_module

common = config_module(__file__, "common.py")


def setup():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.val_size = 2000
    config.data.augment.crop_pad = 2
    common.small_images(config)
    config.eval.num_examples = 2000
    config.train.epochs = 8
    config.train.batch_size = 128
    config.train.lr_boundaries = (5, 7)
    return config


def finetune(config) -> None:
    config.attack.steps = 5
    config.eval.num_examples = 1000
    config.train.epochs = 4
    config.train.lr = 0.005
    config.train.lr_schedule = "constant"
    config.train.lr_boundaries = ()
    config.train.lr_values = ()
    config.train.momentum = 0.9
    config.train.init_from = ""


def caat(config) -> None:
    config.seed = 100
    config.data.val_size = 0
    config.data.meta_per_class = 100


RECIPES = {"ham": lambda c: c.method.update(warmup_epochs=3, mining_step=3), "caat": caat}


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=100, recipes=RECIPES,
                   budgets={"finetune": finetune})
