"""One run per workdir: a lock file `<workdir>/.lock` naming its holder (host, pid, start time,
heartbeat).

Two runs writing the same checkpoints and metrics.jsonl would interleave and corrupt them, so a
second launch fails at once naming the holder. The lock is created only if absent: O_CREAT|O_EXCL
on a local disk, a create-only upload on a bucket (`gs://`: gcsfs's exclusive write, an upload
with the generation precondition ifGenerationMatch=0; any fsspec filesystem's `open(..., "xb")`).
The holder rewrites its heartbeat every HEARTBEAT_S seconds. A lock is stale, and taken over,
when it names this host and a pid that is no longer alive, or (any host) when its heartbeat is
older than STALE_AFTER_S: after a hard kill and a SLURM requeue onto another node, or a
preempted TPU VM, the rerun takes the lock back by itself. `break_lock` removes any lock
(--break_lock: the user says no run is using the workdir).

A multi-process run takes the lock on process 0 only, after `check_shared` has shown that every
process sees the same workdir (a local path on several hosts would give each host its own
checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from hamjax.errors import ConfigError, WorkdirLockedError
from hamjax.paths import is_remote, resolve

LOCK_NAME = ".lock"
HEARTBEAT_S = 60.0
# Ten missed heartbeats: a live run's lock is never judged stale over a slow bucket or a few
# minutes of clock skew between hosts, and a dead run's lock is free within a quarter hour.
STALE_AFTER_S = 900.0
# A takeover of a remote lock is checked after this long: two processes that both removed a stale
# lock and created their own find out which one won (object stores have no atomic rename).
SETTLE_S = 2.0


def lock_path(workdir: str | os.PathLike) -> str:
    return os.fspath(resolve(workdir) / LOCK_NAME)


def holder_record(pid: int | None = None, now: float | None = None) -> dict:
    """What the lock file says about its holder: this host and process, now."""
    now = time.time() if now is None else now
    return {"host": socket.gethostname(), "pid": os.getpid() if pid is None else pid,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
            "started_unix": now, "heartbeat_unix": now, "token": uuid.uuid4().hex}


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


def heartbeat_age(holder: dict, now: float) -> float | None:
    """Seconds since the holder last wrote its heartbeat (its start for a lock written before
    heartbeats); None when the record says neither."""
    for key in ("heartbeat_unix", "started_unix"):
        value = holder.get(key)
        if isinstance(value, (int, float)):
            return now - float(value)
    return None


def is_stale(holder: dict, now: float | None = None, stale_after: float = STALE_AFTER_S) -> bool:
    """Whether a lock may be taken over: its heartbeat is older than `stale_after`, or it names
    this host and a process that is gone (or this very process: a killed run whose pid this one
    reuses, as containers restart pid numbering). An unreadable record ({}) is never stale."""
    now = time.time() if now is None else now
    age = heartbeat_age(holder, now)
    if age is not None and age > stale_after:
        return True
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if holder.get("host") != socket.gethostname():
        return False
    return pid == os.getpid() or not pid_alive(pid)


def _parse(text: str | bytes) -> dict:
    """A holder record; an unreadable (half-written or foreign) file reads as {} so that it is
    reported, never silently taken over."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


# ---------------------------------------------------------------------------------------------
# Storage: a local file, or an object reached through fsspec (gs:// with gcsfs).


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _read(path: str) -> dict | None:
    """The holder recorded in `path`; None when there is no lock."""
    try:
        if is_remote(path):
            fs, key = _fs(path)
            fs.invalidate_cache()
            return _parse(fs.cat_file(key))
        with open(path) as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


def _create(path: str, holder: dict) -> bool:
    """Writes `holder` into a new `path`; False when it already exists."""
    data = json.dumps(holder).encode()
    try:
        if is_remote(path):
            fs, key = _fs(path)
            with fs.open(key, "xb") as f:
                f.write(data)
            return True
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _overwrite(path: str, holder: dict) -> None:
    """Replaces the lock's record in one step (the heartbeat)."""
    data = json.dumps(holder).encode()
    if is_remote(path):
        fs, key = _fs(path)
        fs.pipe_file(key, data)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _delete(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if is_remote(path):
            fs, key = _fs(path)
            fs.rm_file(key)
        else:
            os.unlink(path)


def _remove_stale(path: str, stale: dict) -> None:
    """Removes the lock if it still holds `stale`. Locally it is first renamed to a unique name
    (atomic, so of two processes taking over only one moves it) and checked after the move; a
    live lock moved by mistake is put back. A remote lock is deleted after a fresh read (the
    taker then checks its own lock after SETTLE_S, see `acquire`)."""
    if is_remote(path):
        if _read(path) == stale:
            _delete(path)
        return
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


def describe(holder: dict, now: float | None = None) -> str:
    if not holder:
        return "an unreadable lock file"
    age = heartbeat_age(holder, time.time() if now is None else now)
    beat = "" if age is None else f", last heartbeat {max(age, 0):.0f} s ago"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
            f"{holder.get('started')}{beat}")


# ---------------------------------------------------------------------------------------------
# Heartbeats of the locks this process holds.

_BEATING: dict[str, tuple[threading.Event, threading.Lock]] = {}


def _beat(path: str, holder: dict, stop: threading.Event, mutex: threading.Lock,
          every: float) -> None:
    """Rewrites the heartbeat until `stop`; leaves a lock that is no longer this one's alone.
    `mutex` keeps a rewrite from landing after `release` removed the lock."""
    while not stop.wait(every):
        with mutex, contextlib.suppress(Exception):  # a failed beat is retried at the next
            if stop.is_set() or _read(path) != holder:
                return
            holder["heartbeat_unix"] = time.time()
            _overwrite(path, holder)


