"""bfloat16 as a supported option: bf16 compute in the train step with float32 parameters,
optimiser state, BN statistics and logits; evaluation attacks in float32 by default; float16
refused before anything compiles.

Tiny on purpose (sklearn digits, small CNN, batch 16, 2-step attacks): XLA:CPU compiles each step
in seconds, and bf16 convolutions are slow on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.models import (
    PreActResNet18,
    SmallCNN,
    WideResNet,
    apply_model,
    build_model,
    default_model_config,
    eval_model,
)
from hamjax.train import build_context, create_train_state, make_train_step

BATCH = 16


def _config(dtype: str = "float32"):
    c = base_config()
    c.data.name = "digits"
    c.data.val_size = 40
    c.model.name = "small_cnn"
    c.model.dtype = dtype
    c.method = method_config("pgd_at")
    c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 2
    c.eval.eps, c.eval.step_size, c.eval.steps = 0.1, 0.03, 2
    c.train.batch_size = BATCH
    c.train.epochs = 1
    c.train.lr_boundaries = ()
    c.train.lr_values = ()
    return c


def _conv_dtypes(jaxpr) -> list[jnp.dtype]:
    """Operand dtypes of every convolution in a jaxpr, nested jaxprs (loops, custom VJPs) too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.extend(v.aval.dtype for v in eqn.invars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    found.extend(_conv_dtypes(inner))
    return found


@pytest.fixture(scope="module")
def digits():
    from hamjax.data import iterate_batches, load_splits

    splits = load_splits(_config().data, seed=0)
    batch = next(iterate_batches(splits.train, BATCH, seed=0, epoch=0))
    return splits, batch


@pytest.fixture(scope="module")
def steps(digits):
    """(context, initial state, new state, metrics) per dtype, from the same state and batch."""
    splits, batch = digits
    method = get_method("pgd_at")
    out = {}
    state = None
    for dtype in ("float32", "bfloat16"):
        config = _config(dtype)
        validate_config(config)
        ctx = build_context(config, splits)
        if state is None:  # float32 parameters either way: one initial state for both
            state = create_train_state(ctx, method, seed=0)
        step = make_train_step(ctx, method)
        new_state, metrics = jax.jit(step)(state, batch)
        out[dtype] = (ctx, step, state, new_state, metrics)
    return out


def test_bf16_step_keeps_float32_state_and_matches_float32_loss(steps):
    ctx, _, state, new_state, metrics = steps["bfloat16"]
    assert jnp.dtype(ctx.model.dtype) == jnp.bfloat16
    assert int(new_state.step) == 1
    for tree in ("params", "batch_stats", "opt_state"):
        leaves = [x for x in jax.tree.leaves(getattr(new_state, tree))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        assert leaves, tree
        assert all(x.dtype == jnp.float32 for x in leaves), tree
    loss16 = float(metrics["loss"])
    loss32 = float(steps["float32"][4]["loss"])
    assert np.isfinite(loss16)
    np.testing.assert_allclose(loss16, loss32, rtol=5e-2)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                           state.params, new_state.params))
    assert any(changed)


def test_bf16_logits_are_float32(steps, digits):
    ctx, _, state, _, _ = steps["bfloat16"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    fn = lambda v, x: apply_model(ctx.model, v, x, bn_mode="train")
    logits, stats = jax.eval_shape(fn, variables, digits[1]["image"])
    assert logits.dtype == jnp.float32
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats))


def test_bf16_step_convolves_in_bf16(steps, digits):
    """Every conv of the step (attack, forward and backward) runs in bf16; none under float32."""
    for dtype, want in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        _, step, state, _, _ = steps[dtype]
        convs = _conv_dtypes(jax.make_jaxpr(step)(state, digits[1]).jaxpr)
        assert len(convs) >= 2 * 3 * 2, dtype  # 3 convs x (forward + backward) at the least
        assert set(convs) == {jnp.dtype(want)}, (dtype, set(convs))


def test_bf16_activations_are_bf16(steps, digits):
    """Conv and BN outputs (the activations) are bf16; only the logits come back float32."""
    ctx, _, state, _, _ = steps["bfloat16"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    def run(v, x):
        return ctx.model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"])

    logits, captured = jax.eval_shape(run, variables, digits[1]["image"])
    inter = captured["intermediates"]
    for name in ("conv1", "bn1", "conv3", "bn3"):
        assert inter[name]["__call__"][0].dtype == jnp.bfloat16, name
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("field", ["model.dtype", "eval.dtype"])
def test_float16_is_rejected_pointing_to_bfloat16(field):
    config = _config()
    section, name = field.split(".")
    config[section][name] = "float16"
    with pytest.raises(ConfigError, match=rf"config\.{field}='float16'.*loss scaling.*bfloat16"):
        validate_config(config)


@pytest.mark.parametrize("field", ["model.dtype", "eval.dtype"])
def test_unknown_dtype_is_rejected_naming_the_field(field):
    config = _config()
    section, name = field.split(".")
    config[section][name] = "int8"
    with pytest.raises(ConfigError, match=rf"config\.{field}='int8'"):
        validate_config(config)


def test_build_model_and_eval_model_refuse_float16():
    """The model builder refuses it too (configs that skip validate_config, user code)."""
    cfg = default_model_config()
    cfg.name, cfg.dtype = "small_cnn", "float16"
    with pytest.raises(ConfigError, match="model.dtype.*loss scaling.*bfloat16"):
        build_model(cfg, 10)
    with pytest.raises(ConfigError, match="eval.dtype.*bfloat16"):
        eval_model(SmallCNN(10), "float16")


def test_eval_dtype_defaults_to_float32():
    assert base_config().eval.dtype == "float32"


@pytest.mark.parametrize("cls", [SmallCNN, PreActResNet18, WideResNet])
def test_eval_model_switches_only_the_dtype(cls):
    assert "dtype" in {f.name for f in dataclasses.fields(cls)}
    model = cls(num_classes=7, dtype="bfloat16")
    evaluated = eval_model(model, "float32")
    assert jnp.dtype(evaluated.dtype) == jnp.float32
    assert evaluated.clone(dtype=model.dtype) == model  # every other field kept
    assert eval_model(model, "bfloat16") is model


@pytest.mark.parametrize("eval_dtype, want", [(None, jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_trainer_evaluates_bf16_model_in_eval_dtype(tmp_path, monkeypatch, eval_dtype, want):
    """The Trainer hands PGDEvaluator a float32 model by default when training in bf16."""
    import hamjax.train.loop as loop

    seen = {}

    class Recorder:
        def __init__(self, model, *args, **kwargs):
            seen["model"] = model

    monkeypatch.setattr(loop, "PGDEvaluator", Recorder)
    config = _config("bfloat16")
    if eval_dtype is not None:
        config.eval.dtype = eval_dtype
    trainer = loop.Trainer(config, str(tmp_path / "run"))
    trainer.checkpointer.close()
    assert jnp.dtype(trainer.ctx.model.dtype) == jnp.bfloat16
    assert jnp.dtype(seen["model"].dtype) == jnp.dtype(want)
