"""A local folder standing in for Cloud Storage: `gs://bucket/key` is `<root>/bucket/key`.

Everything above the wire runs as it does against a real bucket: hamjax.paths and etils.epath
take gs:// paths to fsspec's "gs" filesystem (gcsfs in production, this folder here), the
workdir lock makes its create-only write through it, and orbax takes its gs:// branches (commit
files instead of renames, its GCS deletion). Only the two calls that would reach Google are
redirected: tensorstore's "gcs" kvstore (the checkpoint arrays) becomes its "file" kvstore on the
same folder, and orbax's hierarchical-namespace query answers no.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import fsspec
import fsspec.registry
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

PROTOCOLS = ("gs", "gcs")


def bucket_class(root: str) -> type:
    """An fsspec filesystem for gs:// URLs, rooted at the local folder `root`."""

    class LocalBucket(DirFileSystem):
        protocol = PROTOCOLS
        cachable = False

        def __init__(self, *args, **kwargs):
            super().__init__(path=root, fs=LocalFileSystem(auto_mkdir=True))

    return LocalBucket


@contextlib.contextmanager
def local_bucket(root: str, monkeypatch) -> Iterator[str]:
    """Serves gs:// from `root` for the duration; yields `root`."""
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    os.makedirs(root, exist_ok=True)
    cls = bucket_class(root)
    previous = {p: fsspec.registry.get(p) for p in PROTOCOLS}
    for protocol in PROTOCOLS:
        fsspec.register_implementation(protocol, cls, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()

    def file_kvstore(ckpt_path: str) -> dict:
        assert ckpt_path.startswith("gs://"), ckpt_path
        return {"driver": "file", "path": os.path.join(root, ckpt_path[len("gs://"):])}

    monkeypatch.setattr(tensorstore_utils, "_get_kvstore_for_gcs", file_kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    try:
        yield root
    finally:
        for protocol, impl in previous.items():
            if impl is None:
                # Back to gcsfs, which fsspec finds by name when asked.
                sys.modules["fsspec.registry"]._registry.pop(protocol, None)
            else:
                fsspec.register_implementation(protocol, impl, clobber=True)
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
