"""Orbax checkpoints of the whole TrainState plus host-side run metadata.

Layout under a workdir:
  checkpoints/<step>/{state,meta}   periodic and end-of-epoch saves (the latest few kept)
  best/<step>/{state,meta}          the model selected on the *validation* split
Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
kill during a save leaves the previous checkpoint intact. They are asynchronous: `save` returns
once the arrays are copied to host memory and the files are written by a background thread while
training goes on; everything that reads or deletes checkpoints waits for that write first, a
save waits for the previous one of either kind (`checkpoints/` or `best/`), and `close` finishes
it. The workdir may be local or a `gs://` URL (every host of a multi-host run
must reach it).

Every saved array is verified on restore: `save` stores a crc32 of each leaf's bytes in the
checkpoint's JSON metadata (under INTEGRITY_KEY), computed from host copies before it returns
(the train step donates the state it was given), and `restore`/`restore_host` recompute them on
what was read: a damaged file is a CheckpointError naming the checkpoint and the fix, never a
silent load (orbax itself loaded most single flipped bytes of array data as changed numbers).
The checksums of the 89 MB TrainState of a PreAct-ResNet-18 take 40-60 ms on one CPU core.
Checkpoints written before these checksums restore unchecked. A disk that fills up while saving
is a DiskFullError naming the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hamjax.errors import CheckpointError, disk_full_error, is_disk_full
from hamjax.paths import resolve

LAST, BEST = "checkpoints", "best"
INTEGRITY_KEY = "integrity"  # meta[INTEGRITY_KEY] = {"algorithm": "crc32", "leaves": {...}}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_name(path: tuple) -> str:
    """A leaf's name as orbax stores it ("params.Conv_0.kernel", "opt_state.0.count"): the same
    for a TrainState and for the nested dicts and lists `restore_host` rebuilds from disk."""
    return ".".join(_key_name(k) for k in path)


def host_copy(leaf: Any) -> np.ndarray | None:
    """This process's complete copy of a leaf as NumPy, None when it holds only a part of it.

    A replicated array spanning several processes is read from its first local shard (no
    cross-host gather); hamjax's state is replicated everywhere, so no leaf is ever None here.
    """
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_data(0)) if leaf.is_fully_replicated else None
    return np.asarray(leaf)


def array_crc32(array: np.ndarray) -> int:
    """crc32 of an array's bytes in C order (any dtype, bfloat16 and 0-d included)."""
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def leaf_checksums(tree: Any) -> dict[str, dict | None]:
    """{leaf name: {"crc32", "dtype", "shape"}} of every array of `tree`, from host copies
    (None for a leaf this process holds only a part of: it cannot be checked here)."""
    sums: dict[str, dict | None] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = host_copy(leaf)
        sums[leaf_name(path)] = None if array is None else {
            "crc32": array_crc32(array), "dtype": str(array.dtype), "shape": list(array.shape)}
    return sums


def checksum_mismatches(tree: Any, saved: dict[str, dict | None]) -> list[str]:
    """Names of the leaves of `tree` whose bytes, dtype or shape differ from the `saved`
    checksums, or that have none; leaves saved as None (partial on the saving host) pass."""
    now = leaf_checksums(tree)
    bad = [name for name, record in now.items()
           if name not in saved or (saved[name] is not None and record != saved[name])]
    return bad + sorted(set(saved) - set(now))


