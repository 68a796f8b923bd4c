"""Checkpoints are verified on restore (a crc32 per leaf saved with them), never loaded
silently when damaged, and a full disk is one clear error naming the path. Small synthetic
states: no model, no compile."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from hypothesis import given, settings
from hypothesis import strategies as st

from hamjax.checkpoint import INTEGRITY_KEY, Checkpointer, leaf_checksums
from hamjax.errors import CheckpointError, DiskFullError, is_disk_full
from hamjax.runlog import RunLogger


def make_state(seed: int) -> dict:
    """Weights-like float32 (one large leaf), a bfloat16 and a 0-d int leaf, a tuple."""
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal(40_000).astype(np.float32) * 0.05),
                   "b": jnp.asarray(rng.standard_normal(16).astype(np.float32))},
        "opt_state": (jnp.int32(seed), {"mu": jnp.asarray(rng.standard_normal(16), jnp.bfloat16)}),
        "step": jnp.int32(seed),
    }


def _flat(tree) -> dict[str, np.ndarray]:
    return {name: np.asarray(v) for name, v in zip(leaf_checksums(tree), _leaves(tree),
                                                    strict=True)}


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def assert_same(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A workdir with two checkpoints (steps 1 and 2) of make_state."""
    workdir = str(tmp_path_factory.mktemp("saved") / "run")
    ckpt = Checkpointer(workdir, keep=2)
    for step in (1, 2):
        ckpt.save(step, make_state(step), {"epochs": [step]})
    ckpt.close()
    return workdir


def copy_of(workdir: str) -> str:
    target = os.path.join(tempfile.mkdtemp(prefix="hamjax-ckpt-"), "run")
    shutil.copytree(workdir, target)
    return target


def array_data_span(state_dir: str) -> tuple[str, int, int]:
    """(file, start, end) of the bytes of the largest stored array chunk: the largest data file
    of the checkpoint's OCDBT store holds each chunk verbatim (zstd-compressed by orbax), so
    the chunk is found in it by reading the store's values through tensorstore."""
    import tensorstore as ts

    files = [os.path.join(root, f) for root, _, names in os.walk(state_dir) for f in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "rb") as f:
        blob = f.read()
    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
    values = [store.read(key).result().value for key in store.list().result()]
    chunk = max(values, key=len)
    start = blob.find(chunk)
    assert start >= 0 and len(chunk) > 1000, "the largest chunk is not stored verbatim"
    return largest, start, start + len(chunk)


