"""Shared fixtures: small CNNs trained here on real Fashion-MNIST (once per test session)."""

from __future__ import annotations

import dataclasses
import os
import shutil

if os.environ.get("HAMJAX_TEST_FAST_COMPILE", "1") != "0":
    # The suite is dominated by XLA:CPU compiles of small programs: LLVM at -O0 compiles them
    # ~35% faster and runs the few training-heavy tests ~10-30% slower. Numerics under test do
    # not depend on it (both sides of every comparison compile alike); HAMJAX_TEST_FAST_COMPILE=0
    # tests with XLA's default optimisation. Set before jax creates its CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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
    step = jax.jit(make_train_step(ctx, method_obj), compiler_options=_training_options())
    for i, batch in enumerate(iterate_batches(splits.train, BATCH, seed, 0)):
        if i == steps:
            break
        state, _ = step(state, batch)
    return splits, ctx, jax.block_until_ready(state)


def _training_options() -> dict[str, str]:
    """The fixture trains for minutes: it compiles its step at XLA's default optimisation level
    (3, not the suite's -O0) with hamjax's CPU options, as the library's own runs do (about 2x
    faster than -O0 with XLA's defaults on the 2-core AVX2 machine)."""
    from hamjax import compiler_options

    return {**(compiler_options() or {}), "xla_backend_optimization_level": "3"}


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


def pytest_collection_modifyitems(config, items):
    """Slow real-data tests first: under `pytest -n auto --dist loadfile` their file starts at
    once on one worker while the other workers take the rest, instead of finishing last."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config):
    """A persistent compilation cache for the session (one per xdist worker): many tests compile
    the same step for the same tiny model and shapes; XLA:CPU compiles dominate the suite's time.
    HAMJAX_TEST_COMPILE_CACHE=0 turns it off."""
    if os.environ.get("HAMJAX_TEST_COMPILE_CACHE", "1") == "0":
        return
    import tempfile

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = os.path.join(tempfile.gettempdir(), f"hamjax-test-jax-cache-{os.getpid()}-{worker}")
    config.hamjax_compile_cache = path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    path = getattr(config, "hamjax_compile_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)
