"""hamjax.evaluation.paired: two evaluations of the same images compared image by image, checked
against analytic cases and the binomial standard error of a paired difference."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hamjax.evaluation import paired
from hamjax.evaluation.resume import bits

NUM_CLASSES = 4
PER_CLASS = 100
LABELS = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)


def _result(robust: np.ndarray, **fields) -> dict:
    """An evaluation JSON as hamjax.evaluate writes it, reduced to what a pairing reads."""
    out = {"split": "test", "num_examples": len(LABELS), "seed": 0, "eps": 0.1, "norm": "linf",
           "sampling": "class-stratified subset, seed 0",
           "class_names": ["a", "b", "c", "d"], "combined": {"attacks": ["autoattack"]},
           "per_example": {"labels": LABELS.tolist(), "clean_correct": bits(robust),
                           "robust": bits(robust)}}
    out.update(fields)
    return out


def test_a_run_against_itself_has_no_gap_and_no_spread():
    robust = np.random.default_rng(0).random(len(LABELS)) < 0.6
    comp = paired.paired_gaps(LABELS, robust, robust, NUM_CLASSES, resamples=500)
    for key in ("average", "worst"):
        assert comp[key]["gap"] == 0 and comp[key]["interval"] == [0, 0]


def test_gaps_are_the_hand_computed_differences():
    # A: classes at 90/80/70/30%; B: 60/60/60/60% -> average 67.5 - 60, worst 30 - 60.
    robust_a = np.concatenate([np.arange(PER_CLASS) < k for k in (90, 80, 70, 30)])
    robust_b = np.concatenate([np.arange(PER_CLASS) < 60 for _ in range(NUM_CLASSES)])
    comp = paired.paired_gaps(LABELS, robust_a, robust_b, NUM_CLASSES, resamples=500)
    assert comp["average"]["gap"] == pytest.approx(0.075)
    assert comp["worst"]["gap"] == pytest.approx(-0.30)
    assert comp["a"]["worst_class"] == 3 and comp["b"]["worst"] == pytest.approx(0.6)
    lo, hi = comp["worst"]["interval"]
    assert lo < -0.30 < hi


def test_the_average_gaps_interval_matches_the_paired_standard_error():
    """Per image d = a - b in {-1, 0, 1}; the class-balanced average gap's standard error is
    sqrt(sum_c var_c(d) / n_c) / C. The bootstrap's 95% interval spans about 2 x 1.96 of it."""
    rng = np.random.default_rng(1)
    robust_a = rng.random(len(LABELS)) < 0.7
    flip = rng.random(len(LABELS)) < 0.15  # B differs from A on 15% of the images
    robust_b = np.where(flip, ~robust_a, robust_a)
    d = robust_a.astype(float) - robust_b
    se = np.sqrt(sum(d[LABELS == c].var() / PER_CLASS for c in range(NUM_CLASSES))) / NUM_CLASSES
    comp = paired.paired_gaps(LABELS, robust_a, robust_b, NUM_CLASSES, resamples=4000)
    lo, hi = comp["average"]["interval"]
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.12)
    assert lo < comp["average"]["gap"] < hi


def test_pairing_is_narrower_than_two_independent_samples():
    """B = A with 5 images per class flipped: the paired interval of the average gap is far
    narrower than what two independent samples of these accuracies would give."""
    rng = np.random.default_rng(2)
    robust_a = rng.random(len(LABELS)) < 0.5
    robust_b = robust_a.copy()
    for c in range(NUM_CLASSES):
        robust_b[np.flatnonzero(LABELS == c)[:5]] ^= True
    comp = paired.paired_gaps(LABELS, robust_a, robust_b, NUM_CLASSES, resamples=2000)
    lo, hi = comp["average"]["interval"]
    unpaired_se = np.sqrt(2 * 0.25 / PER_CLASS / NUM_CLASSES)  # p = 0.5 in both runs
    assert (hi - lo) < 0.5 * (2 * 1.96 * unpaired_se)


def test_evaluations_of_other_images_are_refused_with_the_field():
    robust = np.ones(len(LABELS), bool)
    with pytest.raises(ValueError, match=r"(?s)not evaluated on the same images.*num_examples"
                                         r".*Fix: evaluate both with the same"):
        paired.compare_results(_result(robust), _result(robust, num_examples=500))
    shuffled = _result(robust)
    shuffled["per_example"] = dict(shuffled["per_example"], labels=LABELS[::-1].tolist())
    with pytest.raises(ValueError, match="labels differ"):
        paired.compare_results(_result(robust), shuffled)
    old = _result(robust)
    del old["per_example"]
    with pytest.raises(ValueError, match=r"no per-example results.*resume file"):
        paired.compare_results(old, old, "old.json", "old.json")


def test_the_command_line_prints_the_gap_table(tmp_path, capsys):
    robust_a = np.concatenate([np.arange(PER_CLASS) < k for k in (90, 80, 70, 50)])
    robust_b = np.concatenate([np.arange(PER_CLASS) < k for k in (90, 80, 70, 30)])
    for name, robust in (("a.json", robust_a), ("b.json", robust_b)):
        (tmp_path / name).write_text(json.dumps(_result(robust)))
    assert paired.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                        "--resamples", "300"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("worst class"))
    assert line.split()[2:5] == ["50.0", "30.0", "+20.0"]
    assert "worst classes: d (A), d (B)" in out
    with pytest.raises(SystemExit, match="no such evaluation JSON"):
        paired.main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])
