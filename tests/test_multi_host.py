"""Two processes on localhost as two hosts of one run (`jax.distributed`, CPU devices).

HAM on 2 devices per process: both processes train into one workdir and are stopped after the
first periodic checkpoint by a SIGTERM to process 1 alone (a preemption notice that reached one
host: both must stop at one step, with one checkpoint, and exit as interrupted). They are
restarted with the same command and finish.
Their final weights equal a one-process, one-device run of the same config and global batch
(float tolerance: the cross-process sums reassociate), the per-class test counts are the same,
and the logs and report are written by process 0 alone (each epoch recorded once, one
TensorBoard event file per start). About 2 minutes on 2 CPU cores; most of it is compiling.
(A crash, SIGKILL, and its resume are tested on one process in tests/test_train.py; CAAT's step
on a mesh in tests/test_multi_device.py. Both ran here across two processes too, until the
suite's CI time needed the minutes; git history has that CAAT case.)
Two launch.py processes whose workdir is one relative path seen from two working directories (two
hosts with their own disks) are refused before training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from launching import saved_steps

from hamjax.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL, ATOL = 1e-4, 1e-5
EPOCHS, STEPS_PER_EPOCH, BATCH = 2, 6, 16  # BATCH: the global batch
LAUNCH_TIMEOUT_S = 420  # per start of a run (both processes)

CHILD = textwrap.dedent(
    """
    import os
    import sys

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    method, workdir = sys.argv[1], sys.argv[2]
    num_processes, process_id, port, local_devices = (int(a) for a in sys.argv[3:7])
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=num_processes, process_id=process_id)
    assert jax.process_count() == num_processes, jax.process_count()
    assert jax.process_index() == process_id, jax.process_index()
    assert jax.local_device_count() == local_devices, jax.devices()

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO

    import numpy as np

    from hamjax.config import base_config, method_config
    from hamjax.errors import TrainingInterrupted
    from hamjax.train import train_and_evaluate

    c = base_config()
    c.data.name = "digits"
    c.data.train_size = @TRAIN_SIZE@
    c.data.val_size = 20
    c.data.augment.crop_pad = 1
    c.data.augment.flip = False
    c.model.name = "small_cnn"
    c.method = method_config(method)
    c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 3
    c.eval.eps, c.eval.step_size, c.eval.steps = 0.1, 0.03, 3
    c.eval.num_examples = 20
    c.eval.batch_size = 20
    c.train.batch_size = @BATCH@
    c.train.epochs = @EPOCHS@
    c.train.lr = 0.1
    c.train.lr_boundaries = ()
    c.train.lr_values = ()
    c.train.checkpoint_every_steps = 4
    c.train.log_every_steps = 1000
    if method == "ham":
        c.method.mining_step = 1
        c.method.warmup_epochs = 0
        c.method.hard_keep_fraction = 0.5  # a half-batch bucket: the compacted branch runs
        c.method.buckets = (0.5, 1.0)  # two switch branches: the same paths, less to compile
    try:
        train_and_evaluate(c, workdir)
    except TrainingInterrupted as err:  # as launch.py ends an interrupted run
        print("child interrupted", process_id, err, flush=True)
        sys.exit(err.exit_code)
    print("child done", process_id, flush=True)
    """
).replace("@TRAIN_SIZE@", str(BATCH * STEPS_PER_EPOCH)).replace("@BATCH@", str(BATCH)).replace(
    "@EPOCHS@", str(EPOCHS))


# A config file for launch.py: the tiny digits run (the refusal test stops before training).
CHILD_CONFIG = textwrap.dedent(
    """
    from hamjax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "digits"
        c.model.name = "small_cnn"
        c.method.name = "pgd_at"
        c.train.batch_size = 16
        c.eval.batch_size = 20
        return c
    """
)


# Back-to-back saves of both kinds, as an epoch that improves on validation makes them (best,
# then the end-of-epoch checkpoint), without the training around them.
SAVER = textwrap.dedent(
    """
    import os
    import sys

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    rounds, workdir = int(sys.argv[1]), sys.argv[2]
    num_processes, process_id, port, local_devices = (int(a) for a in sys.argv[3:7])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=num_processes, process_id=process_id)
    from absl import logging

    logging.set_verbosity(logging.WARNING)

    import numpy as np

    from hamjax.checkpoint import BEST, LAST, Checkpointer
    from hamjax.sharding import make_mesh, put_replicated

    mesh = make_mesh()
    checkpointer = Checkpointer(workdir, keep=2)
    for step in range(1, rounds + 1):
        state = put_replicated({"w": np.full(4096, step, np.float32), "step": np.int32(step)},
                               mesh)
        checkpointer.save(step, state, {"round": step}, kind=BEST)
        checkpointer.save(step, state, {"round": step}, kind=LAST)
    checkpointer.close()
    print("child done", process_id, flush=True)
    """
)


@dataclasses.dataclass
class Child:
    """One process of a run and the files its output goes to (files, not pipes: a full pipe
    would block a child that nobody reads while the test polls)."""

    proc: subprocess.Popen
    name: str
    stdout: str
    stderr: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(script: str, method: str, workdir: str, n: int, logs: str, tag: str,
           cache: str, local_devices: int = 1) -> list[Child]:
    """The same command on processes 0..n-1 (one coordinator port per start), each with
    `local_devices` CPU devices."""
    port = _free_port() if n > 1 else 0
    flags = os.environ.get("XLA_FLAGS", "")
    if local_devices > 1:
        flags += f" --xla_force_host_platform_device_count={local_devices}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               XLA_FLAGS=flags.strip())
    children = []
    for i in range(n):
        name = f"{tag}-p{i}"
        out, err = os.path.join(logs, name + ".out"), os.path.join(logs, name + ".err")
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(
                [sys.executable, script, method, workdir, str(n), str(i), str(port),
                 str(local_devices)],
                cwd=REPO, env=env, stdout=fo, stderr=fe)
        children.append(Child(proc, name, out, err))
    return children


def _tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _report(children: list[Child]) -> str:
    """Exit codes and the output tails of every child, for a failure message."""
    parts = []
    for c in children:
        parts.append(f"--- {c.name}: returncode {c.proc.poll()}\n[stdout]\n{_tail(c.stdout, 1000)}"
                     f"\n[stderr]\n{_tail(c.stderr)}")
    return "\n".join(parts)


def _kill(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGKILL)
    for c in children:
        c.proc.wait()


def _wait(children: list[Child], timeout: float) -> None:
    """All children exit 0 within `timeout`, or the test fails showing their output."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(c.proc.poll() is None for c in children):
        if any(c.proc.poll() not in (None, 0) for c in children):
            time.sleep(5)  # let the others report their side of the failure
            break
        time.sleep(0.1)
    if any(c.proc.poll() is None for c in children):
        _kill(children)
        pytest.fail(f"timed out after {timeout:.0f}s or a peer failed\n{_report(children)}")
    if any(c.proc.returncode != 0 for c in children):
        pytest.fail(f"a process failed\n{_report(children)}")


