"""Per-class clean and PGD accuracy over a whole split: the trainer's validation and the
evaluation command share this code."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from hamjax.attacks import pgd
from hamjax.data import eval_batches, images_to_float, stratified_subset
from hamjax.metrics import PerClassCounts, per_class_counts
from hamjax.models import apply_model
from hamjax.sharding import process_rows, replicated, shard_batch


def subset(split, num_examples: int, seed: int, num_classes: int):
    """A fixed, seeded, class-stratified subset (0 or more than the split: all of it)."""
    if not num_examples or num_examples >= len(split):
        return split
    return stratified_subset(split, num_examples, seed, num_classes)


def make_eval_step(model, num_classes: int, attack_config) -> Callable:
    """`eval_step(variables, batch, rng) -> (clean_counts, robust_counts)` per class.

    The attack is PGD with `attack_config` (eps, step_size, steps) on the model in eval mode;
    padded rows (batch["mask"] False) count nowhere.
    """

    def eval_step(variables, batch, rng):
        x, y, mask = images_to_float(batch["image"]), batch["label"], batch["mask"]

        def logits_fn(z):
            return apply_model(model, variables, z, bn_mode="eval")[0]

        clean_correct = jnp.argmax(logits_fn(x), -1) == y
        x_adv, info = pgd(
            logits_fn, x, y, rng, eps=attack_config.eps, step_size=attack_config.step_size,
            steps=attack_config.steps, random_start=True,
        )
        robust_correct = ~info.success
        return (
            per_class_counts(clean_correct, y, num_classes, mask),
            per_class_counts(robust_correct, y, num_classes, mask),
        )

    return eval_step


class PGDEvaluator:
    """Compiles the per-class evaluation once and runs it over any split."""

    def __init__(self, model, num_classes: int, attack_config, mesh, batch_size: int):
        self.num_classes = num_classes
        self.mesh = mesh
        self.batch_size = batch_size
        # Counts come back replicated: every process reads the global totals.
        self._step = jax.jit(
            make_eval_step(model, num_classes, attack_config),
            in_shardings=(replicated(mesh), None, replicated(mesh)),
            out_shardings=replicated(mesh),
        )

    def __call__(self, variables, split, rng) -> tuple[PerClassCounts, PerClassCounts]:
        """(clean, robust) per-class counts; every example counted once (padding masked), each
        process feeding only its rows of every batch."""
        clean = PerClassCounts.zeros(self.num_classes)
        robust = PerClassCounts.zeros(self.num_classes)
        rows = process_rows(self.mesh, self.batch_size)
        for i, batch in enumerate(eval_batches(split, self.batch_size, rows)):
            batch = shard_batch(batch, self.mesh)
            c, r = self._step(variables, batch, jax.random.fold_in(rng, i))
            clean, robust = clean.merge(c), robust.merge(r)
        return jax.device_get(clean), jax.device_get(robust)
