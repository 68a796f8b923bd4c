"""Workdir paths that may be local or remote (`gs://...`): one resolver for checkpoints, logs and
reports, so a multi-host run can write into a bucket every host reaches."""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL such as gs://bucket/dir (any `scheme://`), False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: local paths made absolute (a later chdir must not move the run),
    URLs kept verbatim (abspath would turn gs://b/x into <cwd>/gs:/b/x)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))