def _first_checkpoint(children: list[Child], workdir: str, deadline: float) -> int:
    """Waits until a periodic checkpoint is complete while every process runs; returns its
    step, or kills them all and fails the test at the deadline or when one ends first."""
    while time.time() < deadline and all(c.proc.poll() is None for c in children):
        steps = saved_steps(workdir)
        if steps:
            return steps[0]
        time.sleep(0.02)
    _kill(children)
    pytest.fail(f"no checkpoint appeared in {workdir}/checkpoints before a process ended or"
                f" the deadline passed\n{_report(children)}")


def _sigterm_one_after_first_checkpoint(children: list[Child], workdir: str,
                                        timeout: float) -> int:
    """Once a periodic checkpoint is complete, SIGTERMs the last process only; every process
    must then stop as interrupted (exit 143) at one step, saved. Returns that step."""
    deadline = time.time() + timeout
    _first_checkpoint(children, workdir, deadline)
    children[-1].proc.send_signal(signal.SIGTERM)
    while time.time() < deadline and any(c.proc.poll() is None for c in children):
        time.sleep(0.1)
    if any(c.proc.poll() is None for c in children):
        _kill(children)
        pytest.fail(f"a process did not stop after its peer's SIGTERM\n{_report(children)}")
    codes = [c.proc.returncode for c in children]
    assert codes == [143] * len(children), f"{codes}\n{_report(children)}"
    assert "sent to another process" in _tail(children[0].stdout)
    assert not os.path.exists(os.path.join(workdir, "report.json"))
    return saved_steps(workdir)[-1]


