"""gs:// workdirs and data dirs, through a local folder standing in for the bucket
(tests/bucket_standin.py): the lock's create-only object, takeover and --break_lock on a bucket;
a run that reads its data from the bucket, trains, checkpoints, resumes and is locked there."""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
import time

import pytest
from bucket_standin import local_bucket

from hamjax import workdir_lock
from hamjax.errors import WorkdirLockedError
from hamjax.paths import is_remote, resolve

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    with local_bucket(str(tmp_path / "bucket"), monkeypatch) as root:
        yield root


def _put_lock(bucket_root: str, run: str, **holder) -> str:
    path = os.path.join(bucket_root, "b", run, workdir_lock.LOCK_NAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(holder, f)
    return path


def test_a_bucket_lock_is_a_create_only_object_with_the_local_rules(bucket):
    path = workdir_lock.acquire("gs://b/run")
    assert path == "gs://b/run/.lock" and is_remote(path)
    on_disk = os.path.join(bucket, "b", "run", ".lock")
    with open(on_disk) as f:
        assert json.load(f)["pid"] == os.getpid()
    assert not workdir_lock._create(path, {"other": 1})  # create-only: the object exists
    workdir_lock.release(path)
    assert not os.path.exists(on_disk)

    now = time.time()
    live = dict(workdir_lock.holder_record(pid=os.getppid()), host="other-host")
    _put_lock(bucket, "run", **live)
    with pytest.raises(WorkdirLockedError, match="in use by pid .* on host other-host"):
        workdir_lock.acquire("gs://b/run")
    # The same host's lock from a long-dead heartbeat: taken over after the settling check.
    dead = dict(live, heartbeat_unix=now - workdir_lock.STALE_AFTER_S - 1)
    _put_lock(bucket, "run", **dead)
    slept = []
    path = workdir_lock.acquire("gs://b/run", sleep=slept.append)
    assert slept == [workdir_lock.SETTLE_S]
    with open(on_disk) as f:
        assert json.load(f)["host"] == socket.gethostname()
    workdir_lock.release(path)
    _put_lock(bucket, "run", **live)
    assert workdir_lock.break_lock("gs://b/run") == live
    assert not os.path.exists(on_disk)


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_old(tmp_path):
    now = time.time()
    fresh = dict(workdir_lock.holder_record(pid=os.getppid()), host="elsewhere",
                 heartbeat_unix=now - 60)
    assert not workdir_lock.is_stale(fresh, now)
    assert workdir_lock.is_stale(fresh, now + workdir_lock.STALE_AFTER_S)
    assert not workdir_lock.is_stale({}, now + 1e9)  # unreadable: never taken
    old_format = {"host": "elsewhere", "pid": 1, "started_unix": now - 10}  # no heartbeat yet
    assert workdir_lock.heartbeat_age(old_format, now) == pytest.approx(10)
    path = workdir_lock.lock_path(tmp_path)
    with open(path, "w") as f:
        json.dump(dict(fresh, heartbeat_unix=now - workdir_lock.STALE_AFTER_S - 5), f)
    workdir_lock.release(workdir_lock.acquire(tmp_path))
    assert not os.path.exists(path)


def test_the_holder_rewrites_its_heartbeat_until_released(tmp_path):
    path = workdir_lock.lock_path(tmp_path)
    holder = workdir_lock.holder_record(now=time.time() - 100)
    assert workdir_lock._create(path, holder)
    workdir_lock._start_heartbeat(path, holder, every=0.02)
    deadline = time.time() + 60
    while time.time() < deadline and workdir_lock._read(path) == holder:
        time.sleep(0.02)
    beat = workdir_lock._read(path)
    assert beat["heartbeat_unix"] > holder["heartbeat_unix"]
    assert {k: v for k, v in beat.items() if k != "heartbeat_unix"} == {
        k: v for k, v in holder.items() if k != "heartbeat_unix"}
    workdir_lock.release(path)
    assert not os.path.exists(path)


CONFIG = textwrap.dedent(
    """
    from hamjax.config import base_config

    def get_config():
        c = base_config()
        c.data.name = "fashion_mnist"
        c.data.source = "local"
        c.data.data_dir = "gs://b/datasets"
        c.data.train_size = 64
        c.data.val_size = 16
        c.data.augment.crop_pad = 0
        c.data.augment.flip = False
        c.model.name = "small_cnn"
        c.method.name = "pgd_at"
        c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 1
        c.eval.eps, c.eval.step_size, c.eval.steps = 0.1, 0.03, 1
        c.eval.num_examples = 16
        c.eval.batch_size = 16
        c.train.epochs = 1
        c.train.batch_size = 16
        c.train.lr = 0.05
        c.train.lr_boundaries = ()
        c.train.lr_values = ()
        c.train.checkpoint_every_steps = 3
        c.train.log_every_steps = 1000
        return c
    """
)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="needs dataset-fashion-mnist")
def test_a_run_in_a_bucket_reads_trains_checkpoints_resumes_and_is_locked(bucket):
    """The guide's route: the dataset put in the bucket once, every worker reading it there;
    the workdir a gs:// URL."""
    from hamjax.checkpoint import Checkpointer
    from hamjax.train import train_and_evaluate

    shutil.copytree(FASHION_MNIST_DIR, os.path.join(bucket, "b", "datasets", "fashion-mnist"))
    namespace: dict = {}
    exec(CONFIG, namespace)
    config = namespace["get_config"]()
    workdir = "gs://b/runs/fmnist"
    report = train_and_evaluate(config, workdir)
    local = os.path.join(bucket, "b", "runs", "fmnist")
    assert report["results"]["last"]["step"] == 4
    assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["3", "4"]
    assert not os.path.exists(os.path.join(local, ".lock"))  # released
    records = resolve(workdir).joinpath("metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["kind"] for r in records].count("epoch") == 1
    assert json.loads(resolve(workdir).joinpath("report.json").read_text())["results"]

    config.train.epochs = 2  # resumed: one more epoch from the bucket's checkpoint
    report = train_and_evaluate(config, workdir, allow_config_change=True)
    assert report["results"]["last"]["step"] == 8
    assert [e["epoch"] for e in report["epochs"]] == [1, 2]
    checkpointer = Checkpointer(workdir, read_only=True)
    assert checkpointer.latest_step() == 8
    checkpointer.close()

    # hamjax.evaluate reads the run from the bucket and writes its outputs there
    from hamjax.evaluation.workdir import evaluate_workdir

    result = evaluate_workdir(workdir, ["pgd2", "apgd-ce"], "test", 16, checkpoint="last",
                              log=lambda line: None)
    assert result["json_path"] == "gs://b/runs/fmnist/eval/test_last.json"
    written = sorted(os.listdir(os.path.join(local, "eval")))
    assert {"test_last.json", "test_last.png", "test_last_margins.png"} <= set(written)
    with open(os.path.join(local, "eval", "test_last.json")) as f:
        assert json.load(f)["num_examples"] == 16

    _put_lock(bucket, "runs/fmnist", **dict(workdir_lock.holder_record(pid=os.getppid()),
                                             host="another-worker"))
    with pytest.raises(WorkdirLockedError, match="another-worker"):
        train_and_evaluate(config, workdir)
