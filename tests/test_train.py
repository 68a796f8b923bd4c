"""The generic trainer: one real step per method, config validation, schedules, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from launching import launch, saved_steps

from hamjax.checkpoint import Checkpointer
from hamjax.config import base_config, method_config, validate_config
from hamjax.errors import CheckpointError, ConfigError
from hamjax.methods import get_method
from hamjax.train import build_context, create_train_state, make_lr_fn, make_train_step
from hamjax.train.loop import Trainer


def tiny_config(method: str = "pgd_at"):
    """CIFAR-10 through TFDS (mocked in tests), small CNN, 2-step attacks."""
    c = base_config()
    c.data.name = "cifar10"
    c.data.source = "tfds"
    c.data.val_size = 20
    c.model.name = "small_cnn"
    c.method = method_config(method)
    c.attack.steps = 2
    c.eval.steps = 2
    c.train.batch_size = 8
    c.train.epochs = 1
    c.train.lr_boundaries = ()
    c.train.lr_values = ()
    c.eval.batch_size = 16
    if "mining_step" in c.method:
        c.method.mining_step = 1
    return c


# One method per data path and step family: plain, TRADES's KL, HAM's compaction, CAAT's meta
# batch, FRL's and WAT's validation-driven state, CFA's class-wise margins. Every method's step
# is also run (on a tiny model) in tests/test_steps_per_dispatch.py.
ON_MOCK_CIFAR = ("standard", "pgd_at", "trades", "ham", "caat", "frl_rwrm", "wat", "cfa")


@pytest.mark.parametrize("method_name", ON_MOCK_CIFAR)
def test_one_real_train_step_per_method_under_tfds_mock(method_name):
    """These methods run one jitted step on mocked CIFAR-10 and change the weights."""
    from hamjax.data import iterate_batches, load_splits

    config = tiny_config(method_name)
    if method_name == "caat":
        config.data.meta_per_class = 2
    validate_config(config)
    with tfds.testing.mock_data(num_examples=64):
        splits = load_splits(config.data, seed=config.seed)
    method = get_method(method_name)
    ctx = build_context(config, splits)
    state = create_train_state(ctx, method, seed=0)
    batch = next(iterate_batches(splits.train, 8, seed=0, epoch=0))
    if method.needs_meta_batch:
        batch["meta_image"] = batch["image"]
        batch["meta_label"] = batch["label"]
    step = jax.jit(make_train_step(ctx, method))
    before = jax.tree.map(np.asarray, state.params)
    new_state, metrics = step(state, batch)
    assert int(new_state.step) == 1
    assert np.isfinite(float(metrics["loss"]))
    assert float(new_state.ledger.forward) > 0
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != np.asarray(b)), before,
                                           new_state.params))
    if float(metrics["update_applied"]):
        assert any(changed)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("method.name", "pdg_at", "config.method.name='pdg_at' is not a known method"),
        ("attack.eps", 8.0, "config.attack.eps=8.0"),
        ("attack.steps", 0, "config.attack.steps=0"),
        ("eval.eps", -0.1, "config.eval.eps=-0.1"),
        ("train.epochs", 0, "config.train.epochs=0"),
        ("attack.bn_mode", "train", "config.attack.bn_mode='train'"),
        ("model.name", "resnet5000", "model.name='resnet5000'"),
        ("data.name", "imagenet22k", "imagenet22k"),
    ],
)
def test_bad_config_values_are_rejected_naming_the_field(path, value, message):
    config = tiny_config()
    section, field = path.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate_config(config)


def test_piecewise_schedule_follows_epochs():
    config = base_config().train
    config.lr, config.lr_boundaries, config.lr_values = 0.1, (2, 3), (0.01, 0.001)
    lr = make_lr_fn(config, steps_per_epoch=10)
    got = [float(lr(s)) for s in (0, 19, 20, 29, 30, 1000)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_skipped_update_leaves_state_untouched():
    """apply_update=False (HAM's empty hard set) keeps weights, optimiser and BN stats."""
    from hamjax.data import iterate_batches, load_splits
    from hamjax.methods import Method
    from hamjax.methods.baselines import standard_loss

    def never_update(params, state, batch, rng, ctx):
        loss, aux = standard_loss(params, state, batch, rng, ctx)
        aux["apply_update"] = jnp.asarray(False)
        return loss, aux

    config = tiny_config("standard")
    with tfds.testing.mock_data(num_examples=32):
        splits = load_splits(config.data, seed=1)
    ctx = build_context(config, splits)
    method = Method("never", never_update)
    state = create_train_state(ctx, method, seed=0)
    batch = next(iterate_batches(splits.train, 8, seed=0, epoch=0))
    new_state, metrics = jax.jit(make_train_step(ctx, method))(state, batch)
    assert float(metrics["update_applied"]) == 0.0
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                    jax.tree.leaves((new_state.params, new_state.batch_stats,
                                     new_state.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.step) == 1  # the schedule and the data position still advance


RESUME_CONFIG = textwrap.dedent(
    """
    from hamjax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "digits"
        c.data.val_size = 100
        c.data.augment.crop_pad = 1
        c.data.augment.flip = False
        c.model.name = "small_cnn"
        c.method.name = "pgd_at"
        c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 3
        c.eval.eps, c.eval.step_size, c.eval.steps = 0.1, 0.03, 3
        c.eval.num_examples = 50
        c.train.epochs = 2
        c.train.batch_size = 32
        c.train.lr = 0.05
        c.train.lr_boundaries = (1,)
        c.train.lr_values = (0.005,)
        c.train.checkpoint_every_steps = 7
        c.train.log_every_steps = 1000
        return c
    """
)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    """SIGKILL a run mid-epoch after a checkpoint, rerun the same command: final weights and
    reported numbers equal those of an uninterrupted run."""
    config_path = tmp_path / "resume_cfg.py"
    config_path.write_text(RESUME_CONFIG)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")

    cache = str(tmp_path / "jax_cache")
    proc = launch(config_path, killed, cache_dir=cache)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(s >= 7 for s in saved_steps(killed)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "report.json"))

    for workdir in (killed, straight):
        proc = launch(config_path, workdir, cache_dir=cache)
        _, err = proc.communicate(timeout=600)
        # A fatal error's dump starts with the thread stacks and ends with a module list: show
        # both ends.
        assert proc.returncode == 0, err[:4000] + "\n...\n" + err[-1000:]

    reports = [json.load(open(os.path.join(w, "report.json"))) for w in (straight, killed)]
    for key in ("last", "best_on_val"):
        a, b = (r["results"][key] for r in reports)
        assert a["clean"]["per_class"] == b["clean"]["per_class"]
        assert a["robust"]["per_class"] == b["robust"]["per_class"]
    assert reports[0]["cost"]["forward_passes"] == reports[1]["cost"]["forward_passes"]

    from hamjax.config import base_config as _base  # noqa: F401  (keeps import side effects)

    states = []
    for workdir in (straight, killed):
        ckpt = Checkpointer(workdir)
        step = ckpt.latest_step()
        states.append(_restore_raw(ckpt, step))
        ckpt.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def _restore_raw(ckpt: Checkpointer, step: int):
    return ckpt.restore_host(step=step)  # host arrays: the launches may have had 2 CPU devices


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    """A damaged checkpoint never silently restarts the run from scratch."""
    config = tiny_config("standard")
    config.data.name = "digits"
    config.data.source = "auto"
    config.data.val_size = 50
    config.data.augment.crop_pad = 1
    config.train.batch_size = 32
    config.train.checkpoint_every_steps = 2
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir)
    state, meta = trainer.initial_state()
    trainer._save(state, meta)
    trainer.checkpointer.close()
    step_dir = os.path.join(workdir, "checkpoints", "0", "state")
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name not in ("commit_success.txt",):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")
    with pytest.raises(CheckpointError, match="cannot restore the checkpoint"):
        Trainer(config, workdir).initial_state()


