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
import orbax.checkpoint as ocp

from hamjax.errors import CheckpointError
from hamjax.paths import resolve

LAST, BEST = "checkpoints", "best"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (state, meta) pairs in one workdir."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        self.workdir = resolve(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True
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

    def restore(self, like_state: Any, kind: str = LAST, step: int | None = None):
        """Restores (state, meta) shaped like `like_state`; None when nothing was saved yet.

        A checkpoint that exists but cannot be read raises CheckpointError: a run never restarts
        silently from scratch over a user's saved work.
        """
        manager = self._settled(kind)
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        path = self.workdir / kind / str(step)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(like_state)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # orbax raises many types; all mean the same to a user
            raise CheckpointError(
                f"cannot restore the checkpoint at {path}: {type(err).__name__}: {err}\n"
                "It is corrupt or was written by a different config (model, method or data). "
                "Fix: rerun with the config that wrote it, or move that directory away to start "
                "over (the run will not overwrite it silently)."
            ) from err
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        """Finishes pending saves (orbax's close waits for them) and releases the managers."""
        for manager in self._managers.values():
            manager.close()
