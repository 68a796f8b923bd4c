"""Weight averaging: the reference's hand case (EMA and CFA's FAWA), DeepMind's warmed-up EMA
inside the jitted step against NumPy, config validation, and whole runs: a run stopped mid-epoch
resumes to the uninterrupted run's averaged weights and report; FAWA's epoch rule in the trainer;
`hamjax.evaluate` loads the averaged weights."""

from __future__ import annotations

import dataclasses
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from digits_configs import digits_config
from test_frl import make_batch, make_ctx

from hamjax.averaging import ema_decay_at, ema_step, evaluation_params, fawa_update
from hamjax.checkpoint import Checkpointer
from hamjax.config import base_config, validate_config
from hamjax.errors import ConfigError, TrainingInterrupted
from hamjax.evaluation.workdir import load_run
from hamjax.methods import get_method
from hamjax.state import create_train_state
from hamjax.train.loop import Trainer
from hamjax.train.report import numeric_scalars
from hamjax.train.step import make_train_step


def test_hand_computed_fawa_and_ema():
    """decay 0.88, threshold 0.2, R_min=[0.1, 0.25, 0.3], w=[1, 2, 3]: FAWA keeps its init,
    then copies 2, then 0.88*2 + 0.12*3 = 2.12; the EMA (first update copies) 1, 1.12, 1.3456."""
    init = {"w": jnp.float32(-7.0)}
    fawa = {"params": init, "count": jnp.int32(0)}
    seen = []
    for w, r_min in zip((1.0, 2.0, 3.0), (0.1, 0.25, 0.3), strict=True):
        fawa, _ = fawa_update(fawa, {"w": jnp.float32(w)}, r_min, threshold=0.2, decay=0.88)
        seen.append(float(fawa["params"]["w"]))
    np.testing.assert_allclose(seen, [-7.0, 2.0, 2.12], rtol=1e-6)
    assert int(fawa["count"]) == 2
    # The rule is R_min >= threshold: at the threshold it averages, just below it does not.
    at, changed = fawa_update(fawa, {"w": jnp.float32(4.0)}, 0.2, threshold=0.2, decay=0.88)
    assert changed and float(at["params"]["w"]) == pytest.approx(0.88 * 2.12 + 0.12 * 4.0)
    below, changed = fawa_update(fawa, {"w": jnp.float32(4.0)}, 0.19, threshold=0.2, decay=0.88)
    assert not changed and float(below["params"]["w"]) == pytest.approx(2.12)

    ema = {"params": init, "count": jnp.int32(0)}
    seen = []
    for w in (1.0, 2.0, 3.0):
        # A late step: the warm-up min(tau, (1 + t) / (10 + t)) is tau = 0.88.
        ema = ema_step(ema, {"w": jnp.float32(1.0)}, {"w": jnp.float32(w)}, 10**6, 0.88)
        seen.append(float(ema["params"]["w"]))
    np.testing.assert_allclose(seen, [1.0, 1.12, 1.3456], rtol=1e-6)


def test_warmed_up_decay():
    np.testing.assert_allclose(
        [float(ema_decay_at(t, 0.995)) for t in (0, 1, 10, 10**5)],
        [1 / 10, 2 / 11, 11 / 20, 0.995], rtol=1e-6)


def _with_ema(ctx, decay: float):
    """The step context with `train.ema_decay` set (its config is frozen)."""
    config = ml_collections.ConfigDict(ctx.config.to_dict())
    config.train.ema_decay = decay
    return dataclasses.replace(ctx, config=ml_collections.FrozenConfigDict(config))


