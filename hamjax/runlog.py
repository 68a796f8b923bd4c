"""Run logs: a JSON-lines metrics file, TensorBoard scalars and a console progress line.

The workdir may be local or a `gs://` URL. Object stores have no append (gcsfs opens "a" as
"w", and an object appears only when closed), so a remote metrics.jsonl is read once and
rewritten whole, at most every 30 s for train records and at once for the others. tensorboardX
writes gs:// event files itself only when `google-cloud-storage` is installed (its GCS record
writer); without it the TensorBoard scalars of a remote workdir go to a local directory, said
once on the console, and metrics.jsonl stays the complete record.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from etils import epath

from hamjax.paths import is_remote, resolve


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


def tensorboard_dir(workdir: epath.Path, remote_ok: bool) -> tuple[str, str | None]:
    """(where TensorBoard events go, a warning or None): `<workdir>/tensorboard` unless the
    workdir is remote and tensorboardX cannot write there, then a local mirror of its path."""
    target = workdir / "tensorboard"
    if not is_remote(target) or remote_ok:
        return os.fspath(target), None
    local = os.path.join(tempfile.gettempdir(), "hamjax-tensorboard",
                         os.fspath(target).replace("://", "/", 1))
    return local, (f"warning: TensorBoard events for {target} go to the local {local} "
                   "(writing them to gs:// needs `pip install google-cloud-storage`); "
                   "metrics.jsonl in the workdir has every record")


def _tensorboardx_gcs() -> bool:
    """Whether tensorboardX found google-cloud-storage (its gs:// event writer)."""
    try:
        from tensorboardX import record_writer
    except ImportError:
        return False
    return bool(getattr(record_writer, "GCS_ENABLED", False))


class WholeFileLog:
    """A text file on object storage kept by rewriting it whole: the earlier content (a resumed
    run's) is read once, and `flush` uploads everything at most every `every_s` seconds unless
    forced; `close` forces it."""

    def __init__(self, path: epath.Path, every_s: float = 30.0):
        self._path = path
        self._chunks = [path.read_text()] if path.exists() else []
        self._every_s = every_s
        self._uploaded_at = time.monotonic()
        self._dirty = False

    def write(self, text: str) -> None:
        self._chunks.append(text)
        self._dirty = True

    def flush(self, force: bool = False) -> None:
        if self._dirty and (force or time.monotonic() - self._uploaded_at >= self._every_s):
            self._path.write_text("".join(self._chunks))
            self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)


class RunLogger:
    """Appends records to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes (multi-host runs would otherwise interleave).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self._file = None
        self._tb = None
        if enabled:
            root = resolve(workdir)
            root.mkdir(parents=True, exist_ok=True)
            path = root / "metrics.jsonl"
            self._file = WholeFileLog(path) if is_remote(root) else path.open("a")
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard is optional; the JSON log is the record
                return
            logdir, warning = tensorboard_dir(root, remote_ok=_tensorboardx_gcs())
            if warning:
                self.print(warning)
            self._tb = SummaryWriter(logdir)

    def write(self, kind: str, step: int, **values: Any) -> None:
        """One record: {"kind", "step", "time", ...values}; numeric scalars go to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time(), **_plain(values)}
        self._file.write(json.dumps(record) + "\n")
        if isinstance(self._file, WholeFileLog):
            self._file.flush(force=kind != "train")  # epoch and run records never wait
        else:
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