def flip(path: str, position: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def test_checkpoints_restore_exactly_and_hide_their_checksums(saved):
    ckpt = Checkpointer(saved, read_only=True)
    state, meta = ckpt.restore(make_state(0))
    assert_same(state, make_state(2))
    assert meta == {"epochs": [2]}  # the checksums stay the checkpoint's own
    assert ckpt.read_meta() == {"epochs": [2]}
    host = ckpt.restore_host(step=1)
    assert_same(host, make_state(1))
    raw = ckpt._managers["checkpoints"].restore(2, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
    assert set(raw[INTEGRITY_KEY]["leaves"]) == set(leaf_checksums(make_state(2)))
    ckpt.close()


@settings(max_examples=10, deadline=None)
@given(where=st.floats(0.0, 1.0, exclude_max=True), mask=st.integers(1, 255))
def test_a_flipped_byte_in_array_data_is_never_loaded(saved, where, mask):
    """Any byte of the largest array's stored data, changed in any way: restore and
    restore_host raise CheckpointError (a checksum mismatch, or a chunk that no longer
    decompresses), never return the damaged state."""
    workdir = copy_of(saved)
    try:
        path, start, end = array_data_span(os.path.join(workdir, "checkpoints", "2", "state"))
        flip(path, start + int(where * (end - start)), mask)
        ckpt = Checkpointer(workdir, read_only=True)
        with pytest.raises(CheckpointError, match=re.escape(f"{workdir}/checkpoints/2")):
            ckpt.restore(make_state(0))
        with pytest.raises(CheckpointError):
            ckpt.restore_host()
        ckpt.close()
    finally:
        shutil.rmtree(os.path.dirname(workdir))


def test_the_checksum_catches_what_orbax_would_load_and_the_fix_works(saved):
    """A flip that orbax itself restores without complaint (changed numbers) is refused; the
    message names the checkpoint, the step kept beside it and the command that falls back to
    it, and following it resumes from that step."""
    workdir = copy_of(saved)
    state_dir = os.path.join(workdir, "checkpoints", "2", "state")
    path, start, end = array_data_span(state_dir)
    with open(path, "rb") as f:
        pristine = f.read()
    for position in range((start + end) // 2, end, 97):  # first flip orbax does not notice
        flip(path, position, 0x10)
        try:
            loaded = ocp.PyTreeCheckpointer().restore(state_dir)
        except Exception:
            with open(path, "wb") as f:
                f.write(pristine)
            continue
        assert not np.array_equal(np.asarray(loaded["params"]["w"]),
                                  np.asarray(make_state(2)["params"]["w"]))
        break
    else:
        pytest.fail("every flip failed decompression: nothing left for the checksum to catch")

    ckpt = Checkpointer(workdir, keep=2)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(make_state(0))
    message = str(info.value)
    assert f"checkpoint at {workdir}/checkpoints/2 is corrupt" in message
    assert "params.w" in message and "nothing was loaded" in message
    assert "steps [1]" in message and "starts from step 1" in message
    ckpt.close()
    move = re.search(r"\(mv (\S+) (\S+)\)", message)
    subprocess.run(["mv", move.group(1), move.group(2)], check=True)
    ckpt = Checkpointer(workdir, keep=2)
    state, meta = ckpt.restore(make_state(0))
    assert_same(state, make_state(1))
    assert meta == {"epochs": [1]}
    ckpt.close()
    shutil.rmtree(os.path.dirname(workdir))


def test_checkpoints_without_checksums_restore_unchecked(saved):
    """Runs saved before checksums existed still resume."""
    workdir = copy_of(saved)
    meta_file = os.path.join(workdir, "checkpoints", "2", "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta[INTEGRITY_KEY]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    ckpt = Checkpointer(workdir, read_only=True)
    state, meta = ckpt.restore(make_state(0))
    assert_same(state, make_state(2))
    assert meta == {"epochs": [2]}
    assert_same(ckpt.restore_host(), make_state(2))
    ckpt.close()
    shutil.rmtree(os.path.dirname(workdir))


# ------------------------------------------------------------------------------- disk full
def _no_space(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_during_an_async_save_is_one_error_naming_the_checkpoint(tmp_path,
                                                                           monkeypatch):
    write_text = epath.Path.write_text

    def full(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path)):
            raise _no_space(self)
        return write_text(self, *args, **kwargs)

    ckpt = Checkpointer(tmp_path / "run")
    monkeypatch.setattr(epath.Path, "write_text", full)
    ckpt.save(3, make_state(3), {})  # returns after the host copy; the write fails later
    with pytest.raises(DiskFullError) as info:
        ckpt.wait()
    monkeypatch.undo()
    assert f"no space left writing {tmp_path}/run/checkpoints/3" in str(info.value)
    assert "rerun the same command" in str(info.value) and "\n" not in str(info.value)
    try:
        ckpt.close()
    except DiskFullError:
        pass


def test_disk_full_when_a_save_starts_is_one_error_naming_the_checkpoint(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "run")

    def full(self, step, *args, **kwargs):
        raise _no_space(tmp_path / "run" / "checkpoints" / f"{step}.orbax-checkpoint-tmp")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(DiskFullError, match=f"writing {tmp_path}/run/checkpoints/4 "):
        ckpt.save(4, make_state(4), {})
    monkeypatch.undo()
    ckpt.close()


def test_disk_full_in_the_run_log_names_metrics_jsonl(tmp_path):
    class FullFile:
        def write(self, text):
            raise _no_space(tmp_path / "metrics.jsonl")

        def flush(self):
            pass

        def close(self):
            pass

    log = RunLogger(tmp_path, stream=open(os.devnull, "w"))
    log._file.close()
    log._file = FullFile()
    with pytest.raises(DiskFullError, match=f"no space left writing {tmp_path}/metrics.jsonl"):
        log.write("train", 1, loss=0.5)
    log.close()


def test_disk_full_is_recognised_through_wrappers():
    inner = _no_space("/x")
    try:
        try:
            raise inner
        except OSError as err:
            raise RuntimeError("background write failed") from err
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert is_disk_full(ValueError("OUT_OF_RANGE: No space left on device [path=/x]"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
