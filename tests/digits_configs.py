"""The one builder of the tiny in-process trainer runs: scikit-learn's 8x8 digits (bundled, real),
the small CNN, short attacks. Each test states only the values it needs to differ.

(The config files that tests launch in subprocesses stay written out in full, as a user writes
one.)"""

from __future__ import annotations

import ml_collections

from hamjax.config import base_config, method_config

AttackSettings = tuple[float, float, int]  # (eps, step_size, steps)


def digits_config(method: str = "pgd_at", *, train_size: int = 0, val_size: int = 100,
                  crop_pad: int = 1, batch_size: int = 64, epochs: int = 2, lr: float = 0.05,
                  lr_drop: tuple[int, float] | None = None,
                  attack: AttackSettings = (0.1, 0.03, 3),
                  evaluation: AttackSettings = (0.1, 0.03, 3), eval_examples: int = 50,
                  eval_batch_size: int | None = None, checkpoint_every_steps: int = 1000,
                  log_every_steps: int = 1000, **method_fields) -> ml_collections.ConfigDict:
    """A digits run of `method` (its config fields overridden by `method_fields`).

    train_size: 0 keeps the whole training pool; lr_drop: (epoch, lr from then on), else a
    constant lr; eval_batch_size: None keeps the base config's.
    """
    c = base_config()
    c.data.name = "digits"
    c.data.train_size = train_size
    c.data.val_size = val_size
    c.data.augment.crop_pad = crop_pad
    c.data.augment.flip = False
    c.model.name = "small_cnn"
    c.method = method_config(method, **method_fields)
    c.attack.eps, c.attack.step_size, c.attack.steps = attack
    c.eval.eps, c.eval.step_size, c.eval.steps = evaluation
    c.eval.num_examples = eval_examples
    if eval_batch_size is not None:
        c.eval.batch_size = eval_batch_size
    c.train.batch_size = batch_size
    c.train.epochs = epochs
    c.train.lr = lr
    if lr_drop is None:
        c.train.lr_schedule = "constant"
    else:
        c.train.lr_boundaries, c.train.lr_values = (lr_drop[0],), (lr_drop[1],)
    c.train.checkpoint_every_steps = checkpoint_every_steps
    c.train.log_every_steps = log_every_steps
    return c
