"""One run per workdir: a lock file `<workdir>/.lock` naming its holder (host, pid, start time).

Two runs writing the same checkpoints and metrics.jsonl would interleave and corrupt them, so a
second launch fails at once naming the holder. The file is created atomically (O_CREAT|O_EXCL).
A lock left by a killed run is stale when it names this host and a pid that is no longer alive;
it is then taken over. A lock from another host cannot be checked from here: the error says how
to remove it by hand.

Only local workdirs are locked: `gs://` (any URL) workdirs have no atomic exclusive create
through etils.epath, so they get no lock (`acquire` returns None) and the user must not share
one between runs. The Trainer of a multi-process run takes the lock on process 0 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid

from hamjax.errors import WorkdirLockedError
from hamjax.paths import is_remote

LOCK_NAME = ".lock"


def lock_path(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), LOCK_NAME)


def holder_record(pid: int | None = None) -> dict:
    """What the lock file says about its holder: this host and process, now."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid() if pid is None else pid,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
            "started_unix": now}


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this host (one of another user counts as alive; a
    killed one its parent has not reaped yet, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): os.kill's answer stands
        return True
    return state not in ("Z", "X")


def is_stale(holder: dict) -> bool:
    """A lock of this host whose process is gone; locks of other hosts are never judged stale.

    A lock naming this very process is stale too: it was left by a killed run whose pid this
    process now reuses (containers restart pid numbering), or by an earlier run in this process.
    """
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return False
    return pid == os.getpid() or not pid_alive(pid)


def _read(path: str) -> dict | None:
    """The holder recorded in `path`; None when the file is gone. An unreadable (half-written or
    foreign) file reads as {} so that it is reported, never silently taken over."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _create(path: str, holder: dict) -> bool:
    """Writes `holder` into a new `path`; False when the file already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


def _remove_stale(path: str, stale: dict) -> None:
    """Removes the lock file if it still holds `stale`: it is first renamed to a unique name
    (atomic, so of two processes taking over only one moves it) and checked after the move; a
    live lock moved by mistake (created between our read and the rename) is put back."""
    moved = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return
    if _read(moved) == stale:
        os.unlink(moved)
        return
    with contextlib.suppress(FileExistsError):
        os.link(moved, path)
    os.unlink(moved)


def _describe(holder: dict) -> str:
    if not holder:
        return "an unreadable lock file"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}")


def acquire(workdir: str | os.PathLike) -> str | None:
    """Takes the workdir's lock for this process and returns the lock file's path (None for a
    remote workdir, which is not locked). Raises WorkdirLockedError naming the holder."""
    if is_remote(workdir):
        return None
    path = lock_path(workdir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mine = holder_record()
    for _ in range(10):  # each retry follows a lock that vanished or a stale one removed
        if _create(path, mine):
            return path
        holder = _read(path)
        if holder is None:
            continue
        if not is_stale(holder):
            raise WorkdirLockedError(
                f"the workdir {os.path.dirname(path)} is in use by {_describe(holder)}; wait for "
                "that run to finish or use another --workdir (if no run is using it, delete "
                f"{path})")
        _remove_stale(path, holder)
    raise WorkdirLockedError(f"could not take the lock {path}: other processes keep taking it")


def release(path: str | None) -> None:
    """Removes the lock file if this process holds it (never another run's lock)."""
    if path is None:
        return
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

