"""Orbax checkpoints of the whole TrainState plus host-side run metadata.

Layout under a workdir:
  checkpoints/<step>/{state,meta}   periodic and end-of-epoch saves (the latest few kept)
  best/<step>/{state,meta}          the model selected on the *validation* split
Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
kill during a save leaves the previous checkpoint intact. They are asynchronous: `save` returns
once the arrays are copied to host memory and the files are written by a background thread while
training goes on; everything that reads or deletes checkpoints waits for that write first, and
`close` finishes it. The workdir may be local or a `gs://` URL (every host of a multi-host run
must reach it).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hamjax.errors import CheckpointError
from hamjax.paths import resolve

LAST, BEST = "checkpoints", "best"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (state, meta) pairs in one workdir."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, read_only: bool = False):
        """read_only: only look and restore (evaluation): nothing is created or written."""
        self.workdir = resolve(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=True,
            read_only=read_only,
        )
        self._managers = {
            kind: ocp.CheckpointManager(self.workdir / kind, options=options)
            for kind in (LAST, BEST)
        }

    def _settled(self, kind: str) -> ocp.CheckpointManager:
        """The manager of `kind` once its in-flight save is on disk (or has raised)."""
        manager = self._managers[kind]
        manager.wait_until_finished()
        return manager

    def latest_step(self, kind: str = LAST) -> int | None:
        """The newest complete step of `kind`, None when there is none."""
        return self._settled(kind).latest_step()

    def save(self, step: int, state: Any, meta: dict, kind: str = LAST) -> None:
        """Starts writing state and JSON metadata at `step` (replacing an existing save of that
        step); returns after the device-to-host copy, the files follow in the background.

        `meta` is deep-copied here: the caller may go on mutating its dicts during the write.
        """
        manager = self._settled(kind)
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(copy.deepcopy(meta))
            ),
            force=True,
        )

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
                "Fix: rerun with the config that wrote it, or move that directory away to start "
                "over (the run will not overwrite it silently)."
            ) from err

    def read_meta(self, kind: str = LAST, step: int | None = None) -> dict | None:
        """The JSON metadata of a checkpoint (the latest of `kind` by default) without its state,
        e.g. to rebuild the config that shapes the state; None when nothing was saved."""
        restored = self._restore(kind, step, meta=ocp.args.JsonRestore())
        return None if restored is None else dict(restored["meta"])

    def restore(self, like_state: Any, kind: str = LAST, step: int | None = None):
        """Restores (state, meta) shaped like `like_state`; None when nothing was saved yet.

        A checkpoint that exists but cannot be read raises CheckpointError: a run never restarts
        silently from scratch over a user's saved work.
        """
        restored = self._restore(kind, step, state=ocp.args.StandardRestore(_abstract(like_state)),
                                 meta=ocp.args.JsonRestore())
        if restored is None:
            return None
        return restored["state"], dict(restored["meta"])

    def restore_host(self, kind: str = LAST, step: int | None = None) -> Any:
        """The saved state of `kind` at `step` (default: latest) as a nested dict of NumPy
        arrays, whatever devices saved it (a notebook or a one-device process reading a
        multi-device run's weights); None when nothing was saved."""
        step = self.latest_step(kind) if step is None else step
        if step is None:
            return None
        path = self.workdir / kind / str(step) / "state"
        reader = ocp.PyTreeCheckpointer()
        tree = reader.metadata(path)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))

    def close(self) -> None:
        """Finishes pending saves (orbax's close waits for them) and releases the managers."""
        for manager in self._managers.values():
            manager.close()
