"""How the benchmark scripts hand over their result: JSON on stdout, and to --out if given."""

from __future__ import annotations

import json
from typing import Any


def emit(result: Any, out: str | None, indent: int = 1) -> None:
    """Prints `result` as JSON and, when `out` is set, writes the same text there."""
    text = json.dumps(result, indent=indent)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