def test_checkpoint_from_another_config_is_refused(tmp_path):
    config = tiny_config("standard")
    config.data.name = "digits"
    config.data.source = "auto"
    config.data.val_size = 50
    config.data.augment.crop_pad = 1
    config.train.batch_size = 32
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir)
    state, meta = trainer.initial_state()
    trainer._save(state, meta)
    trainer.checkpointer.close()
    config.method = method_config("pgd_at")
    with pytest.raises(CheckpointError, match=r"method\.name: 'standard' in the checkpoint, "
                                              r"'pgd_at' now"):
        Trainer(config, workdir).initial_state()


def test_epoch_means_average_training_metrics_over_the_steps_that_trained():
    """Four steps, two of which applied no update (loss and robust accuracy recorded as 0 there,
    as HAM's gathering steps do): loss and train_robust_acc are the means of the two that
    trained; every other metric is the mean over all four steps."""
    from hamjax.train.loop import epoch_means

    steps = [  # (loss, train_robust_acc, hard_fraction, update_applied)
        (1.2, 0.25, 0.2, 1.0), (0.0, 0.0, 0.3, 0.0), (0.8, 0.75, 0.1, 1.0), (0.0, 0.0, 0.2, 0.0)]
    sums = {name: sum(s[i] for s in steps)
            for i, name in enumerate(("loss", "train_robust_acc", "hard_fraction",
                                      "update_applied"))}
    means = epoch_means(sums, len(steps))
    assert means["loss"] == pytest.approx(1.0) and means["train_robust_acc"] == pytest.approx(0.5)
    assert means["hard_fraction"] == pytest.approx(0.2)
    assert means["update_applied"] == pytest.approx(0.5)
    # Every step trained (any other method): the plain means.
    assert epoch_means({"loss": 3.0, "update_applied": 3.0}, 3) == {"loss": 1.0,
                                                                   "update_applied": 1.0}
    assert epoch_means({"loss": 0.0, "update_applied": 0.0}, 2)["loss"] == 0.0  # none trained