class Checkpointer:
    """Saves and restores (state, meta) pairs in one workdir."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, read_only: bool = False):
        """read_only: only look and restore (evaluation): nothing is created or written."""
        self.workdir = resolve(workdir)
        with _quiet_read_only_notice():
            self._managers = {
                kind: ocp.CheckpointManager(self.workdir / kind,
                                            options=_manager_options(kind, keep, read_only))
                for kind in (LAST, BEST)
            }
        self._in_flight: dict[str, int] = {}  # the step of each kind's latest started save

    def _settled(self, kind: str) -> ocp.CheckpointManager:
        """The manager of `kind` once its in-flight save is on disk (or has raised)."""
        manager = self._managers[kind]
        with self._writing(kind):
            manager.wait_until_finished()
        return manager

    @contextlib.contextmanager
    def _writing(self, kind: str) -> Iterator[None]:
        """Turns a full disk (ENOSPC, raised now or by the background write) into one clear
        DiskFullError naming the checkpoint being written."""
        try:
            yield
        except Exception as err:
            if not is_disk_full(err):
                raise
            step = self._in_flight.get(kind)
            where = self.workdir / kind / ("" if step is None else str(step))
            raise disk_full_error(where, err) from err

    def latest_step(self, kind: str = LAST) -> int | None:
        """The newest complete step of `kind`, None when there is none."""
        return self._settled(kind).latest_step()

    def save(self, step: int, state: Any, meta: dict, kind: str = LAST) -> None:
        """Starts writing state and JSON metadata at `step` (replacing an existing save of that
        step); returns after the device-to-host copy, the files follow in the background.

        `meta` is deep-copied here: the caller may go on mutating its dicts during the write.
        Each leaf's checksum goes into it first, from host copies of `state` (so a donated or
        updated state cannot change them after save returns).
        """
        self.wait()  # one save in flight at a time, whatever its kind (see _manager_options)
        manager = self._managers[kind]
        meta = dict(copy.deepcopy(meta), **{INTEGRITY_KEY: {
            "algorithm": "crc32", "leaves": leaf_checksums(state)}})
        self._in_flight[kind] = step
        with self._writing(kind):
            if step in manager.all_steps():
                manager.delete(step)
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def steps(self, kind: str = LAST) -> list[int]:
        """Every complete step of `kind` kept on disk, oldest first."""
        return sorted(self._settled(kind).all_steps())

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        for kind in self._managers:
            self._settled(kind)

    def _restore(self, kind: str, step: int | None, **items: Any) -> dict | None:
        """The named items of the checkpoint `step` of `kind` (default: the latest); None when
        nothing was saved. An existing checkpoint that cannot be read raises CheckpointError."""
        manager = self._settled(kind)
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        try:
            return dict(manager.restore(step, args=ocp.args.Composite(**items)))
        except Exception as err:  # orbax raises many types; all mean the same to a user
            raise CheckpointError(
                f"cannot restore the checkpoint at {self.workdir / kind / str(step)}: "
                f"{type(err).__name__}: {err}\n"
                "It is corrupt or was written by a different config (model, method or data). "
                "Fix: rerun with the config that wrote it, or "
                + self._move_away_hint(kind, step)
            ) from err

    def _move_away_hint(self, kind: str, step: int) -> str:
        """How to fall back to the checkpoints kept beside a bad one (the run never overwrites
        or skips a bad checkpoint by itself)."""
        path = self.workdir / kind / str(step)
        aside = self.workdir / f"corrupt-{kind}-{step}"
        others = sorted(s for s in self._managers[kind].all_steps() if s != step)
        if others:
            then = (f"the other checkpoints kept in {self.workdir / kind} are steps {others}; "
                    f"the rerun starts from step {others[-1]}, the newest left")
        else:
            then = f"no other checkpoint is kept in {self.workdir / kind}: the rerun starts over"
        return (f"move it out of the way (mv {path} {aside}) and rerun the same command; {then}.")

    def _verify(self, kind: str, step: int, state: Any, meta: dict) -> None:
        """Raises CheckpointError unless every leaf of the restored `state` matches the
        checksums saved with it (a checkpoint from before checksums passes unchecked)."""
        saved = meta.get(INTEGRITY_KEY)
        if not saved:
            return
        bad = checksum_mismatches(state, saved.get("leaves", {}))
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointError(
                f"the checkpoint at {self.workdir / kind / str(step)} is corrupt: {len(bad)} "
                f"array(s) differ from the checksums saved with them ({shown}); nothing was "
                "loaded. Fix: " + self._move_away_hint(kind, step))

    def _latest(self, kind: str, step: int | None) -> int | None:
        return self._settled(kind).latest_step() if step is None else step

    def read_meta(self, kind: str = LAST, step: int | None = None) -> dict | None:
        """The JSON metadata of a checkpoint (the latest of `kind` by default) without its state,
        e.g. to rebuild the config that shapes the state; None when nothing was saved."""
        restored = self._restore(kind, step, meta=ocp.args.JsonRestore())
        return None if restored is None else _without_integrity(restored["meta"])

    def restore(self, like_state: Any, kind: str = LAST, step: int | None = None):
        """Restores (state, meta) shaped like `like_state`; None when nothing was saved yet.

        A checkpoint that exists but cannot be read raises CheckpointError: a run never restarts
        silently from scratch over a user's saved work.
        """
        step = self._latest(kind, step)
        restored = self._restore(kind, step, state=ocp.args.StandardRestore(_abstract(like_state)),
                                 meta=ocp.args.JsonRestore())
        if restored is None:
            return None
        meta = dict(restored["meta"])
        self._verify(kind, step, restored["state"], meta)
        return restored["state"], _without_integrity(meta)

    def restore_host(self, kind: str = LAST, step: int | None = None) -> Any:
        """The saved state of `kind` at `step` (default: latest) as a nested dict of NumPy
        arrays, whatever devices saved it (a notebook or a one-device process reading a
        multi-device run's weights); None when nothing was saved. Verified like `restore`."""
        step = self._latest(kind, step)
        if step is None:
            return None
        meta = self._restore(kind, step, meta=ocp.args.JsonRestore())["meta"]
        path = self.workdir / kind / str(step) / "state"
        try:
            reader = ocp.PyTreeCheckpointer()
            tree = reader.metadata(path)
            tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            state = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
        except Exception as err:  # as in _restore: any orbax failure is an unreadable checkpoint
            raise CheckpointError(
                f"cannot restore the checkpoint at {path.parent}: {type(err).__name__}: {err}\n"
                "It is corrupt. Fix: " + self._move_away_hint(kind, step)) from err
        self._verify(kind, step, state, dict(meta))
        return state

    def close(self) -> None:
        """Finishes pending saves (orbax's close waits for them) and releases the managers."""
        for kind, manager in self._managers.items():
            with self._writing(kind):
                manager.close()


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
    """Drops orbax's "Given directory is read only" warning, which it logs for every read-only
    manager: an evaluation asked for read-only access, so the notice is noise at its start."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _manager_options(kind: str, keep: int, read_only: bool) -> ocp.CheckpointManagerOptions:
    """Async saves; each kind's manager with its own multi-host barrier names.

    On several processes, an async save's background thread and the next save's start meet
    the other hosts at barriers whose names orbax does not number ("...set_value_start"). Two
    managers saving at once (the best-on-validation save, then the end-of-epoch one) used the
    same names from two threads of one process: the hosts paired the wrong barriers and the
    run died ("Barrier ... is already ongoing", tests/test_multi_host.py). So `save` waits for
    every kind's write before starting another, and the names carry the kind as a prefix.
    """
    # read_only: the saving options orbax would switch off itself, switched off here, so that it
    # logs no warning for each (six lines at the start of every evaluation).
    return ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        save_interval_steps=0 if read_only else 1,
        enable_async_checkpointing=True, read_only=read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=f"hamjax_{kind}"),
    )


def _without_integrity(meta: Any) -> dict:
    """The caller's metadata: the checksums are the checkpoint's business, not the run's."""
    return {k: v for k, v in dict(meta).items() if k != INTEGRITY_KEY}
