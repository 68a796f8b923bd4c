"""hamjax.metrics: per-class counts, fairness summaries, boundary error, table, ledger."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hamjax.metrics import (
    Ledger,
    PerClassCounts,
    boundary_error,
    fairness_summary,
    format_per_class_table,
    per_class_counts,
    per_class_counts_from_logits,
    wilson_interval,
)

NUM_CLASSES = 3
CLASS_NAMES = ("cat", "dog", "frog")
# 12 examples: 4 of class 0, 3 of class 1, 5 of class 2
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2], np.int32)
CLEAN_PRED = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 2, 2])  # 3/4, 1/3, 5/5 correct
ROBUST_PRED = np.array([0, 0, 1, 1, 0, 0, 2, 2, 2, 2, 0, 1])  # 2/4, 0/3, 3/5 correct


def _fake_model(predictions: np.ndarray):
    """A 'model' whose logits are fixed per example index (one-hot at the given prediction)."""
    table = jnp.asarray(5.0 * np.eye(NUM_CLASSES)[predictions] - 1.0, jnp.float32)
    return lambda index: table[index]


def _counts(predictions: np.ndarray) -> PerClassCounts:
    logits = _fake_model(predictions)(jnp.arange(len(LABELS)))
    return per_class_counts_from_logits(logits, jnp.asarray(LABELS))


def test_counts_from_fake_model():
    clean = _counts(CLEAN_PRED)
    np.testing.assert_array_equal(clean.correct, [3, 1, 5])
    np.testing.assert_array_equal(clean.total, [4, 3, 5])
    assert clean.correct.dtype == jnp.float32 and clean.total.dtype == jnp.float32


def test_fairness_summary_hand_computed():
    s = fairness_summary(_counts(CLEAN_PRED), CLASS_NAMES)
    assert s["per_class"] == pytest.approx([0.75, 1 / 3, 1.0])
    assert s["average"] == pytest.approx((0.75 + 1 / 3 + 1.0) / 3)  # class-balanced
    assert s["overall"] == pytest.approx(9 / 12)  # example-weighted
    assert s["worst"] == pytest.approx(1 / 3)
    assert s["worst_class"] == 1 and s["worst_class_name"] == "dog"
    mean = (0.75 + 1 / 3 + 1.0) / 3
    std = math.sqrt(((0.75 - mean) ** 2 + (1 / 3 - mean) ** 2 + (1.0 - mean) ** 2) / 3)
    assert s["std"] == pytest.approx(std)
    assert s["kind"] == "accuracy"
    for key in ("average", "overall", "worst", "std"):
        assert type(s[key]) is float
    assert all(type(v) is float for v in s["per_class"])
    assert type(s["worst_class"]) is int


def test_fairness_summary_as_error():
    s = fairness_summary(_counts(ROBUST_PRED), as_error=True)
    assert s["per_class"] == pytest.approx([0.5, 1.0, 0.4])
    assert s["average"] == pytest.approx((0.5 + 1.0 + 0.4) / 3)
    assert s["overall"] == pytest.approx(1 - 5 / 12)
    assert s["worst"] == pytest.approx(1.0) and s["worst_class"] == 1  # max error
    assert s["std"] == pytest.approx(np.std([0.5, 1.0, 0.4]))
    assert s["kind"] == "error" and "worst_class_name" not in s


def test_boundary_error_hand_computed():
    b = boundary_error(_counts(CLEAN_PRED), _counts(ROBUST_PRED), CLASS_NAMES)
    assert b["per_class"] == pytest.approx([0.25, 1 / 3, 0.4])
    assert b["average"] == pytest.approx((0.25 + 1 / 3 + 0.4) / 3)
    assert b["worst"] == pytest.approx(0.4)
    assert b["worst_class"] == 2 and b["worst_class_name"] == "frog"
    # = robust error - clean error
    rob = fairness_summary(_counts(ROBUST_PRED), as_error=True)["per_class"]
    cln = fairness_summary(_counts(CLEAN_PRED), as_error=True)["per_class"]
    assert b["per_class"] == pytest.approx(np.subtract(rob, cln))


def test_masked_rows_ignored():
    correct = jnp.asarray(CLEAN_PRED == LABELS)
    ref = per_class_counts(correct, jnp.asarray(LABELS), NUM_CLASSES)
    # pad with 4 rows (one correct, wrong labels included) that the mask excludes
    padded_correct = jnp.concatenate([correct, jnp.array([True, False, True, False])])
    padded_labels = jnp.concatenate([jnp.asarray(LABELS), jnp.array([0, 1, 2, 2], jnp.int32)])
    mask = jnp.arange(16) < 12
    got = per_class_counts(padded_correct, padded_labels, NUM_CLASSES, mask)
    np.testing.assert_array_equal(got.correct, ref.correct)
    np.testing.assert_array_equal(got.total, ref.total)


def test_jittable_and_add():
    f = jax.jit(per_class_counts, static_argnums=2)
    correct = jnp.asarray(CLEAN_PRED == LABELS)
    got = f(correct, jnp.asarray(LABELS), NUM_CLASSES, jnp.ones(12, bool))
    np.testing.assert_array_equal(got.correct, [3, 1, 5])
    acc = jax.jit(PerClassCounts.add)(PerClassCounts.zeros(NUM_CLASSES), correct, LABELS)
    np.testing.assert_array_equal(acc.total, [4, 3, 5])


@settings(max_examples=25, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=2, max_size=12
    ),
    split=st.integers(0, 12),
)
def test_merge_equals_concatenation(data, split):
    labels = np.array([d[0] for d in data], np.int32)
    correct = np.array([d[1] for d in data])
    mask = np.array([d[2] for d in data])
    split = min(split, len(data))
    whole = per_class_counts(correct, labels, 4, mask)
    a = per_class_counts(correct[:split], labels[:split], 4, mask[:split])
    b = per_class_counts(correct[split:], labels[split:], 4, mask[split:])
    for merged in (a.merge(b), a + b):
        np.testing.assert_array_equal(merged.correct, whole.correct)
        np.testing.assert_array_equal(merged.total, whole.total)
    # numpy reference
    for c in range(4):
        sel = (labels == c) & mask
        assert whole.total[c] == sel.sum() and whole.correct[c] == (sel & correct).sum()


def test_empty_class_is_nan_and_excluded():
    counts = PerClassCounts(correct=jnp.array([1.0, 0.0, 2.0]), total=jnp.array([2.0, 0.0, 2.0]))
    s = fairness_summary(counts)
    assert math.isnan(s["per_class"][1])
    assert s["average"] == pytest.approx(0.75) and s["worst"] == 0.5 and s["worst_class"] == 0
    assert s["std"] == pytest.approx(0.25)
    empty = fairness_summary(PerClassCounts.zeros(2))
    assert math.isnan(empty["average"]) and math.isnan(empty["overall"])
    assert empty["worst_class"] == -1


def test_table_contains_numbers():
    results = {"clean": _counts(CLEAN_PRED), "pgd20": _counts(ROBUST_PRED)}
    table = format_per_class_table(results, CLASS_NAMES)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("class"))
    assert header.split() == ["class", "clean", "pgd20", "boundary"]
    row = {line.split()[0]: line.split()[1:] for line in lines if line.split()}
    assert row["cat"] == ["75.00", "50.00", "25.00"]
    assert row["dog"] == ["33.33", "0.00", "33.33"]
    assert row["frog"] == ["100.00", "60.00", "40.00"]
    assert row["average"] == ["69.44", "36.67", "32.78"]
    assert row["worst"] == ["33.33", "0.00", "40.00"]
    assert row["std"][0] == f"{100 * np.std([0.75, 1 / 3, 1.0]):.2f}"
    assert row["overall"] == ["75.00", "41.67", "-"]
    # The worst classes' intervals: dog 1/3 and 0/3 (scipy's Wilson bounds); none for boundary.
    assert row["worst_ci95"] == ["6.15-79.23", "0.00-56.15", "-"]


def test_table_errors_and_no_boundary():
    results = {"clean": _counts(CLEAN_PRED), "pgd20": _counts(ROBUST_PRED)}
    table = format_per_class_table(results, as_error=True, boundary=None, precision=1)
    row = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.split()}
    assert row["class"] == ["clean", "pgd20"]
    assert row["1"] == ["66.7", "100.0"]
    assert row["worst"] == ["66.7", "100.0"]
    explicit = format_per_class_table(results, CLASS_NAMES, boundary=("clean", "pgd20"))
    assert explicit == format_per_class_table(results, CLASS_NAMES)


def test_ledger():
    total = Ledger.zeros()
    step = Ledger.of(forward=8 * 11, backward=8 * 11)

    @jax.jit
    def accumulate(total, step):
        return total + step

    for _ in range(3):
        total = accumulate(total, step)
    assert float(total.forward) == 264.0 and float(total.backward) == 264.0
    assert float(total.total()) == 528.0
    assert total.forward.dtype == jnp.float32
    assert len(jax.tree.leaves(total)) == 2  # a pytree: lives in TrainState


def test_ledger_keeps_forward_and_backward_apart():
    """Unequal counts (a final-eval forward has no backward): adding and totalling must not mix
    the two columns, which equal counts would hide."""
    a = Ledger.of(forward=5, backward=3) + Ledger.of(forward=7, backward=2)
    assert float(a.forward) == 12.0 and float(a.backward) == 5.0
    assert float(a.total()) == 17.0


@pytest.mark.parametrize("correct, total", [(30, 100), (0, 100), (100, 100), (1, 3), (47, 200),
                                            (5, 7)])
def test_wilson_interval_matches_scipy(correct, total):
    from scipy.stats import binomtest

    want = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(np.array([correct]), np.array([total]))
    assert lo[0] == pytest.approx(want.low, abs=1e-9) and hi[0] == pytest.approx(want.high,
                                                                                  abs=1e-9)


def test_wilson_interval_holds_the_estimate_and_narrows_with_more_examples():
    # 30% on 100 images: about 22-40; on 1000, about 27-33 (the interval shrinks like 1/sqrt(n)).
    lo, hi = wilson_interval(np.array([30.0, 300.0, 0.0]), np.array([100.0, 1000.0, 0.0]))
    assert lo[0] < 0.3 < hi[0] and lo[1] < 0.3 < hi[1]
    assert (hi[1] - lo[1]) < 0.35 * (hi[0] - lo[0])
    assert math.isnan(lo[2]) and math.isnan(hi[2])  # an empty class has no interval


def test_summary_gives_the_worst_class_its_interval():
    acc = fairness_summary(_counts(ROBUST_PRED))  # worst: dog, 0 of 3
    lo, hi = wilson_interval(np.array([0]), np.array([3]))
    assert acc["worst_class"] == 1 and acc["worst_interval95"] == pytest.approx([lo[0], hi[0]])
    err = fairness_summary(_counts(ROBUST_PRED), as_error=True)  # worst: dog, error 3 of 3
    assert err["worst_interval95"] == pytest.approx([1 - hi[0], 1 - lo[0]])
    assert all(math.isnan(v) for v in fairness_summary(PerClassCounts.zeros(2))[
        "worst_interval95"])
