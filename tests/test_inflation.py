"""PGD-N vs AutoAttack inflation (hamjax.evaluation.inflation) without a trained run: the margin
against NumPy, the gap arithmetic and per-stage attribution pinned on a fake model whose
cross-entropy gradient is exactly zero (PGD-N is blind) while targeted APGD's scale-free DLR
loss still breaks every example within eps of a class boundary; the selection checks, and older
runs' configs filled with the new fields' defaults."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hamjax.errors import ConfigError
from hamjax.evaluation import inflation
from hamjax.evaluation.runner import run_attacks
from hamjax.evaluation.selection import apgd_selection_spec, check_selection, selection_record
from hamjax.evaluation.specs import parse_attacks
from hamjax.sharding import make_mesh

EPS = 0.05
PROTOTYPES = (0.2, 0.4, 0.6, 0.8)  # class k owns the mean pixel values nearest PROTOTYPES[k]
SCALE = 1e5  # logit gaps of hundreds: softmax saturates to exactly 0/1 in float32
NAMES = ("cat", "dog", "shirt", "ship")

# (mean pixel, label, what it is). Boundaries at 0.3, 0.5, 0.7; eps 0.05 moves the mean by 0.05.
EXAMPLES = (
    (0.15, 0, "robust"), (0.27, 0, "near"), (0.27, 0, "near"),
    (0.40, 1, "robust"), (0.47, 1, "near"), (0.33, 1, "near"), (0.4999, 1, "pgd breaks"),
    (0.60, 2, "robust"), (0.5001, 2, "pgd breaks"), (0.40, 2, "clean wrong"),
    (0.85, 3, "robust"), (0.80, 3, "robust"), (0.73, 3, "near"),
)


class Saturated(nn.Module):
    """logits_k = SCALE (2 p_k m - p_k^2) of the mean pixel m: argmax is the nearest prototype;
    a logit gap 0.4 SCALE |m - boundary| between neighbours. 0.03 from a boundary the gap is
    1200, so the cross-entropy gradient is exactly 0 (PGD and APGD-CE cannot move); 1e-4 from
    it, the gap is 4 and PGD follows the gradient across."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        m = x.reshape(x.shape[0], -1).mean(-1, keepdims=True)
        p = jnp.asarray(PROTOTYPES, jnp.float32)
        return SCALE * (2.0 * p * m - p * p)


def _toy_split() -> tuple[np.ndarray, np.ndarray]:
    means = np.array([e[0] for e in EXAMPLES], np.float32)
    images = np.broadcast_to(means[:, None, None, None], (len(means), 4, 4, 1)).copy()
    return images, np.array([e[1] for e in EXAMPLES], np.int32)


