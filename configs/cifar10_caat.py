"""CAAT (Zhou, Yang & Wu, AAAI 2023) on CIFAR-10 with PreAct-ResNet-18: official hyperparameters.

    python launch.py --config=configs/cifar10_caat.py --workdir=runs/cifar10_caat \
        --config.train.init_from=runs/cifar10_trades
    python launch.py --config=configs/cifar10_caat.py:pairflip20 ...   # 20% pair-flip noise
    python launch.py --config=configs/cifar10_caat.py:lt10 ...         # imbalance factor 10
    python launch.py --config=configs/cifar10_caat.py:lt10+uniform20 ...

The official code fine-tunes a pre-trained robust model (`hot_start.pt`) for 40 epochs at lr 1e-3;
point `train.init_from` at a finished robust run (e.g. TRADES or PGD-AT); from scratch the 40
epochs at lr 1e-3 are far too short. Meta set: 300 clean images per class taken before noise and
imbalance; it is also FRL's validation set, so there is no separate validation split
(`data.val_size = 0`, as in the official code: the last epoch is reported).

Variant tokens (joined with '+'; see hamjax.methods.caat.apply_scenario): lt<IF>, uniform<r>,
flip<r> (flip1), pairflip<r> (= flip2, CAAT's pair-flip), r in percent.
Options beside the faithful defaults: method.temperature, method.meta_bn="running",
method.meta_feature_grad=False, method.adv_weight_floor > 0 (keeps the robust terms on examples
routed to the anti-adversary branch).
"""

from hamjax.config import base_config, method_config
from hamjax.data.scenarios import apply_scenario


def get_config(variant: str = ""):
    config = base_config()
    config.seed = 100
    config.data.name = "cifar10"
    config.data.val_size = 0
    config.data.meta_per_class = 300
    config.model.name = "preact_resnet18"
    config.method = method_config("caat")  # beta 1.5, T 0.001, meta every 50 its, FRL 0.07...
    # Training bound: base 10/255 times the class's ReMargin multiplier, 10 steps of 2/255.
    config.attack.eps = 10 / 255
    config.attack.step_size = 2 / 255
    config.attack.steps = 10
    config.attack.bn_mode = "eval"
    config.train.epochs = 40
    config.train.batch_size = 128
    config.train.lr = 1e-3
    config.train.lr_schedule = "piecewise"
    config.train.lr_boundaries = (40, 80)  # x0.1 at epochs 40, 80 (never reached in 40 epochs)
    config.train.lr_values = (1e-4, 1e-5)
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.init_from = ""  # a robust run's workdir (the official hot start)
    # Test attack (and the FRL evaluation of the meta set each epoch): PGD-20, 8/255, 2/255.
    config.eval.eps = 8 / 255
    config.eval.step_size = 2 / 255
    config.eval.steps = 20
    apply_scenario(config.data, variant)
    return config