def test_ema_in_the_train_step_matches_numpy():
    """Three jitted steps: avg starts at the initial weights, avg <- d avg + (1 - d) params with
    d = min(tau, (1 + t) / (10 + t)) after step t; the online weights are those of a run without
    averaging."""
    method = get_method("pgd_at")
    ctx = make_ctx("pgd_at")
    ctx_ema = _with_ema(ctx, 0.995)
    plain, state = (create_train_state(c, method, seed=0) for c in (ctx, ctx_ema))
    assert plain.averaged == {}
    step_plain = jax.jit(make_train_step(ctx, method))
    step_ema = jax.jit(make_train_step(ctx_ema, method))
    avg = jax.tree.map(np.asarray, state.params)
    for t in range(3):
        batch = make_batch(t)
        plain, _ = step_plain(plain, batch)
        state, _ = step_ema(state, batch)
        d = min(0.995, (1 + t) / (10 + t))
        avg = jax.tree.map(lambda a, p, d=d: d * a + (1 - d) * np.asarray(p), avg, state.params)
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for got, want in zip(jax.tree.leaves(state.averaged["params"]), jax.tree.leaves(avg),
                         strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert int(state.averaged["count"]) == 3
    assert evaluation_params(state) is state.averaged["params"]


def test_a_step_that_applies_no_update_averages_the_unchanged_weights():
    """A NaN pixel makes the step non-finite, so its update is not applied (as HAM's empty
    batches are not): the average blends the weights kept, not the rejected ones, and stays
    finite (here: equal to the initial weights)."""
    method = get_method("pgd_at")
    ctx = make_ctx("pgd_at")
    ctx = _with_ema(ctx, 0.995)
    state = create_train_state(ctx, method, seed=0)
    batch = make_batch(0)
    batch["image"][0, 0, 0, 0] = np.nan
    new, metrics = jax.jit(make_train_step(ctx, method))(state, batch)
    assert float(metrics["update_applied"]) == 0.0
    for got, start in zip(jax.tree.leaves(new.averaged["params"]), jax.tree.leaves(state.params),
                          strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(start), rtol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", 1.0, r"config\.train\.ema_decay"),
    ("ema_decay", -0.1, r"config\.train\.ema_decay"),
    ("fawa_decay", 1.5, r"config\.train\.fawa_decay"),
    ("fawa_threshold", 1.5, r"config\.train\.fawa_threshold"),
])
def test_bad_values_are_named(field, value, message):
    config = base_config()
    config.train[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_ema_and_fawa_exclude_each_other_and_fawa_needs_val():
    config = base_config()
    config.train.ema_decay, config.train.fawa_decay = 0.995, 0.88
    with pytest.raises(ConfigError, match=r"config\.train\.fawa_decay.*ema_decay"):
        validate_config(config)
    config.train.ema_decay, config.data.val_size = 0.0, 0
    with pytest.raises(ConfigError, match=r"config\.train\.fawa_decay.*val_size"):
        validate_config(config)


def averaging_config(method: str = "pgd_at", **fields):
    """10 steps of 64 per epoch, 2 epochs, checkpoints every 7 steps (one lands mid-epoch)."""
    return digits_config(method, train_size=640, lr_drop=(1, 0.005), checkpoint_every_steps=7,
                         **fields)


class StopsAfter(Trainer):
    """A Trainer that gets a SIGTERM at its `stop_after`-th stop check (one per epoch start and
    one per step but the epoch's last): 15 stops after step 14, mid-epoch 2 of 10-step epochs.
    The count is the instance's own, so tests sharing this class cannot disturb each other."""

    def __init__(self, *args, stop_after: int = 15, **kwargs):
        super().__init__(*args, **kwargs)
        ask = self.signals.should_stop
        self.checks_left = stop_after

        def counted() -> bool:
            self.checks_left -= 1
            if self.checks_left == 0:
                self.signals.received = signal.SIGTERM
            return ask()

        self.signals.should_stop = counted


@pytest.mark.slow
def test_resume_mid_epoch_with_ema_equals_a_straight_run(tmp_path):
    """HAM (train_at_m, per-class hard counts in its method state) with the per-step EMA:
    stopped mid-epoch 2 and resumed, the run ends with the straight run's weights, averaged
    weights, per-class records and report; the report and `load_run` use the averaged
    weights."""
    config = averaging_config("ham", warmup_epochs=1, mining_step=1, easy_examples="train_at_m")
    config.train.ema_decay = 0.99
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    reports = [Trainer(config, straight).run()]
    with pytest.raises(TrainingInterrupted):
        StopsAfter(config, stopped).run()
    saved = Checkpointer(stopped, read_only=True)
    assert saved.latest_step() is not None and saved.read_meta().get("partial_epoch")
    saved.close()
    reports.append(Trainer(config, stopped).run())
    for key in ("last", "best_on_val"):
        a, b = (r["results"][key] for r in reports)
        assert a["clean"]["per_class"] == b["clean"]["per_class"]
        assert a["robust"]["per_class"] == b["robust"]["per_class"]
    assert reports[0]["cost"] == {**reports[1]["cost"],
                                  "compile_seconds": reports[0]["cost"]["compile_seconds"],
                                  "train_seconds_excluding_compile":
                                      reports[0]["cost"]["train_seconds_excluding_compile"]}
    states = []
    for workdir in (straight, stopped):
        ckpt = Checkpointer(workdir, read_only=True)
        states.append(ckpt.restore_host())
        ckpt.close()
    assert "averaged" in states[0] and int(states[0]["averaged"]["count"]) == int(
        states[0]["step"])
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    run = load_run(straight, "last", log=lambda _: None)
    for got, avg, online in zip(jax.tree.leaves(run.variables["params"]),
                                jax.tree.leaves(states[0]["averaged"]["params"]),
                                jax.tree.leaves(states[0]["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), avg)
        assert got.shape == online.shape
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(states[0]["averaged"]["params"]), jax.tree.leaves(states[0]["params"]),
        strict=True))
    assert reports[0]["epochs"][-1]["averaging"]["count"] == int(states[0]["step"])
    per_class = [r["epochs"][-1]["method"]["hard_fraction_per_class"] for r in reports]
    assert per_class[0] == per_class[1] and len(per_class[0]) == 10
    assert all(f is not None and 0 <= f <= 1 for f in per_class[0])
    assert reports[0]["epochs"][0]["method"]["hard_fraction_per_class"] == [None] * 10  # warm-up


def test_numeric_record_scalars_reach_tensorboard():
    scalars = numeric_scalars("method", {"hard_fraction_per_class": [0.5, None, 0.25],
                                         "lambdas": {"clean": [1, 2]}, "note": "x"})
    assert scalars == {"method/hard_fraction_per_class/0": 0.5,
                       "method/hard_fraction_per_class/2": 0.25,
                       "method/lambdas/clean/0": 1.0, "method/lambdas/clean/1": 2.0}


def test_fawa_in_the_trainer(tmp_path):
    """MART with FAWA at threshold 0 averages after every epoch (count 2; the first a copy of
    the online weights); the per-class report and `load_run` use the average."""
    threshold, updates = 0.0, 2
    config = averaging_config("mart")
    config.train.fawa_decay, config.train.fawa_threshold = 0.88, threshold
    workdir = str(tmp_path / "fawa")
    report = Trainer(config, workdir).run()
    records = [e["averaging"] for e in report["epochs"]]
    assert [r["updated"] for r in records] == [threshold == 0.0] * 2
    assert records[-1]["count"] == updates
    assert "val_online" in records[0]
    assert len(report["results"]["last"]["robust"]["per_class"]) == 10
    ckpt = Checkpointer(workdir, read_only=True)
    state = ckpt.restore_host()
    ckpt.close()
    run = load_run(workdir, "last", log=lambda _: None)
    expected = state["averaged"]["params"] if updates else state["params"]
    for got, want in zip(jax.tree.leaves(run.variables["params"]), jax.tree.leaves(expected),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
