"""Budgets more than one setup shares, each written once (read with
`hamjax.config.config_module(__file__, "common.py")`)."""


def small_images(config) -> None:
    """The budget of the small CNN on small grey images (digits, Fashion-MNIST): eps 0.1 on
    [0, 1] pixels (the usual MNIST-family budget is 0.1-0.3), PGD-10 with step 0.025 (eps / 4)
    for training and PGD-20 for evaluation, SGD from lr 0.05, no flips (digits and garments
    are not mirror-symmetric)."""
    config.data.augment.flip = False
    config.model.name = "small_cnn"
    config.attack.eps = 0.1
    config.attack.step_size = 0.025
    config.attack.steps = 10
    config.eval.eps = 0.1
    config.eval.step_size = 0.025
    config.eval.steps = 20
    config.train.lr = 0.05
    config.train.lr_values = (0.005, 0.0005)
    config.train.weight_decay = 5e-4


def official_finetune(config) -> None:
    """The CAAT and FRL scripts' schedule: they fine-tune a robust model (`hot_start.pt`; here
    `train.init_from`, a finished robust run's workdir) at lr 1e-3, x0.1 at epochs 40 and 80,
    weight decay 5e-4, seed 100; from scratch these short runs at lr 1e-3 are far too short."""
    config.seed = 100
    config.train.lr = 1e-3
    config.train.lr_schedule = "piecewise"
    config.train.lr_boundaries = (40, 80)
    config.train.lr_values = (1e-4, 1e-5)
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.init_from = ""
