"""Run logs: a JSON-lines metrics file, TensorBoard scalars and a per-epoch progress bar.

The console shows what a person watches (loss, robust accuracy on the batch, images/s, HAM's
hard fraction, an ETA) and never internal flags; on a terminal or in a notebook as a tqdm bar,
elsewhere (CI, a log file) as one `epoch e/E [###...]` line per log interval.

The workdir may be local or a `gs://` URL. Object stores have no append (gcsfs opens "a" as
"w", and an object appears only when closed), so a remote metrics.jsonl is read once and
rewritten whole, at most every 30 s for train records and at once for the others. tensorboardX
writes gs:// event files itself only when `google-cloud-storage` is installed (its GCS record
writer); without it the TensorBoard scalars of a remote workdir go to a local directory, said
once on the console, and metrics.jsonl stays the complete record.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import numpy as np
from etils import epath
from tqdm.auto import tqdm

from hamjax.errors import disk_full_error, is_disk_full
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


# (metric key, name shown): the step metrics worth watching; the rest (bucket_index,
# empty_batch, update_applied, warmup, finite, lr, ...) stay in metrics.jsonl only.
BAR_METRICS = (("loss", "loss"), ("train_robust_acc", "robust_acc"),
               ("hard_fraction", "hard_frac"))
# Metrics of what a step trained on: a step that applies no update (HAM's empty batches, its
# cross-batch steps that only gather rows) trains on nothing and records 0 for them.
PER_UPDATE_METRICS = ("loss", "train_robust_acc")
_PER_UPDATE_SHOWN = {shown for key, shown in BAR_METRICS if key in PER_UPDATE_METRICS}
_BAR_WIDTH = 20


def bar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The watched metrics present in `metrics` (host values), by the name shown."""
    return {shown: float(metrics[key]) for key, shown in BAR_METRICS if key in metrics}


def progress_line(epoch: int, epochs: int, done: int, steps: int, images_per_s: float,
                  eta_s: float, shown: Mapping[str, float]) -> str:
    """One `epoch e/E [###.....] done/steps` line: what a non-terminal console gets instead of a
    redrawn bar (tests and log readers look for its `epoch e/E [` start)."""
    filled = int(_BAR_WIDTH * done / max(steps, 1))
    values = "".join(f" {k}={v:.4g}" for k, v in shown.items())
    return (f"epoch {epoch + 1}/{epochs} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{done}/{steps} {images_per_s:.1f} img/s eta {tqdm.format_interval(eta_s)}{values}")


def _in_notebook() -> bool:
    """Whether tqdm.auto chose its notebook widget (Jupyter, Colab)."""
    from tqdm import autonotebook, std  # already imported, without its warning, by tqdm.auto

    return autonotebook.tqdm is not std.tqdm


