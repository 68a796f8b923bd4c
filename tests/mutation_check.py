"""Mutation check of the methods' reference tests: each mutant in `mutants.json` changes one
term, sign, reduction, BatchNorm mode, attack start or class-wise update, and the tests named
with it must fail. Prints one JSON line per mutant and a summary; exits 1 if any survives.

    python tests/mutation_check.py [--only ID ...]

Runs in a copy of the repository (the working tree is never edited), one pytest at a time
(about 5-110 s each on 2 CPU cores; the whole list takes about an hour), so it is a
maintainer's check, not part of CI. `tests/test_mutants_list.py` (in CI) keeps the list applicable
as the code changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MUTANTS = os.path.join(HERE, "mutants.json")
# The reference tests only: the training runs and the multi-device children test other things.
DESELECT = "not four_device and not resume and not trainer"


def load_mutants(path: str = MUTANTS) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def apply(source: str, mutant: dict) -> str:
    """The source with the mutant's one change; refuses a mutant that no longer applies once."""
    count = source.count(mutant["old"])
    if count != 1:
        raise ValueError(f"mutant {mutant['id']}: its text occurs {count} times in "
                         f"{mutant['file']} (expected once): update tests/mutants.json")
    return source.replace(mutant["old"], mutant["new"])


def run_one(copy: str, mutant: dict) -> dict:
    path = os.path.join(copy, mutant["file"])
    with open(path) as f:
        original = f.read()
    start = time.time()
    try:
        with open(path, "w") as f:
            f.write(apply(original, mutant))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
             "-o", "addopts=", "-q", "-x", "-m", "not slow", "-k", DESELECT, mutant["tests"]],
            cwd=copy, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=copy))
    finally:
        with open(path, "w") as f:
            f.write(original)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    # pytest exits 1 when a test failed; anything else (collection error, crash) is no verdict.
    verdict = {0: "survived", 1: "caught"}.get(proc.returncode, f"error rc={proc.returncode}")
    return {"id": mutant["id"], "verdict": verdict, "caught_by": failed[:1],
            "seconds": round(time.time() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="mutant ids to run")
    args = parser.parse_args()
    mutants = [m for m in load_mutants() if args.only is None or m["id"] in args.only]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "repo")
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "__pycache__", "benchmarks", "docs", "*.egg-info"))
        for mutant in mutants:
            results.append(run_one(copy, mutant))
            print(json.dumps(results[-1]), flush=True)
    survivors = [r["id"] for r in results if r["verdict"] != "caught"]
    print(json.dumps({"mutants": len(results), "caught": len(results) - len(survivors),
                      "not_caught": survivors}))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