def _start_heartbeat(path: str, holder: dict, every: float = HEARTBEAT_S) -> None:
    stop, mutex = threading.Event(), threading.Lock()
    _BEATING[path] = (stop, mutex)
    threading.Thread(target=_beat, args=(path, dict(holder), stop, mutex, every), daemon=True,
                     name="hamjax-lock-heartbeat").start()


def _stop_heartbeat(path: str) -> None:
    stop, mutex = _BEATING.pop(path, (None, None))
    if stop is not None:
        with mutex:
            stop.set()


# ---------------------------------------------------------------------------------------------
# The public API.


def acquire(workdir: str | os.PathLike, sleep: Callable[[float], None] = time.sleep) -> str:
    """Takes the workdir's lock for this process and returns the lock's path (a URL for a
    remote workdir). Raises WorkdirLockedError naming the holder and the fix."""
    path = lock_path(workdir)
    remote = is_remote(path)
    if not remote:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as err:
            raise ConfigError(f"the workdir {os.path.dirname(path)} cannot be created: "
                              f"{err.strerror} ({err.filename})") from err
    took_over = False
    for _ in range(10):  # each retry follows a lock that vanished or a stale one removed
        mine = holder_record()
        if _create(path, mine):
            if remote and took_over:
                sleep(SETTLE_S)
                if _read(path) != mine:  # another process took the stale lock over as well
                    took_over = False
                    continue
            _start_heartbeat(path, mine)
            return path
        took_over = False
        holder = _read(path)
        if holder is None:
            continue
        if not is_stale(holder):
            raise WorkdirLockedError(
                f"the workdir {os.path.dirname(path)} is in use by {describe(holder)}; wait for "
                "that run to finish or use another --workdir (if no run is using it, rerun with "
                "--break_lock)")
        _remove_stale(path, holder)
        took_over = True
    raise WorkdirLockedError(f"could not take the lock {path}: other processes keep taking it")


def _share_token_path(workdir: str | os.PathLike, token: str) -> str:
    return os.fspath(resolve(workdir) / f".shared-check-{token}")


def _write_token(path: str, token: str) -> bool:
    """Process 0's side of the check: False when it cannot write (the others still meet it at
    the barrier, then all report the failure)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(token)
        return True
    except OSError:
        return False


def _sees_token(path: str, token: str) -> bool:
    try:
        with open(path) as f:
            return f.read() == token
    except OSError:
        return False


def unshared_processes(workdir: str | os.PathLike, process_index: int, process_count: int,
                       broadcast: Callable, allgather: Callable) -> list[int]:
    """The processes that cannot see the file process 0 writes into a local `workdir` (empty
    when every host sees the same directory). Collective: every process calls it.

    broadcast(uint8 array) returns process 0's array on every process; allgather(int) returns
    every process's value in process order (jax.experimental.multihost_utils in a run)."""
    import numpy as np

    token = broadcast(np.frombuffer(uuid.uuid4().bytes, np.uint8)).tobytes().hex()
    path = _share_token_path(workdir, token)
    wrote = _write_token(path, token) if process_index == 0 else True
    allgather(1)  # a barrier: the file is written before anyone looks
    seen = [int(x) for x in allgather(int(wrote and _sees_token(path, token)))]
    if process_index == 0:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return [i for i, ok in enumerate(seen[:process_count]) if not ok]


def check_shared(workdir: str | os.PathLike, process_index: int, process_count: int,
                 broadcast: Callable | None = None, allgather: Callable | None = None) -> None:
    """Raises ConfigError on every process unless all of them see one local `workdir`: on
    several hosts a local path is usually each host's own disk, and every host would write its
    part of each checkpoint there. Remote (gs://) workdirs and one-process runs pass."""
    if process_count <= 1 or is_remote(workdir):
        return
    if broadcast is None or allgather is None:
        import numpy as np
        from jax.experimental import multihost_utils

        broadcast = multihost_utils.broadcast_one_to_all
        allgather = lambda x: np.asarray(multihost_utils.process_allgather(np.int32(x)))  # noqa
    missing = unshared_processes(workdir, process_index, process_count, broadcast, allgather)
    if 0 in missing:
        raise ConfigError(f"--workdir={os.fspath(workdir)}: process 0 cannot write into "
                          f"{resolve(workdir)}; give a folder it can create and write")
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise ConfigError(
            f"--workdir={os.fspath(workdir)} is not one directory shared by every process: "
            f"process(es) {shown} cannot see the file process 0 wrote into {resolve(workdir)}. "
            "Fix: use a gs:// workdir or a folder on a file system every host mounts (NFS, "
            "Lustre, GPFS)")


def acquire_run_lock(workdir: str | os.PathLike) -> str | None:
    """What a (possibly multi-process) run does first: checks that every process sees the
    workdir, then locks it on process 0; returns the lock's path there, None elsewhere."""
    import jax

    check_shared(workdir, jax.process_index(), jax.process_count())
    return acquire(workdir) if jax.process_index() == 0 else None


def break_lock(workdir: str | os.PathLike) -> dict | None:
    """Removes the workdir's lock whoever holds it (--break_lock); returns the record removed."""
    path = lock_path(workdir)
    holder = _read(path)
    if holder is not None:
        _delete(path)
    return holder


def release(path: str | None) -> None:
    """Stops the heartbeat and removes the lock if this process holds it (never another run's
    lock)."""
    if path is None:
        return
    _stop_heartbeat(path)
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        _delete(path)
