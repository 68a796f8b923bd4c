"""A run is never lost or poisoned: divergence stops it before a bad save, SIGTERM saves and
resumes bit-exactly, one run per workdir (the lock), project errors exit 2 without a traceback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from launching import launch

from hamjax import workdir_lock
from hamjax.checkpoint import Checkpointer
from hamjax.errors import CheckpointError, TrainingDivergedError, WorkdirLockedError

TINY_CONFIG = textwrap.dedent(
    """
    from hamjax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "digits"
        c.data.train_size = 320  # 20 steps of 16
        c.data.val_size = 0
        c.data.augment.crop_pad = 1
        c.data.augment.flip = False
        c.model.name = "small_cnn"
        c.method.name = "pgd_at"
        c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 2
        c.eval.eps, c.eval.step_size, c.eval.steps = 0.1, 0.03, 2
        c.eval.num_examples = 20
        c.train.epochs = 1
        c.train.batch_size = 16
        c.train.lr = 0.05
        c.train.lr_boundaries = ()
        c.train.lr_values = ()
        c.train.checkpoint_every_steps = 1000
        c.train.log_every_steps = 1
        return c
    """
)


def _tiny_config(**train):
    namespace: dict = {}
    exec(TINY_CONFIG, namespace)  # the same config the subprocess tests launch
    config = namespace["get_config"]()
    for key, value in train.items():
        config.train[key] = value
    return config


def _launch(config_path, workdir, cache_dir, *overrides) -> subprocess.Popen:
    """launch.py with stdout piped and one CPU device, as in this process, which reads the
    child's checkpoints back."""
    return launch(config_path, workdir, *overrides, cache_dir=cache_dir,
                  stdout=subprocess.PIPE, cpu_devices=1)


def _restore_raw(workdir, step=None):
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(workdir)
    manager = ckpt._managers["checkpoints"]
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    ckpt.close()
    return restored["state"]


# ------------------------------------------------------------------------------- divergence
def test_divergence_stops_with_a_clear_error_and_saves_nothing_bad(tmp_path):
    """lr=1e6 blows the weights up within a few steps: the run stops naming the step and the
    learning rate, every checkpoint left on disk is finite, and the lock is released."""
    from hamjax.train.loop import Trainer

    workdir = str(tmp_path / "run")
    config = _tiny_config(lr=1e6, checkpoint_every_steps=2, log_every_steps=1000)
    with pytest.raises(TrainingDivergedError) as info:
        Trainer(config, workdir).run()
    message = str(info.value)
    step = int(re.search(r"diverged at step (\d+)", message).group(1))
    assert "config.train.lr=1000000.0" in message and "lower it" in message
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                   if d.isdigit())
    assert steps and all(s < step for s in steps)
    assert f"(step {steps[-1]})" in message and "is kept" in message
    for saved in steps:
        for leaf in jax.tree.leaves(_restore_raw(workdir, saved)):
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.floating):
                assert np.all(np.isfinite(leaf)), f"non-finite values in checkpoint {saved}"
    assert not os.path.exists(workdir_lock.lock_path(workdir))


