"""Real data: PGD-AT buys robustness that standard training lacks (small CNN, Fashion-MNIST)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import EPS

from hamjax.data import stratified_subset
from hamjax.evaluation.pgd import PGDEvaluator
from hamjax.metrics import fairness_summary
from hamjax.train import make_mesh

EVAL_EXAMPLES = 1000


def _evaluate(models, method: str, eps: float = EPS, steps: int = 10,
              num_examples: int = EVAL_EXAMPLES):
    from ml_collections import ConfigDict

    attack = ConfigDict({"eps": eps, "step_size": max(eps / 4, 1e-4), "steps": steps})
    evaluator = PGDEvaluator(models.ctx.model, models.splits.num_classes, attack, make_mesh(),
                             batch_size=500)
    split = stratified_subset(models.splits.test, num_examples, 0, models.splits.num_classes)
    clean, robust = evaluator(models.variables(method), split, jax.random.PRNGKey(0))
    return fairness_summary(clean), fairness_summary(robust)


@pytest.mark.slow
def test_pgd_at_is_robust_where_standard_training_is_not(fashion_mnist_models):
    std_clean, std_robust = _evaluate(fashion_mnist_models, "standard")
    at_clean, at_robust = _evaluate(fashion_mnist_models, "pgd_at")
    print(f"standard clean {std_clean['overall']:.3f} PGD-10 {std_robust['overall']:.3f}; "
          f"PGD-AT clean {at_clean['overall']:.3f} PGD-10 {at_robust['overall']:.3f}")
    assert std_clean["overall"] > 0.80
    assert at_robust["overall"] > std_robust["overall"] + 0.25
    assert at_clean["overall"] > 0.6


@pytest.mark.slow
def test_robust_accuracy_falls_monotonically_with_eps(fashion_mnist_models):
    accs = [_evaluate(fashion_mnist_models, "pgd_at", eps=e, num_examples=500)[1]["overall"]
            for e in (0.0, 0.05, 0.1, 0.2)]
    print("PGD-10 accuracy by eps", accs)
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False)), accs
    assert accs[0] > accs[-1] + 0.2


AA_EXAMPLES = 50


@pytest.mark.slow
def test_autoattack_is_no_weaker_than_pgd20_and_square_alone_is_weaker_than_apgd(
    fashion_mnist_models,
):
    """On the PGD-AT model: AutoAttack standard (Square cut to 500 queries on this CPU) robust
    accuracy <= PGD-20's on the same examples; black-box Square alone is weaker than APGD-CE."""
    from hamjax.attacks import pgd
    from hamjax.evaluation.autoattack import run_autoattack

    models = fashion_mnist_models
    split = stratified_subset(models.splits.test, AA_EXAMPLES, 1, models.splits.num_classes)
    x = split.images.astype("float32") / 255.0
    y = split.labels
    logits_fn = models.logits_fn("pgd_at")
    key = jax.random.PRNGKey(0)
    _, info = jax.jit(lambda x, y: pgd(logits_fn, x, y, key, eps=EPS, step_size=EPS / 4,
                                       steps=20))(x, y)
    pgd20 = 1.0 - float(info.success.mean())
    _, aa = run_autoattack(logits_fn, x, y, key, eps=EPS, num_classes=10, n_queries=500,
                           batch_size=AA_EXAMPLES)
    # APGD-CE runs first on every clean-correct example, so AutoAttack's first stage is APGD-CE
    # alone; Square alone needs its own run.
    apgd_ce_only = float(np.mean(np.asarray(aa.robust_after["apgd-ce"])))
    _, square_only = run_autoattack(logits_fn, x, y, key, eps=EPS, num_classes=10,
                                    version="custom", attacks=["square"], n_queries=500,
                                    batch_size=AA_EXAMPLES)
    print(f"PGD-20 {pgd20:.3f} AutoAttack {aa.robust_accuracy:.3f} APGD-CE "
          f"{apgd_ce_only:.3f} Square {square_only.robust_accuracy:.3f}; "
          f"warnings: {aa.warnings}")
    assert aa.robust_accuracy <= pgd20
    assert square_only.robust_accuracy > apgd_ce_only
    assert 0.0 < aa.robust_accuracy
