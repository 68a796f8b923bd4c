"""Orbax checkpoints of the whole TrainState plus host-side run metadata.

Layout under a workdir:
  checkpoints/<step>/{state,meta}   periodic and end-of-epoch saves (the latest few kept)
  best/<step>/{state,meta}          the model selected on the *validation* split
Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a
kill during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from hamjax.errors import CheckpointError

LAST, BEST = "checkpoints", "best"


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (state, meta) pairs in one workdir."""

    def __init__(self, workdir: str, keep: int = 2):
        self.workdir = os.path.abspath(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._managers = {
            kind: ocp.CheckpointManager(os.path.join(self.workdir, kind), options=options)
            for kind in (LAST, BEST)
        }

    def latest_step(self, kind: str = LAST) -> int | None:
        return self._managers[kind].latest_step()

    def save(self, step: int, state: Any, meta: dict, kind: str = LAST) -> None:
        """Writes state and JSON metadata at `step` (replacing an existing save of that step)."""
        manager = self._managers[kind]
        if step in manager.all_steps():
            manager.delete(step)
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        manager.wait_until_finished()

    def restore(self, like_state: Any, kind: str = LAST, step: int | None = None):
        """Restores (state, meta) shaped like `like_state`; None when nothing was saved yet.

        A checkpoint that exists but cannot be read raises CheckpointError: a run never restarts
        silently from scratch over a user's saved work.
        """
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        path = os.path.join(self.workdir, kind, str(step))
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
        for manager in self._managers.values():
            manager.close()
