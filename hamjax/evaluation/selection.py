"""The attack that selects the checkpoint on validation: `config.eval.select_attack`.

- "pgd": the trainer's PGD-N (config.eval.steps, step_size), the same chain as
  `python -m hamjax.evaluate --attacks pgdN`.
- "apgd": APGD-CE, then targeted APGD (DLR towards each of the top
  `config.eval.select_apgd_targets` other classes) on the examples APGD-CE missed, each with
  `config.eval.select_apgd_steps` iterations: AutoAttack's two gradient stages, as the field
  selects checkpoints on a held-out split with a strong attack. Methods that reweight or drop
  examples by the training attack's outcome can defend PGD and not other attacks; selecting on
  PGD then rewards that inflation.

`config.eval.select_on` picks the statistic (average or worst class) of whichever attack runs.
Both go through the evaluation driver (`hamjax.evaluation.pgd.PGDEvaluator`): chunks are padded
and sharded over the mesh and unpadded on return, so each example counts once on any number of
devices, and each example's randomness is folded from its index.

Default budget (10 steps, 2 targets), counted in example passes as the ledger counts them (one
forward or one backward of one example). A validation pass on `eval.num_examples` examples,
worst case (every example clean-correct and surviving APGD-CE):
  clean pass 1 + APGD-CE (clean logits 1, start gradient 2, 2 per step, judge 1) = 2S + 4
  + APGD-T (clean logits 1, per target 2 (S + 1), judge 1) = 2T (S + 1) + 2
  = 2 (S + 1)(T + 1) + 5 = 71 passes per example at S = 10, T = 2,
  x 2,000 examples (configs/fashion_mnist_*.py) = 142,000 passes.
A PGD-AT epoch of those configs (58,000 training examples, PGD-10: 11 forwards + 11 backwards
each) is 1,276,000 passes: the pass costs 11.1% of it, and 19.9% of HAM's cheapest epoch (ledger
0.56x PGD-AT; 23.7% at its 0.47x wall-time ratio). T = 3 would cost 186,000 (26% of that HAM
epoch). Attack backwards skip the weight gradients a training backward computes, so the real
share is lower. The budget scales with eval.num_examples / the training split.
"""

from __future__ import annotations

from typing import Any

from hamjax.errors import ConfigError
from hamjax.evaluation.pgd import PGDEvaluator
from hamjax.evaluation.specs import AttackSpec, Stage

APGD_SELECTION = "apgd"  # the chain's name: its root key is attack_key(seed, APGD_SELECTION)


def apgd_selection_spec(eps: float, steps: int, targets: int) -> AttackSpec:
    """APGD-CE (`steps` iterations, one run) then, with targets > 0, APGD-T towards the top
    `targets` classes on its survivors; every setting resolved, so records say what ran."""
    stages = [Stage("apgd-ce", "apgd-ce", {"steps": int(steps), "n_restarts": 1})]
    if targets > 0:
        stages.append(Stage("apgd-t", "apgd-t", {"steps": int(steps), "n_restarts": 1,
                                                  "n_target_classes": int(targets)}))
    settings = {"attack": APGD_SELECTION, "eps": float(eps), "norm": "linf",
                "components": {s.kind: dict(s.kwargs) for s in stages}}
    return AttackSpec(APGD_SELECTION, settings, tuple(stages))


def check_selection(eval_config, num_classes: int) -> None:
    """ConfigError when the APGD selection cannot run on `num_classes` classes (the config's
    own validation cannot know the dataset's class count)."""
    if eval_config.select_attack != APGD_SELECTION:
        return
    targets = int(eval_config.select_apgd_targets)
    if targets > num_classes - 1:
        raise ConfigError(
            f"config.eval.select_apgd_targets={targets}: the data has {num_classes} classes, so "
            f"at most {num_classes - 1} other classes can be targets; lower it")
    if targets > 0 and num_classes < 4:
        raise ConfigError(
            f"config.eval.select_apgd_targets={targets}: targeted APGD's DLR loss needs >= 4 "
            f"classes and the data has {num_classes}; set it to 0 (APGD-CE only)")


class APGDEvaluator(PGDEvaluator):
    """The trainer's evaluator with the APGD selection chain in place of PGD-N: the same
    clean pass, driver and (clean, robust) per-class counts."""

    def __init__(self, model, num_classes: int, eval_config, mesh, batch_size: int):
        check_selection(eval_config, num_classes)
        spec = apgd_selection_spec(float(eval_config.eps), int(eval_config.select_apgd_steps),
                                   int(eval_config.select_apgd_targets))
        super().__init__(model, num_classes, eval_config, mesh, batch_size, spec=spec)


def selection_evaluator(pgd_evaluator: PGDEvaluator, model, num_classes: int, eval_config,
                        mesh) -> PGDEvaluator:
    """The evaluator that selects checkpoints: `pgd_evaluator` itself for "pgd" (so its
    validation pass is shared with methods that read it), else the APGD chain."""
    if eval_config.select_attack == APGD_SELECTION:
        return APGDEvaluator(model, num_classes, eval_config, mesh, int(eval_config.batch_size))
    return pgd_evaluator


def selection_label(eval_config) -> str:
    """How the epoch log line names the selecting attack: "PGD-20", "APGD-CE+T"."""
    if eval_config.select_attack == APGD_SELECTION:
        return "APGD-CE+T" if int(eval_config.select_apgd_targets) else "APGD-CE"
    return f"PGD-{int(eval_config.steps)}"


def selection_record(eval_config) -> dict[str, Any]:
    """What report.json and metrics.jsonl record about checkpoint selection: the attack, its
    settings, and the statistic it is ranked by (split: validation, eval.num_examples)."""
    record: dict[str, Any] = {"select_attack": str(eval_config.select_attack),
                              "select_on": str(eval_config.select_on),
                              "split": "val", "num_examples": int(eval_config.num_examples),
                              "label": selection_label(eval_config)}
    if eval_config.select_attack == APGD_SELECTION:
        spec = apgd_selection_spec(float(eval_config.eps), int(eval_config.select_apgd_steps),
                                   int(eval_config.select_apgd_targets))
        record.update(name=spec.name, settings=spec.settings)
    else:
        record.update(name=f"pgd{int(eval_config.steps)}",
                      settings={"attack": "pgd", "eps": float(eval_config.eps),
                                "step_size": float(eval_config.step_size),
                                "steps": int(eval_config.steps), "random_start": True,
                                "loss": "ce"})
    return record