def test_non_finite_step_keeps_the_previous_state():
    """A step whose loss is NaN leaves weights, optimiser and BN statistics as they were."""
    import jax.numpy as jnp

    from hamjax.data import iterate_batches, load_splits
    from hamjax.methods import Method
    from hamjax.methods.baselines import standard_loss
    from hamjax.train import build_context, create_train_state, make_train_step

    def nan_loss(params, state, batch, rng, ctx):
        loss, aux = standard_loss(params, state, batch, rng, ctx)
        return loss * jnp.nan, aux

    config = _tiny_config()
    splits = load_splits(config.data, seed=0)
    ctx = build_context(config, splits)
    method = Method("nan", nan_loss)
    state = create_train_state(ctx, method, seed=0)
    batch = next(iterate_batches(splits.train, 16, seed=0, epoch=0))
    new_state, metrics = jax.jit(make_train_step(ctx, method))(state, batch)
    assert float(metrics["finite"]) == 0.0 and float(metrics["update_applied"]) == 0.0
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
                    jax.tree.leaves((new_state.params, new_state.batch_stats,
                                     new_state.opt_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------- the lock
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir, **holder) -> str:
    os.makedirs(workdir, exist_ok=True)
    path = workdir_lock.lock_path(workdir)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def test_lock_held_by_a_live_run_names_the_holder(tmp_path):
    holder = workdir_lock.holder_record(pid=os.getppid())  # alive, and not this process
    _write_lock(tmp_path, **holder)
    with pytest.raises(WorkdirLockedError) as info:
        workdir_lock.acquire(tmp_path)
    message = str(info.value)
    assert f"pid {os.getppid()}" in message and socket.gethostname() in message
    assert holder["started"] in message and str(tmp_path) in message


def test_lock_of_another_host_or_unreadable_is_never_taken(tmp_path):
    path = _write_lock(tmp_path, host="elsewhere", pid=_dead_pid(), started="then")
    with pytest.raises(WorkdirLockedError, match="on host elsewhere.*--break_lock"):
        workdir_lock.acquire(tmp_path)
    with open(path, "w") as f:
        f.write("{half a reco")
    with pytest.raises(WorkdirLockedError, match="unreadable lock file"):
        workdir_lock.acquire(tmp_path)


def test_stale_lock_is_taken_over_and_release_removes_it(tmp_path):
    _write_lock(tmp_path, **workdir_lock.holder_record(pid=_dead_pid()))
    path = workdir_lock.acquire(tmp_path)
    with open(path) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert [n for n in os.listdir(tmp_path) if n != ".lock"] == []  # no stale leftovers
    workdir_lock.release(path)
    assert not os.path.exists(path)


def test_lock_of_a_killed_but_unreaped_run_is_stale(tmp_path):
    """A zombie (dead, its parent has not waited for it yet) holds nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 60
    while time.time() < deadline and workdir_lock.pid_alive(proc.pid):
        time.sleep(0.05)
    try:
        assert proc.returncode is None  # not reaped: a zombie, not a free pid
        _write_lock(tmp_path, **workdir_lock.holder_record(pid=proc.pid))
        workdir_lock.release(workdir_lock.acquire(tmp_path))
    finally:
        proc.wait()


def test_release_removes_only_this_process_lock(tmp_path):
    path = _write_lock(tmp_path, **workdir_lock.holder_record(pid=os.getppid()))
    workdir_lock.release(path)
    assert os.path.exists(path)
    os.unlink(path)
    workdir_lock.release(workdir_lock.acquire(tmp_path))
    assert not os.path.exists(path)


def test_a_trainer_that_fails_to_build_releases_the_lock(tmp_path):
    from hamjax.data import DatasetNotFoundError
    from hamjax.train.loop import Trainer

    config = _tiny_config()
    config.data.name, config.data.source = "cifar10", "local"
    config.data.data_dir = str(tmp_path / "no_data")
    with pytest.raises(DatasetNotFoundError):
        Trainer(config, str(tmp_path / "run"))
    assert not os.path.exists(workdir_lock.lock_path(tmp_path / "run"))
    assert _created_in(tmp_path / "run") == []  # the data is loaded before any log or folder


def _created_in(workdir) -> list[str]:
    return sorted(os.listdir(workdir)) if os.path.exists(workdir) else []


def test_init_from_a_missing_run_is_refused_before_anything_is_created(tmp_path):
    from hamjax.errors import ConfigError
    from hamjax.train.loop import Trainer

    missing = tmp_path / "missing" / "run"
    with pytest.raises(ConfigError, match=re.escape(f"config.train.init_from='{missing}'")):
        Trainer(_tiny_config(init_from=str(missing)), str(tmp_path / "run"))
    assert not (tmp_path / "missing").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- launch.py
@pytest.mark.parametrize("overrides, message", [
    (["--config.method.name=pdg_at"], "config.method.name='pdg_at' is not a known method"),
    (["--config.data.name=cifar10", "--config.data.source=local", "--config.data.data_dir={}"],
     "dataset 'cifar10' not found"),
])
def test_project_errors_exit_2_with_the_message_and_no_traceback(tmp_path, overrides, message):
    """A bad method name (ConfigError) or absent data (DatasetNotFoundError): exit code 2 and
    the error's own message on stderr, not a traceback."""
    config_path = tmp_path / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    (tmp_path / "no_data").mkdir()
    overrides = [o.format(tmp_path / "no_data") for o in overrides]
    proc = _launch(config_path, tmp_path / "run", tmp_path / "cache", *overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert re.search(r"^error: .*" + re.escape(message), err, re.MULTILINE), err[-3000:]
    assert _created_in(tmp_path / "run") == []  # no metrics.jsonl, event file or .lock left


# ------------------------------------------------------------------------------- signals
def test_first_signal_sets_a_flag_a_second_acts_and_handlers_come_back():
    """In-process: the first SIGINT only flags the run (no KeyboardInterrupt mid-step), the
    second is Python's usual KeyboardInterrupt; the previous handlers return afterwards."""
    import threading

    from hamjax.errors import TrainingInterrupted
    from hamjax.train.lifecycle import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    if (threading.current_thread() is not threading.main_thread()
            or before[signal.SIGINT] is not signal.default_int_handler):
        pytest.skip("needs the main thread with Python's own SIGINT handler")
    signals = StopSignals()
    with pytest.raises(KeyboardInterrupt), signals.catching():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here; it must not raise
        assert signals.received == signal.SIGINT
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
        pytest.fail("the second SIGINT did not interrupt")
    assert {s: signal.getsignal(s) for s in before} == before
    assert TrainingInterrupted("x", signal.SIGTERM).exit_code == 143


# ------------------------------------------------------------------------------- SIGTERM
def _read_until(stream, pattern: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            break
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}")


def test_sigterm_saves_resumes_bit_exactly_and_the_workdir_is_locked_meanwhile(tmp_path):
    """A run is paused after its first logged step; a second launch on its workdir fails at
    once naming it; SIGTERM then finishes the step, saves, says how to resume and exits 143;
    rerunning the same command ends with the weights and results of an uninterrupted run."""
    config_path = tmp_path / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    cache = tmp_path / "cache"
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"

    proc = _launch(config_path, stopped, cache)
    _read_until(proc.stdout, r"^epoch 1/1 \[")
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        second = _launch(config_path, stopped, cache)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert f"in use by pid {proc.pid} on host {socket.gethostname()}" in err
        assert "Traceback" not in err and time.time() - t0 < 120
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    line = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved in (\S+); rerun the "
                     r"same command to resume", err)
    assert line, err[-3000:]
    step = int(line.group(1))
    assert 0 < step < 20  # mid-epoch (20 steps per epoch)
    assert line.group(2) == str(stopped / "checkpoints")
    assert not os.path.exists(workdir_lock.lock_path(stopped))

    for workdir in (stopped, straight):
        run = _launch(config_path, workdir, cache)
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        if workdir == stopped:
            assert f"resumed from {stopped} at step {step}" in out

    reports = [json.loads((w / "report.json").read_text()) for w in (straight, stopped)]
    a, b = (r["results"]["last"] for r in reports)
    assert a["clean"]["per_class"] == b["clean"]["per_class"]
    assert a["robust"]["per_class"] == b["robust"]["per_class"]
    for key in ("forward_passes", "backward_passes", "relative_to_pgd_at"):
        assert reports[0]["cost"][key] == reports[1]["cost"][key]
    states = [_restore_raw(w) for w in (straight, stopped)]
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------- resume config
def test_resuming_with_a_changed_config_is_refused_unless_allowed_and_then_recorded(tmp_path):
    """A finished run rerun with another attack eps (and seed) is refused, in process and by
    launch.py (exit 2, every differing field with both values, the fix); with
    --allow_config_change it proceeds and report.json lists the change; a change of the log
    frequency (and the other RESUME_MAY_CHANGE fields tried) is always accepted."""
    from hamjax.train.loop import Trainer

    workdir = tmp_path / "run"
    assert Trainer(_tiny_config(), str(workdir)).run()["config_changed_on_resume"] == []
    report_file = workdir / "report.json"
    finished = report_file.read_text()

    config_path = tmp_path / "tiny.py"
    config_path.write_text(TINY_CONFIG)
    proc = _launch(config_path, workdir, tmp_path / "cache", "--config.attack.eps=0.3",
                   "--config.seed=7")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    assert re.search(r"^error: the checkpoint in \S+ was written with another config", err,
                     re.MULTILINE), err[-3000:]
    assert "  attack.eps: 0.1 in the checkpoint, 0.3 now\n" in err
    assert "  seed: 1 in the checkpoint, 7 now\n" in err
    assert "--allow_config_change" in err and "new --workdir" in err

    changed = _tiny_config()
    changed.attack.eps = 0.3
    with pytest.raises(CheckpointError, match=r"attack\.eps: 0\.1 in the checkpoint, 0\.3 now"):
        Trainer(changed, str(workdir)).run()
    assert report_file.read_text() == finished  # refused runs rewrite nothing
    proc = _launch(config_path, workdir, tmp_path / "cache", "--config.attack.eps=0.3",
                   "--allow_config_change")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed with a changed config (--allow_config_change):\n  attack.eps: 0.1" in out
    recorded = [{"field": "attack.eps", "checkpoint": 0.1, "now": 0.3, "step": 20}]
    report = json.loads(report_file.read_text())
    assert report["config_changed_on_resume"] == recorded
    assert report["config"]["attack"]["eps"] == 0.3

    relogged = _tiny_config(log_every_steps=5, checkpoint_every_steps=7, keep_checkpoints=3)
    trainer = Trainer(relogged, str(workdir))
    state, meta = trainer.initial_state()  # accepted: no compile or evaluation needed to see it
    assert int(state.step) == 20 and "config_changed_on_resume" not in meta
    trainer.checkpointer.close()
    trainer.log.close()
    workdir_lock.release(trainer._lock)