def _width(stream: TextIO) -> int | None:
    """The terminal's columns behind `stream`; None when it has no file descriptor. A pseudo
    terminal nobody sized (`script`, some `docker exec -t`) says 0: tqdm would draw nothing."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def live_console(stream: TextIO) -> bool:
    """Whether `stream` redraws a bar in place: a notebook, or a terminal with a width (not a
    pipe or a file, which get progress lines instead)."""
    isatty = getattr(stream, "isatty", None)
    if _in_notebook():
        return True
    return bool(isatty and isatty()) and _width(stream) != 0


class EpochBar:
    """One epoch's progress over its steps. `step` is called after every step and only moves a
    counter (no device sync); `log` gets host metrics at the log interval and updates the
    shown values (live) or prints one progress line (not live)."""

    def __init__(self, stream: TextIO, epoch: int, epochs: int, start: int, steps: int,
                 batch_size: int, live: bool, enabled: bool = True):
        self._stream, self._live, self._enabled = stream, live, enabled
        self._epoch, self._epochs, self._steps, self._batch = epoch, epochs, steps, batch_size
        self._trained: dict[str, float] = {}  # the last trained step's loss and accuracy
        self._bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{epochs}",
                         unit="step", file=stream, leave=True, dynamic_ncols=True,
                         mininterval=0.5, disable=not (enabled and live))

    def step(self) -> None:
        self._bar.update(1)

    def log(self, done: int, images_per_s: float, metrics: Mapping[str, Any]) -> None:
        """Shows the watched metrics after `done` steps of the epoch at `images_per_s`."""
        if not self._enabled:
            return
        shown = bar_metrics(metrics)
        if float(metrics.get("update_applied", 1.0)) == 0.0:  # trained nothing: no loss to show
            shown = {**self._trained,
                     **{k: v for k, v in shown.items() if k not in _PER_UPDATE_SHOWN}}
        else:
            self._trained = {k: v for k, v in shown.items() if k in _PER_UPDATE_SHOWN}
        if self._live:
            self._bar.set_postfix({**{k: f"{v:.4g}" for k, v in shown.items()},
                                   "img/s": f"{images_per_s:.1f}"}, refresh=False)
            return
        eta = (self._steps - done) * self._batch / max(images_per_s, 1e-9)
        line = progress_line(self._epoch, self._epochs, done, self._steps, images_per_s, eta,
                             shown)
        print(line, file=self._stream, flush=True)

    def close(self) -> None:
        self._bar.close()


def _records(data: bytes) -> Iterator[bytes]:
    """The payloads of a TFRecord stream: 8-byte little-endian length, 4-byte CRC, payload,
    4-byte CRC (CRCs not checked; a record cut short by a live writer ends the stream)."""
    at = 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + length
        if end + 4 > len(data):
            return
        yield data[at + 12:end]
        at = end + 4


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from the event files in `logdir`, without TensorBoard installed
    (tensorboardX writes the files but cannot read them): for tests and notebooks."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(epath.Path(logdir).glob("events.out.tfevents.*")):
        for payload in _records(path.read_bytes()):
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


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


@contextlib.contextmanager
def _writing(path: str | os.PathLike | None) -> Iterator[None]:
    """A full disk while writing the log is one DiskFullError naming the file, not a
    traceback from deep inside the training loop."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(path, err) from err


class RunLogger:
    """Appends records to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes (multi-host runs would otherwise interleave).
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, stream=sys.stdout):
        self.enabled = enabled
        self.stream = stream
        self._file = None
        self._tb = None
        self._bar: EpochBar | None = None
        self.metrics_path: str | None = None  # where the records and scalars went (or None)
        self.tensorboard_logdir: str | None = None
        if enabled:
            root = resolve(workdir)
            path = root / "metrics.jsonl"
            self.metrics_path = os.fspath(path)
            with _writing(path):
                root.mkdir(parents=True, exist_ok=True)
                self._file = WholeFileLog(path) if is_remote(root) else path.open("a")
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard is optional; the JSON log is the record
                return
            logdir, warning = tensorboard_dir(root, remote_ok=_tensorboardx_gcs())
            if warning:
                self.print(warning)
            self._tb = SummaryWriter(logdir)
            self.tensorboard_logdir = logdir

    def write(self, kind: str, step: int, **values: Any) -> None:
        """One record: {"kind", "step", "time", ...values}; numeric scalars go to TensorBoard."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time(), **_plain(values)}
        with _writing(self.metrics_path):
            self._file.write(json.dumps(record) + "\n")
            if isinstance(self._file, WholeFileLog):
                self._file.flush(force=kind != "train")  # epoch and run records never wait
            else:
                self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, int(step))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """TensorBoard scalars by full tag (`val/robust_worst`); None values are skipped."""
        if self._tb is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._tb.add_scalar(tag, float(value), int(step))
        self._tb.flush()

    def print(self, message: str) -> None:
        """A console line that leaves a live progress bar intact."""
        if self.enabled:
            tqdm.write(message, file=self.stream)
            self.stream.flush()

    def epoch_bar(self, epoch: int, epochs: int, start: int, steps: int,
                  batch_size: int) -> EpochBar:
        """The progress of one epoch from step `start`; a previous bar left open is closed."""
        if self._bar is not None:
            self._bar.close()
        self._bar = EpochBar(self.stream, epoch, epochs, start, steps, batch_size,
                             live=self.enabled and live_console(self.stream),
                             enabled=self.enabled)
        return self._bar

    def close(self) -> None:
        """Closes an open bar (a run stopped mid-epoch), the metrics file and TensorBoard."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            with _writing(self.metrics_path):
                self._file.close()
        if self._tb is not None:
            self._tb.close()
