"""FRL (Xu et al., ICML 2021) on CIFAR-10 with PreAct-ResNet-18: the official scripts' settings.

    python launch.py --config=configs/cifar10_frl.py --workdir=runs/cifar10_frl \
        --config.train.init_from=runs/cifar10_trades          # frl_rwrm (frlrmrw.py)
    python launch.py --config=configs/cifar10_frl.py:rw ...    # frl_rw (frlrw.py)
    python launch.py --config=configs/cifar10_frl.py:rm+lt10 ...

The variant string picks the FRL flavour (rw, rm, rwrm; default rwrm) and any CAAT learning
scenario tokens (lt<IF>, uniform<r>, flip<r>, pairflip<r>; see hamjax.methods.caat.apply_scenario).
Like CAAT, FRL fine-tunes a pre-trained robust model (`hot_start.pt`): set train.init_from.
Validation split: 300 clean images per class (FRL's), where the multipliers are fitted.
Deviation kept from the scripts: their loss normalises jointly, sum(w0 CE + beta w1 KL) /
sum(w0 + w1) (`method.normalise = "joint"`); CAAT's formula normalises each term ("separate").
"""

from hamjax.config import base_config, method_config
from hamjax.data.scenarios import apply_scenario
from hamjax.errors import ConfigError

_FLAVOURS = {"rw": "frl_rw", "rm": "frl_rm", "rwrm": "frl_rwrm"}


def get_config(variant: str = ""):
    tokens = [t for t in variant.replace(",", "+").split("+") if t]
    flavours = [t for t in tokens if t in _FLAVOURS]
    if len(flavours) > 1:
        raise ConfigError(f"config variant {variant!r} names more than one FRL flavour")
    name = _FLAVOURS[flavours[0]] if flavours else "frl_rwrm"

    config = base_config()
    config.seed = 100
    config.data.name = "cifar10"
    config.data.val_size = 3000  # 300 per class (stratified), as in the FRL loader
    config.model.name = "preact_resnet18"
    config.method = method_config(name)
    config.method.beta = 1.0
    config.method.delta0 = 0.1
    config.method.delta1 = 0.1
    config.method.rate1 = 0.05
    config.method.rate2 = 0.1
    config.method.lim = 0.3 if name == "frl_rm" else 0.5
    config.method.margin_max = 3.0  # utils_frl2.py
    config.method.normalise = "joint"
    config.method.frl_split = "val"
    config.attack.eps = 8 / 255
    config.attack.step_size = 2 / 255
    config.attack.steps = 10
    config.train.epochs = 120
    config.train.batch_size = 128
    config.train.lr = 1e-3
    config.train.lr_schedule = "piecewise"
    config.train.lr_boundaries = (40, 80)
    config.train.lr_values = (1e-4, 1e-5)
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.init_from = ""
    config.eval.eps = 8 / 255
    config.eval.step_size = 2 / 255
    config.eval.steps = 20
    apply_scenario(config.data, "+".join(t for t in tokens if t not in _FLAVOURS))
    return config
