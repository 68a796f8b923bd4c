"""The resume file of an evaluation: every stage's per-example results, rewritten after each chunk.

Per example, not per chunk: a result depends on its example alone (per-example keys), so what
was done under one batch size or chunking stays valid under another, and a stage whose
population changed (an earlier stage's settings changed) keeps the examples it already did.
A stage whose own settings changed starts over; a file written for another checkpoint, split,
sample, eps or seed (the fingerprint) is ignored with a note.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hamjax.evaluation.driver import StageRecord
from hamjax.paths import resolve, write_text_atomic

VERSION = 2
_TIMINGS = ("seconds", "compile_seconds", "images", "computed_chunks")


def bits(a: np.ndarray) -> str:
    """bool[N] as a string of 0/1 (compact, diff-able JSON)."""
    return (np.asarray(a, bool).astype(np.uint8) + 48).tobytes().decode()


def unbits(s: str) -> np.ndarray:
    """The inverse of `bits`."""
    return np.frombuffer(s.encode(), np.uint8) == 49


def json_default(value: Any) -> Any:
    """json.dump's fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def jsonable(value: Any) -> Any:
    """value as it reads back from JSON (tuples -> lists), so comparisons survive a reload."""
    return json.loads(json.dumps(value, default=json_default))


def crc(a: np.ndarray) -> int:
    """A checksum of an int array (labels, positions) for fingerprints."""
    return zlib.crc32(np.ascontiguousarray(a, np.int64).tobytes())


def _encode(record: StageRecord, settings: Any) -> dict[str, Any]:
    bad = [k for k, v in record.outputs.items() if v.dtype != bool or v.ndim != 1]
    if bad:
        raise ValueError(f"only per-example bool outputs can be saved, not {bad}")
    return {"settings": settings, "done": bits(record.done),
            "outputs": {k: bits(v) for k, v in record.outputs.items()},
            **{k: getattr(record, k) for k in _TIMINGS}}


def _decode(saved: Mapping[str, Any], n: int) -> StageRecord | None:
    done = unbits(saved.get("done", ""))
    if len(done) != n:
        return None
    outputs = {k: unbits(v) for k, v in saved.get("outputs", {}).items()}
    return StageRecord(done=done, outputs=outputs, **{k: saved[k] for k in _TIMINGS})


class ResumeFile:
    """Per-stage records on disk (atomic rewrite); in memory only when `path` is None."""

    def __init__(self, path: str | None, fingerprint: Mapping[str, Any], resume: bool,
                 log: Callable[[str], None]):
        self.path = path
        self.fingerprint = jsonable(dict(fingerprint))
        self.n = int(fingerprint["n"])
        self.records: dict[str, StageRecord] = {}
        self._settings: dict[str, Any] = {}
        old = self._read(path, log) if path and resume and resolve(path).exists() else {}
        self._saved: dict[str, Any] = dict(old.get("stages", {}))
        self.extra: dict[str, Any] = dict(old.get("extra", {}))  # e.g. the randomness check

    def _read(self, path: str, log: Callable[[str], None]) -> dict[str, Any]:
        try:
            old = json.loads(resolve(path).read_text())
        except (OSError, ValueError):
            log(f"note: could not read {path}; starting over")
            return {}
        if old.get("version") == VERSION and old.get("fingerprint") == self.fingerprint:
            return old
        log(f"note: {path} was written for other settings (checkpoint step, split, examples, "
            "eps or seed); starting over")
        return {}

    def stage(self, stage_id: str, settings: Mapping[str, Any]) -> StageRecord:
        """The stage's record: the saved one if its settings match, else a fresh one."""
        settings = jsonable(dict(settings))
        saved = self._saved.get(stage_id)
        record = None
        if saved is not None and saved.get("settings") == settings:
            record = _decode(saved, self.n)
        self.records[stage_id] = record or StageRecord.empty(self.n)
        self._settings[stage_id] = settings
        return self.records[stage_id]

    def save(self) -> None:
        """Rewrites the file with every stage's record (no-op without a path)."""
        if not self.path:
            return
        stages = dict(self._saved)
        stages.update({k: _encode(r, self._settings[k]) for k, r in self.records.items()})
        data = {"version": VERSION, "fingerprint": self.fingerprint, "stages": stages,
                "extra": self.extra}
        write_text_atomic(self.path, json.dumps(data, default=json_default))
