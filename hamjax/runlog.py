"""Run logs: a JSON-lines metrics file, TensorBoard scalars and a console progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    """JSON-safe scalars and lists from numpy/jax values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape"):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    return value


class RunLogger:
    """Appends records to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes (multi-host runs would otherwise interleave).
    """

    def __init__(self, workdir: str, enabled: bool = True, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self._file = None
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSON log is the record
                self._tb = None

    def write(self, kind: str, step: int, **values: Any) -> None:
        """One record: {"kind", "step", "time", ...values}; numeric scalars go to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time(), **_plain(values)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def progress(self, epoch: int, epochs: int, step_in_epoch: int, steps: int,
                 images_per_s: float, metrics: dict) -> None:
        """A one-line progress bar with throughput and the latest step metrics."""
        if not self.enabled:
            return
        width = 20
        done = int(width * step_in_epoch / max(steps, 1))
        shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
        self.print(f"epoch {epoch + 1}/{epochs} [{'#' * done}{'.' * (width - done)}] "
                   f"{step_in_epoch}/{steps} {images_per_s:.1f} img/s {shown}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
