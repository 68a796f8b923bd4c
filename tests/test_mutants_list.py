"""The mutation check's list stays applicable: each mutant changes its file in exactly one place
and names a test file that exists (the check itself, `tests/mutation_check.py`, is too slow for
CI)."""

from __future__ import annotations

import os

import pytest
from mutation_check import REPO, apply, load_mutants

MUTANTS = load_mutants()


def test_ids_are_unique_and_every_method_with_a_reference_is_mutated():
    ids = [m["id"] for m in MUTANTS]
    assert len(ids) == len(set(ids))
    prefixes = {i.split("-")[0] for i in ids}
    assert {"mart", "awp", "trades", "cfa", "dafa", "wat", "faal", "ema", "ham", "caat", "frl",
            "gairat", "fat", "pgdat", "pgd", "apgd", "square", "fab", "ledger"} <= prefixes


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m["id"])
def test_each_mutant_applies_once_and_names_existing_tests(mutant):
    with open(os.path.join(REPO, mutant["file"])) as f:
        source = f.read()
    assert apply(source, mutant) != source
    assert os.path.exists(os.path.join(REPO, mutant["tests"]))


def test_a_mutant_that_no_longer_applies_is_named():
    with pytest.raises(ValueError, match="mutant x: its text occurs 0 times in f.py"):
        apply("nothing here", {"id": "x", "file": "f.py", "old": "absent", "new": "y"})
