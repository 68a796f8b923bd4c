"""Workdir storage: local or gs:// paths, asynchronous orbax saves, the run log's files.

No network: a gs:// path is only checked to stay a gs:// path; every write goes to tmp_path.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from hamjax.checkpoint import Checkpointer
from hamjax.paths import is_remote, resolve
from hamjax.runlog import RunLogger, WholeFileLog, tensorboard_dir


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    remote = resolve("gs://bucket/runs/ham")
    assert isinstance(remote, epath.Path)
    assert os.fspath(remote) == "gs://bucket/runs/ham"
    assert os.fspath(remote / "checkpoints") == "gs://bucket/runs/ham/checkpoints"
    assert os.fspath(resolve(remote)) == "gs://bucket/runs/ham"  # idempotent
    assert is_remote("gs://b/x") and is_remote(remote) and not is_remote("runs/gs:/x")
    monkeypatch.chdir(tmp_path)
    local = resolve("runs/a")
    assert os.fspath(local) == os.path.join(str(tmp_path), "runs", "a")
    assert not is_remote(local)


def test_tensorboard_dir_is_local_for_gs_without_gcs_support():
    root = resolve("gs://bucket/run")
    logdir, warning = tensorboard_dir(root, remote_ok=True)
    assert (logdir, warning) == ("gs://bucket/run/tensorboard", None)
    logdir, warning = tensorboard_dir(root, remote_ok=False)
    assert not is_remote(logdir) and os.path.isabs(logdir)
    assert logdir.endswith(os.path.join("gs", "bucket", "run", "tensorboard"))
    assert "google-cloud-storage" in warning and "\n" not in warning
    local = resolve("/tmp/run")
    assert tensorboard_dir(local, remote_ok=False) == ("/tmp/run/tensorboard", None)


def test_run_logger_creates_the_workdir_and_appends_on_resume(tmp_path):
    workdir = tmp_path / "a" / "b"
    for step in (1, 2):  # a resumed run opens the same file again
        log = RunLogger(str(workdir), stream=open(os.devnull, "w"))  # noqa: SIM115
        log.write("train", step, loss=np.float32(0.5), acc=jnp.asarray(0.25))
        log.close()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"], r["acc"]) for r in records] == [
        ("train", 1, 0.5, 0.25), ("train", 2, 0.5, 0.25)]
    assert (workdir / "tensorboard").is_dir()
    RunLogger(str(tmp_path / "off"), enabled=False).close()
    assert not (tmp_path / "off").exists()  # non-zero processes write nothing


def test_whole_file_log_keeps_a_resumed_runs_lines_and_uploads_sparingly(tmp_path):
    """The gs:// metrics file (object stores cannot append): checked on a local path."""
    path = epath.Path(tmp_path) / "metrics.jsonl"
    path.write_text("old\n")
    log = WholeFileLog(path, every_s=3600.0)
    log.write("a\n")
    log.flush()  # too soon: nothing uploaded
    assert path.read_text() == "old\n"
    log.flush(force=True)
    assert path.read_text() == "old\na\n"
    log.write("b\n")
    log.close()
    assert path.read_text() == "old\na\nb\n"


def test_run_logger_on_a_remote_workdir_rewrites_the_file(tmp_path, monkeypatch):
    """RunLogger's gs:// branch, on a local path taken for a remote one."""
    import hamjax.runlog as runlog

    monkeypatch.setattr(runlog, "is_remote", lambda path: True)
    workdir = tmp_path / "run"
    log = RunLogger(str(workdir), stream=open(os.devnull, "w"))  # noqa: SIM115
    log.write("train", 1, loss=1.0)
    assert not (workdir / "metrics.jsonl").exists()  # train records wait for the next upload
    log.write("epoch", 1, epoch=1)
    kinds = [json.loads(x)["kind"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "epoch"]
    log.write("train", 2, loss=0.5)
    log.close()
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3


def _tree(value: float) -> dict:
    return {"w": jnp.full((4, 3), value, jnp.float32), "n": jnp.asarray(int(value), jnp.int32)}


def test_async_saves_are_read_back_complete_and_keep_the_newest(tmp_path):
    """Reads right after asynchronous saves see them whole; the caller may donate the saved
    arrays and mutate the metadata as soon as save returns; `keep` newest survive close."""
    ckpt = Checkpointer(str(tmp_path), keep=2)
    bump = jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t), donate_argnums=0)
    state = _tree(1.0)
    for step in (1, 2, 3):
        meta = {"epochs": [step], "note": {"step": step}}
        ckpt.save(step, state, meta)
        meta["note"]["step"] = -1  # mutated while the save may still be writing
        state = bump(state)  # donates the buffers just saved
    assert ckpt.latest_step() == 3
    restored, meta = ckpt.restore(_tree(0.0))
    np.testing.assert_array_equal(restored["w"], np.full((4, 3), 3.0, np.float32))
    assert int(restored["n"]) == 3 and meta == {"epochs": [3], "note": {"step": 3}}
    ckpt.save(3, _tree(7.0), {"replaced": True})  # the same step again replaces it
    restored, meta = ckpt.restore(_tree(0.0), step=3)
    assert float(restored["w"][0, 0]) == 7.0 and meta == {"replaced": True}
    ckpt.save(4, _tree(4.0), {}, kind="best")
    ckpt.wait()  # what a SIGTERM handler calls before exiting
    assert os.path.isdir(tmp_path / "best" / "4")
    ckpt.close()  # finishes the pending saves
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2, 3]
    reopened = Checkpointer(str(tmp_path))
    assert reopened.latest_step("best") == 4
    assert float(reopened.restore(_tree(0.0), kind="best")[0]["w"][0, 0]) == 4.0
    assert reopened.restore(_tree(0.0), kind="checkpoints", step=2)[1]["epochs"] == [2]
    reopened.close()


def test_opening_a_workdir_read_only_logs_nothing(tmp_path, caplog):
    """An evaluation opens the workdir read-only: orbax's seven notices about switching saving
    off (one per option, and "Given directory is read only" per manager) are not printed."""
    import logging

    ckpt = Checkpointer(str(tmp_path), keep=1)
    ckpt.save(1, _tree(1.0), {})
    ckpt.close()
    with caplog.at_level(logging.WARNING):
        reader = Checkpointer(str(tmp_path), read_only=True)
        assert reader.latest_step() == 1
        reader.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
