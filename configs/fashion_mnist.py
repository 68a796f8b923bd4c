"""Fashion-MNIST with the field's MNIST-family CNN: real runs sized for 2 CPU cores, any method.

    python launch.py --config=configs/fashion_mnist.py:method=pgd_at --workdir=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist.py:method=ham --workdir=runs/fmnist_ham
    python launch.py --config=configs/fashion_mnist.py:method=caat,budget=finetune \
        --workdir=runs/fmnist_caat --config.train.init_from=runs/fmnist_pgdat
    python launch.py --config=configs/fashion_mnist.py:method=trades,scenario=pairflip20 ...

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist` (found automatically) or
TFDS. The model is `fmnist_cnn` (two conv-BN-ReLU-maxpool blocks, dense 256: the CNN the
adversarial-training literature uses for MNIST-like data; `small_cnn` abandons the shirt class
under PGD-AT). The budget is the independent PyTorch reference's: configs/common.py's small-image
attack budget (eps 0.1, PGD-10 with step 0.025), 55k/5k train/validation, no augmentation, 12
epochs, lr 0.05 x0.1 at epochs 6 and 9 (HAM's 60/90 of 120, scaled), PGD-20 on 2000 validation /
test examples. HAM, as the official recipe, trains PGD-AT until the lr first drops (epoch 6), then
mines with M = 3 over the low-learning-rate phase. Checkpoints are selected on validation with
APGD-CE + targeted APGD (`eval.select_attack=apgd`), not PGD-20, which overstates HAM.
`budget=finetune` is the CAAT recipe scaled down from CIFAR-10: fine-tune a robust run
(`train.init_from`) for 4 epochs at a constant lr 0.005 with 5 attack steps (CAAT attacks twice
per step), PGD-20 on 1000 examples.
CAAT holds out 100 clean images per class as its meta set (and FRL's), with no validation split
(as the official code); `scenario` tokens as in hamjax.data.scenarios (lt10, pairflip20, ...).
"""

from hamjax.config import base_config, compose, config_module

common = config_module(__file__, "common.py")


def setup():
    config = base_config()
    config.data.name = "fashion_mnist"
    config.data.val_size = 5000
    config.data.augment.crop_pad = 0
    common.small_images(config)
    config.model.name = "fmnist_cnn"
    config.eval.num_examples = 2000
    config.eval.select_attack = "apgd"
    config.train.epochs = 12
    config.train.batch_size = 128
    config.train.lr_boundaries = (6, 9)
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


def cfa(config) -> None:
    config.method.begin = 1  # official: epoch 10 of ~100, the same share of 12
    config.train.fawa_decay = 0.88  # CFA's fairness-aware weight averaging, as its code


def faal(config) -> None:
    """FAAL fine-tunes a robust model (set train.init_from): official 2 epochs at lr 0.01,
    / 10 after the first."""
    config.train.epochs = 2
    config.train.lr = 0.01
    config.train.lr_boundaries = (1,)
    config.train.lr_values = (0.001,)


RECIPES = {
    "ham": lambda c: c.method.update(warmup_epochs=6, mining_step=3),
    "caat": caat,
    "cfa": cfa,
    # Official: class weights from the end of epoch 70 of 110, the same share of 12.
    "dafa": lambda c: c.method.update(warmup_epochs=8),
    "faal": faal,
}


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=100, recipes=RECIPES,
                   budgets={"finetune": finetune})
