"""CIFAR-10 with PreAct-ResNet-18, each method with its paper's or official code's settings.

    python launch.py --config=configs/cifar10.py:method=ham --workdir=runs/cifar10_ham
    python launch.py --config=configs/cifar10.py:method=trades --workdir=runs/cifar10_trades
    python launch.py --config=configs/cifar10.py:method=caat,scenario=pairflip20 \
        --workdir=runs/caat_pf20 --config.train.init_from=runs/cifar10_trades

The budget is HAM's baseline: PGD-10 (eps 8/255, step 2/255, random start, BN in eval mode while
attacking), SGD 0.1 with momentum 0.9 and weight decay 2e-4, batch 128, 120 epochs, lr x0.1 at
60 and 90, 0.0005 from 110 (`hamjax.config.base_config`). Per method:
- ham: the hard set is decided after M = 3 steps; HAM starts at the 50th epoch (0-based 49: the
  code's `(epoch + 1) >= begin_epoch` with `--begin_epoch 50`), the 49 epochs before are plain
  PGD-AT. Hard rows are packed into the smallest default bucket that holds them
  (`method.buckets`).
- trades: beta = 6; inner maximisation 10 steps of 2/255 on KL(p(x) || p(x')).
- caat: the official hyperparameters. It fine-tunes a robust run (`train.init_from`, the official
  `hot_start.pt`) for 40 epochs (configs/common.py's official_finetune); training bound 10/255
  times each class's ReMargin multiplier, 10 steps of 2/255; test attack (and the per-epoch FRL
  evaluation of the meta set) PGD-20 at 8/255. Meta set: 300 clean images per class taken before
  noise and imbalance; it is also FRL's validation set, so there is no validation split (the last
  epoch is reported). Options beside the faithful defaults: method.temperature,
  method.meta_bn="running", method.meta_feature_grad=False, method.adv_weight_floor > 0.
- frl_rw, frl_rm, frl_rwrm: the official scripts' settings (fine-tuning as CAAT, 120 epochs;
  validation split: 300 clean images per class, where the multipliers are fitted). Deviation kept
  from the scripts: their loss normalises jointly (`method.normalise = "joint"`).
Scenario tokens (joined with '+', see hamjax.data.scenarios): lt<IF>, uniform<r>, flip<r>,
pairflip<r> (= flip2, CAAT's pair-flip), r in percent.
"""

from hamjax.config import base_config, compose, config_module

common = config_module(__file__, "common.py")


def setup():
    config = base_config()
    config.data.name = "cifar10"
    config.model.name = "preact_resnet18"
    return config


def caat(config) -> None:
    common.official_finetune(config)
    config.data.val_size = 0
    config.data.meta_per_class = 300
    config.attack.eps = 10 / 255
    config.train.epochs = 40


def frl(config) -> None:
    common.official_finetune(config)
    config.data.val_size = 3000  # 300 per class (stratified), as in the FRL loader
    config.method.update(beta=1.0, delta0=0.1, delta1=0.1, rate1=0.05, rate2=0.1,
                         lim=0.3 if config.method.name == "frl_rm" else 0.5,
                         margin_max=3.0, normalise="joint", frl_split="val")


RECIPES = {
    "ham": lambda c: c.method.update(warmup_epochs=49, mining_step=3),
    "trades": lambda c: c.method.update(beta=6.0),
    "caat": caat,
    "frl_rw": frl,
    "frl_rm": frl,
    "frl_rwrm": frl,
}


def get_config(arg=None):
    return compose(setup, arg, default_method="pgd_at", meta_per_class=300, recipes=RECIPES)