def test_logit_margin_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 7)).astype(np.float32)
    logits[:8, 3] = logits[:8, 5] = logits[:8].max(axis=1)  # the label ties with the best other
    labels = rng.integers(0, 7, 64).astype(np.int32)
    labels[:8] = 3
    others = np.where(np.eye(7, dtype=bool)[labels], -np.inf, logits)
    expected = logits[np.arange(64), labels] - others.max(axis=1)
    got = np.asarray(inflation.logit_margins(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert np.all(got[:8] == 0)


@pytest.fixture(scope="module")
def toy_outcome():
    """PGD-10 (no random start: the premise must not hang on a draw) and fast AutoAttack."""
    images, labels = _toy_split()
    specs = parse_attacks("pgd10,autoattack", eps=EPS, num_classes=4, fast=True,
                          overrides={"pgd": {"random_start": False}, "square": {"n_queries": 20}})
    outcome = run_attacks(Saturated(), {"params": {}}, images, labels, 4, specs, eps=EPS, seed=0,
                          batch_size=8, log=lambda s: None, progress=False, margins=True,
                          mesh=make_mesh())
    return specs, outcome, labels


def test_pgd_misses_what_targeted_apgd_breaks_and_the_gap_says_so(toy_outcome):
    specs, outcome, labels = toy_outcome
    kind = np.array([e[2] for e in EXAMPLES])
    # the premise, per example
    np.testing.assert_array_equal(outcome.clean_correct, kind != "clean wrong")
    np.testing.assert_array_equal(outcome.robust["pgd10"], np.isin(kind, ["robust", "near"]))
    np.testing.assert_array_equal(outcome.robust["autoattack"], kind == "robust")
    report = inflation.inflation_report(specs, outcome, labels, NAMES, threshold=5.0)
    comp = report["comparisons"][0]
    assert (comp["pgd"], comp["strong"]) == ("pgd10", "autoattack")
    # by hand: robust under PGD / under AutoAttack / examples per class
    pgd = np.array([3 / 3, 3 / 4, 1 / 3, 3 / 3])
    strong = np.array([1 / 3, 1 / 4, 1 / 3, 2 / 3])
    np.testing.assert_allclose(comp["per_class"]["pgd"], pgd)
    np.testing.assert_allclose(comp["per_class"]["strong"], strong)
    np.testing.assert_allclose(comp["per_class"]["gap_points"], 100 * (pgd - strong))
    assert comp["per_class"]["examples"] == [3, 4, 3, 3]
    # every example PGD missed was broken by targeted APGD, none by the other stages
    assert comp["broken_after_pgd"] == {"apgd-ce": [0, 0, 0, 0], "apgd-t": [2, 2, 0, 1],
                                        "fab-t": [0, 0, 0, 0], "square": [0, 0, 0, 0]}
    assert comp["pgd_only"] == [0, 0, 0, 0]
    # the two examples PGD broke were broken inside AutoAttack too, but are not in the gap
    broken_in_aa = sum(outcome.fooled_by[s.stage_id] for s in specs[1].stages).astype(bool)
    np.testing.assert_array_equal(broken_in_aa, np.isin(kind, ["near", "pgd breaks"]))
    # gap = (broken after PGD - pgd only) / class size, for every class
    broken = np.sum([comp["broken_after_pgd"][s] for s in comp["broken_after_pgd"]], axis=0)
    np.testing.assert_allclose(comp["per_class"]["gap_points"],
                               100 * (broken - np.array(comp["pgd_only"])) / [3, 4, 3, 3])
    assert comp["average"]["gap_points"] == pytest.approx(100 * np.mean(pgd - strong))
    assert comp["exceeds_threshold"] and report["flag"]
    assert comp["classes_over_threshold"] == ["cat", "dog", "ship"]
    assert report["warnings"] == [comp["warning"]]
    assert comp["warning"].startswith("pgd10 overstates robustness against autoattack by 37.5 "
                                      "points on average and by more than 5 points on cat "
                                      "(+66.7), dog (+50.0), ship (+33.3)")
    table = report["table"]
    assert "shirt" in table and "apgd-t" in table and "+66.7" in table
    assert report["margins"]["median"][0] == pytest.approx(0.4 * SCALE * 0.03, rel=1e-3)


def test_margins_are_the_model_s_and_the_chart_is_written(toy_outcome, tmp_path):
    specs, outcome, labels = toy_outcome
    groups = inflation.margin_groups(outcome.clean_correct, outcome.robust["pgd10"],
                                     outcome.robust["autoattack"], "pgd10", "autoattack")
    kind = np.array([e[2] for e in EXAMPLES])
    expected = {"robust to both": "robust", "broken only by autoattack": "near",
                "broken by pgd10": "pgd breaks", "misclassified clean": "clean wrong"}
    assert list(groups) == list(expected)
    for name, what in expected.items():  # a partition: each example in exactly one group
        np.testing.assert_array_equal(groups[name], kind == what, err_msg=name)
    images, _ = _toy_split()
    logits = np.asarray(Saturated().apply({"params": {}}, jnp.asarray(images)), np.float64)
    others = np.where(np.eye(4, dtype=bool)[labels], -np.inf, logits)
    np.testing.assert_allclose(outcome.margins, logits[np.arange(len(labels)), labels]
                               - others.max(1), rtol=1e-5)
    assert outcome.margins[9] < 0  # the clean-wrong example
    path = str(tmp_path / "margins.png")
    report = inflation.inflation_report(specs, outcome, labels, NAMES, threshold=5.0)
    inflation.chart_margins(path, report, outcome, labels, "toy")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_threshold_and_empty_classes():
    """A gap equal to the threshold does not flag; a class without examples never does."""
    labels = np.array([0, 0, 1, 1])
    clean = np.ones(4, bool)
    pgd = np.array([1, 1, 1, 0], bool)
    strong = np.array([1, 0, 1, 0], bool)  # class 0: gap 50 points; class 1: 0
    comp = inflation.compare("pgd20", "autoattack", clean, pgd, strong,
                             {"autoattack/apgd-ce": ~strong}, labels, ["a", "b", "c"], 50.0)
    assert comp["per_class"]["gap_points"][:2] == [50.0, 0.0]
    assert np.isnan(comp["per_class"]["gap_points"][2])
    assert comp["average"]["gap_points"] == pytest.approx(25.0)
    assert not comp["exceeds_threshold"] and comp["warning"] is None
    assert inflation.compare("pgd20", "autoattack", clean, pgd, strong, {}, labels,
                             ["a", "b", "c"], 49.9)["classes_over_threshold"] == ["a"]
    for bad in (-1, float("nan"), "x"):
        with pytest.raises(ConfigError, match="inflation_threshold"):
            inflation.check_threshold(bad)


def test_pairs_only_pgd_ce_beside_an_apgd_attack():
    def names(text):
        specs = parse_attacks(text, eps=EPS, num_classes=10)
        return [(p.name, s.name) for p, s in inflation.pairs(specs)]

    assert names("pgd20,autoattack") == [("pgd20", "autoattack")]
    assert names("pgd10,cw20,apgd-t,square") == [("pgd10", "apgd-t")]
    assert names("pgd20,fab-t,square") == [] and names("autoattack") == []


def _eval_config(**fields) -> ml_collections.ConfigDict:
    from hamjax.config import base_config

    ev = base_config().eval
    ev.update(fields)
    return ev


def test_apgd_selection_settings_and_class_checks():
    spec = apgd_selection_spec(0.1, steps=7, targets=3)
    assert [(s.kind, s.kwargs) for s in spec.stages] == [
        ("apgd-ce", {"steps": 7, "n_restarts": 1}),
        ("apgd-t", {"steps": 7, "n_restarts": 1, "n_target_classes": 3})]
    assert [s.kind for s in apgd_selection_spec(0.1, steps=7, targets=0).stages] == ["apgd-ce"]
    record = selection_record(_eval_config(select_attack="apgd", select_apgd_steps=7,
                                           select_apgd_targets=3, select_on="robust_average"))
    assert record["select_attack"] == "apgd" and record["select_on"] == "robust_average"
    assert record["settings"]["components"]["apgd-t"]["n_target_classes"] == 3
    assert selection_record(_eval_config())["name"] == "pgd20"
    with pytest.raises(ConfigError, match=r"config\.eval\.select_apgd_targets=10.*at most 9"):
        check_selection(_eval_config(select_attack="apgd", select_apgd_targets=10), 10)
    with pytest.raises(ConfigError, match=r"config\.eval\.select_apgd_targets=1.*set it to 0"):
        check_selection(_eval_config(select_attack="apgd", select_apgd_targets=1), 3)
    check_selection(_eval_config(select_attack="apgd", select_apgd_targets=0), 3)
    check_selection(_eval_config(select_attack="pgd", select_apgd_targets=10), 10)


def test_a_run_saved_before_the_selection_fields_stays_evaluable():
    """A checkpoint's config written before eval.select_* existed: the fields come back at
    their defaults (selection by PGD, as then), named in a note; its own values stay."""
    from hamjax.config import base_config, config_to_json, method_config, validate_config
    from hamjax.run import with_missing_defaults

    config = base_config()
    config.method = method_config("pgd_at")
    saved = config_to_json(config)
    saved["eval"]["steps"] = 7
    for field in ("select_attack", "select_apgd_steps", "select_apgd_targets"):
        del saved["eval"][field]
    del saved["method"]["awp_gamma"]  # a method's own field added since
    with pytest.raises(ConfigError, match=r"config\.eval\.select_apgd_steps is missing"):
        validate_config(ml_collections.ConfigDict(saved))
    notes: list[str] = []
    config = with_missing_defaults(saved, notes.append)
    validate_config(config)
    assert config.eval.select_attack == "pgd" and config.eval.steps == 7
    assert config.method.awp_gamma == 0.0
    assert notes == ["note: the run's config predates method.awp_gamma, eval.select_attack, "
                     "eval.select_apgd_steps, eval.select_apgd_targets; using the defaults"]
    assert "select_attack" not in saved["eval"]  # the saved dict is left as it was
