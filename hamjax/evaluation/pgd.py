"""The trainer's per-class clean and PGD accuracy over a split: the evaluation driver configured
with a clean pass and the CLI's pgdN stage, so `report.json` and `python -m hamjax.evaluate
--attacks pgdN` on the same checkpoint give the same per-class counts.

Robust means classified correctly clean and after the attack (RobustBench's convention); only
the clean-correct examples are attacked. Multi-host: every process feeds its rows of each chunk
and reads every example's result (`hamjax.evaluation.driver`).
"""

from __future__ import annotations

import jax
import numpy as np

from hamjax.evaluation.driver import Driver, class_counts
from hamjax.evaluation.specs import AttackSpec, attack_key, bound_attack, parse_attacks
from hamjax.evaluation.stages import (
    ROBUST_DEFINITION,
    ChainStage,
    attack_fn,
    clean_fn,
    model_logits,
    run_chain,
)
from hamjax.metrics import PerClassCounts


class PGDEvaluator:
    """Compiles the clean pass and PGD (`attack_config`: eps, step_size, steps) once and runs
    them over any split, on the model in eval mode."""

    robust_definition = ROBUST_DEFINITION

    def __init__(self, model, num_classes: int, attack_config, mesh, batch_size: int,
                 spec: AttackSpec | None = None):
        """spec: another attack chain at attack_config.eps instead of PGD (the APGD selection,
        `hamjax.evaluation.selection`)."""
        self.num_classes = num_classes
        self.eps = float(attack_config.eps)
        spec = spec or parse_attacks(f"pgd{int(attack_config.steps)}", eps=self.eps,
                                     num_classes=num_classes,
                                     step_size=float(attack_config.step_size))[0]
        self.name = spec.name
        logits_of = model_logits(model)
        self._driver = Driver(mesh, batch_size)
        self._clean = clean_fn(logits_of, checks=False)
        self._stages = [ChainStage(s.stage_id, attack_fn(logits_of, bound_attack(s, num_classes)))
                        for s in spec.stages]

    def attack_key(self, seed: int) -> jax.Array:
        """The key `python -m hamjax.evaluate --attacks pgdN --seed seed` uses."""
        return attack_key(seed, self.name)

    def __call__(self, variables, split, rng, progress: bool = False,
                 label: str = "") -> tuple[PerClassCounts, PerClassCounts]:
        """(clean, robust) per-class counts of every example of `split`; `rng` is the attack's
        root key (`attack_key`). progress: a bar per pass on a terminal, labelled `label`."""
        labels = np.asarray(split.labels, np.int32)
        n = len(labels)
        arrays = {"image": split.images, "label": labels,
                  "eps": np.full(n, self.eps, np.float32)}
        clean = self._driver.run(self._clean, variables, arrays, np.arange(n), rng,
                                 progress=progress, desc=f"{label} clean".strip())
        correct = clean.output("correct")
        chain = run_chain(self._driver, variables, arrays, correct, self._stages, rng,
                          progress=progress, label=label)
        return (class_counts(correct, labels, self.num_classes),
                class_counts(chain.robust, labels, self.num_classes))