def _final_params(workdir: str) -> list[np.ndarray]:
    """The newest checkpoint's weights and BN statistics as host arrays, whatever the devices
    that saved them (the saving mesh does not exist in this process)."""
    checkpointer = Checkpointer(workdir)
    state = checkpointer.restore_host()
    checkpointer.close()
    assert int(np.asarray(state["step"])) == EPOCHS * STEPS_PER_EPOCH, state["step"]
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["batch_stats"]))]


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# HAM on 2 devices per host: its per-device buckets across hosts and within one.
@pytest.mark.parametrize("method, local_devices", [("ham", 2)])
def test_two_processes_stopped_and_resumed_equal_one_process(tmp_path, method, local_devices):
    script = str(tmp_path / "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    logs, cache = str(tmp_path / "logs"), str(tmp_path / "jax_cache")
    os.makedirs(logs)
    single, multi = str(tmp_path / "one_process"), str(tmp_path / "two_processes")
    children: list[Child] = []
    try:
        children = _start(script, method, single, 1, logs, "single", cache)
        _wait(children, LAUNCH_TIMEOUT_S)

        children = _start(script, method, multi, 2, logs, "multi-stopped", cache, local_devices)
        stopped_at = _sigterm_one_after_first_checkpoint(children, multi, LAUNCH_TIMEOUT_S)
        assert 0 < stopped_at < EPOCHS * STEPS_PER_EPOCH

        children = _start(script, method, multi, 2, logs, "multi-resumed", cache, local_devices)
        _wait(children, LAUNCH_TIMEOUT_S)
        resumed = children
    finally:
        _kill(children)

    # (a) the same weights as one process with the same global batch
    for i, (a, b) in enumerate(zip(_final_params(single), _final_params(multi), strict=True)):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL, err_msg=f"{method} leaf {i}")

    # (b) the same per-class test numbers
    reports = [json.load(open(os.path.join(w, "report.json"))) for w in (single, multi)]  # noqa: SIM115
    assert set(reports[0]["results"]) == set(reports[1]["results"]) >= {"last", "best_on_val"}
    for key in reports[0]["results"]:
        a, b = (r["results"][key] for r in reports)
        assert a["num_examples"] == b["num_examples"] and a["step"] == b["step"], key
        for part in ("clean", "robust"):
            assert a[part]["per_class"] == b[part]["per_class"], (method, key, part)
            assert a["counts"][part] == b["counts"][part], (method, key, part)
        assert sum(a["counts"]["clean"]["total"]) == a["num_examples"], key
    passes = [r["cost"]["forward_passes"] for r in reports]
    if method == "ham":
        # Per-device buckets: each host packs its own hard rows and all take the bucket of the
        # fullest, so two hosts can run more passes than one (never fewer).
        assert passes[1] >= passes[0], passes
        fractions = [e["train_metrics"]["bucket_fraction"] for e in reports[0]["epochs"]]
        assert min(fractions) < 1.0, fractions  # the compacted branch ran

    # (c) logs and report from process 0 only, each epoch once
    for workdir, starts in ((single, 1), (multi, 2)):
        records = _records(workdir)
        assert [r["epoch"] for r in records if r["kind"] == "epoch"] == list(
            range(1, EPOCHS + 1)), workdir
        assert sum(r["kind"] == "run" for r in records) == starts, workdir
        events = os.listdir(os.path.join(workdir, "tensorboard"))
        assert len(events) == starts, (workdir, events)
    assert "child done 1" in _tail(resumed[1].stdout)
    assert "checkpoint, test split" not in _tail(resumed[1].stdout, 100_000)
    assert "checkpoint, test split" in _tail(resumed[0].stdout, 100_000)


def test_two_processes_save_both_kinds_back_to_back(tmp_path):
    """Regression: a best-on-validation save followed at once by the end-of-epoch save killed
    two-process runs now and then ("Barrier ... set_value_start is already ongoing": the two
    managers' async saves met the other host at barriers of one name). 20 rounds of that
    pattern failed on every try here before the fix."""
    script = str(tmp_path / "saver.py")
    with open(script, "w") as f:
        f.write(SAVER)
    logs, workdir = str(tmp_path / "logs"), str(tmp_path / "run")
    os.makedirs(logs)
    rounds = 20
    children = _start(script, str(rounds), workdir, 2, logs, "saver", str(tmp_path / "cache"), 2)
    try:
        _wait(children, LAUNCH_TIMEOUT_S)
    finally:
        _kill(children)
    checkpointer = Checkpointer(workdir, read_only=True)
    for kind in ("checkpoints", "best"):
        state = checkpointer.restore_host(kind=kind)
        assert int(state["step"]) == rounds and float(state["w"][0]) == rounds, kind
    checkpointer.close()


def test_two_processes_refuse_a_local_workdir_only_one_of_them_sees(tmp_path):
    """The same relative --workdir from two working directories: as two hosts with their own
    disks. Both processes stop with the message (exit 2) before anything trains; process 0's
    token file is gone again."""
    config = tmp_path / "tiny.py"
    config.write_text(CHILD_CONFIG)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = []
    for i in range(2):
        host = tmp_path / f"host{i}"
        host.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "launch.py"), f"--config={config}",
             "--workdir=runs/shared", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}", "--cpu_devices=1"],
            cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 2, (i, err[-3000:])
        assert err.splitlines()[-1].startswith(
            "error: --workdir=runs/shared is not one directory shared by every process: "
            "process(es) 1 cannot see the file process 0 wrote"), (i, err[-3000:])
        assert "Traceback" not in err
    assert os.listdir(tmp_path / "host0" / "runs" / "shared") == []
    assert not (tmp_path / "host1" / "runs").exists()
