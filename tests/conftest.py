"""Shared fixtures: small CNNs trained here on real Fashion-MNIST (once per test session)."""

from __future__ import annotations

import dataclasses
import os

import jax
import pytest

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Standard training needs ~600 steps of 64 for >80% clean accuracy; PGD-AT steps cost 4x.
TRAIN_STEPS = {"standard": 600, "pgd_at": 250}
BATCH = 64
EPS = 0.1


@dataclasses.dataclass
class TrainedModels:
    """Small CNNs trained with the library's own step, plus what is needed to attack them."""

    splits: object
    ctx: object
    states: dict  # method name -> TrainState

    def variables(self, method: str) -> dict:
        state = self.states[method]
        return {"params": state.params, "batch_stats": state.batch_stats}

    def logits_fn(self, method: str):
        from hamjax.models import make_logits_fn

        return make_logits_fn(self.ctx.model, self.variables(method), bn_mode="eval")


def _fashion_mnist_config(method: str):
    from hamjax.config import base_config, method_config

    c = base_config()
    c.data.name = "fashion_mnist"
    c.data.val_size = 0
    c.data.augment.crop_pad = 0
    c.data.augment.flip = False
    c.model.name = "small_cnn"
    c.method = method_config(method)
    c.attack.eps, c.attack.step_size, c.attack.steps = EPS, 0.04, 3
    c.train.batch_size = BATCH
    c.train.lr = 0.05
    c.train.lr_schedule = "cosine"
    c.train.epochs = 1
    return c


def train_steps(method: str, steps: int, seed: int = 0):
    """`steps` real train steps of `method` on Fashion-MNIST with the library's jitted step."""
    from hamjax.data import iterate_batches, load_splits
    from hamjax.methods import get_method
    from hamjax.train import build_context, create_train_state, make_train_step

    config = _fashion_mnist_config(method)
    splits = load_splits(config.data, seed=seed)
    # Cosine schedule over exactly `steps` steps (epochs=1 would span the whole split).
    config.train.epochs = 1
    ctx = build_context(config, splits)
    ctx = dataclasses.replace(ctx, lr_fn=_cosine(config.train.lr, steps))
    method_obj = get_method(method)
    state = create_train_state(ctx, method_obj, seed)
    step = jax.jit(make_train_step(ctx, method_obj))
    for i, batch in enumerate(iterate_batches(splits.train, BATCH, seed, 0)):
        if i == steps:
            break
        state, _ = step(state, batch)
    return splits, ctx, jax.block_until_ready(state)


def _cosine(lr: float, steps: int):
    import optax

    return optax.cosine_decay_schedule(lr, steps)


@pytest.fixture(scope="session")
def fashion_mnist_models() -> TrainedModels:
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("needs the Debian package dataset-fashion-mnist (apt-get install "
                    "dataset-fashion-mnist); .ci/run installs it")
    states = {}
    splits = ctx = None
    for method in ("standard", "pgd_at"):
        splits, ctx, states[method] = train_steps(method, TRAIN_STEPS[method])
    return TrainedModels(splits=splits, ctx=ctx, states=states)
