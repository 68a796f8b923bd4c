"""The generic trainer: one loop, methods plugged in by name.

Notebook use: build a `StepContext` with `build_context` (`hamjax.run`), a state with
`create_train_state` (`hamjax.state`), and call `hamjax.jit(make_train_step(ctx,
get_method(name)))` on your own batches
(`jax.jit` with `hamjax.compiler_options()`: the CPU settings hamjax measured fastest).
"""

from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.run import build_context
from hamjax.sharding import make_mesh
from hamjax.state import StepContext, TrainState, create_train_state
from hamjax.train.loop import Trainer, train_and_evaluate
from hamjax.train.report import summarize
from hamjax.train.step import make_train_step

__all__ = [
    "StepContext", "TrainState", "Trainer", "build_context", "create_train_state",
    "make_lr_fn", "make_mesh", "make_optimizer", "make_train_step",
    "summarize", "train_and_evaluate",
]
