"""Paths that may be local or remote (`gs://...`): one resolver for workdirs (checkpoints, logs,
reports, the lock) and data dirs, so a multi-host run can write into and read from a bucket every
host reaches. Remote paths go through etils.epath (gs:// by gcsfs, or TensorFlow's gfile where
TensorFlow is installed); pathlib would turn gs://b/x into gs:/b/x."""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as gs://bucket/dir (any `scheme://`), False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths with ~ expanded and made absolute (a later chdir must
    not move the run), URLs kept verbatim (abspath would turn gs://b/x into <cwd>/gs:/b/x)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def local_dir_problem(path: str | os.PathLike, flag: str = "--workdir") -> str | None:
    """Why a local directory could not be used (it is a file, or a parent is a file or not
    writable), naming `flag`; None when it exists as a folder or can be created. Creates
    nothing: every process of a run may call it."""
    if is_remote(path):
        return None
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(target) and not os.path.isdir(target):
        return f"{flag}={os.fspath(path)} is a file; give a directory (new or existing)"
    if os.path.isdir(target):
        return None
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return (f"{flag}={os.fspath(path)} cannot be created: {parent} is a file, not a "
                "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"{flag}={os.fspath(path)} cannot be created: no permission to write in "
                f"{parent}")
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` so a reader never sees half a file: locally through a temporary file and a
    rename; on a bucket in one object write (objects appear whole)."""
    target = resolve(path)
    if is_remote(path):
        target.write_text(text)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """A matplotlib figure as PNG at a local path or a bucket URL."""
    with resolve(path).open("wb") as f:
        fig.savefig(f, format="png", **kwargs)


def local_cache_dir(url: str, env: str, default: str) -> str:
    """Where a local copy of the remote folder `url` is kept: under $`env` if set, else `default`
    (~ expanded), in a subfolder named after the URL (gs://b/tfds -> <root>/gs/b/tfds)."""
    root = os.environ.get(env) or os.path.expanduser(default)
    scheme, _, rest = os.fspath(url).partition("://")
    return os.path.join(root, scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")])


def stage_tree(source: str | os.PathLike, target: str) -> int:
    """Copies the folder `source` (local or remote) to the local folder `target`, skipping the
    files already there with the same size; returns how many files were copied. Each file is
    written to a temporary name and renamed into place, so processes of one machine staging at
    once, or a copy cut short, never leave a partial file under its real name."""
    copied = 0
    for entry in resolve(source).iterdir():
        destination = os.path.join(target, entry.name)
        if entry.is_dir():
            copied += stage_tree(entry, destination)
            continue
        size = entry.stat().length
        if os.path.isfile(destination) and os.path.getsize(destination) == size:
            continue
        os.makedirs(target, exist_ok=True)
        partial = f"{destination}.partial-{os.getpid()}"
        with entry.open("rb") as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(partial, destination)
        copied += 1
    return copied
