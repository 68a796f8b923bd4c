"""hamjax.evaluation without a trained run: the one definition of robust accuracy (a fixed-logit
fake model where PGD turns a clean-wrong example right), the driver's chunking and resume."""

from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from hamjax.attacks import pgd
from hamjax.evaluation.driver import Driver, StageRecord, class_counts
from hamjax.evaluation.pgd import PGDEvaluator
from hamjax.sharding import make_mesh

EPS = 0.1


class Basin(nn.Module):
    """2 classes on the mean pixel m: logits (1e-3 - 100 (m - 0.5)^2, 0). Class 0 only in a
    tiny basin around m = 0.5 (|m - 0.5| < 0.0032), class 1 everywhere else."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        d = x.reshape(x.shape[0], -1).mean(-1) - 0.5
        return jnp.stack([1e-3 - 100.0 * d ** 2, jnp.zeros_like(d)], axis=-1)


def _split(pixels, labels) -> SimpleNamespace:
    """A split of [0, 1] float images (an ArraySplit holds uint8, which cannot be 0.5)."""
    return SimpleNamespace(images=np.asarray(pixels, np.float32).reshape(-1, 1, 1, 1),
                           labels=np.asarray(labels, np.int32))


def test_clean_wrong_example_is_never_robust():
    """Example 0 sits in the basin with label 1: wrong clean, and any PGD point (the random
    start leaves the basin) is classified right. It counts as not robust."""
    split = _split([0.5, 0.2, 0.5], [1, 1, 0])  # clean-wrong, robust, fooled
    logits_fn = lambda z: Basin().apply({"params": {}}, z)  # noqa: E731
    x_adv, info = pgd(logits_fn, jnp.asarray(split.images), jnp.asarray(split.labels),
                      jax.random.PRNGKey(0), eps=EPS, step_size=EPS / 4, steps=5)
    assert not bool(info.success[0])  # the premise: PGD ends on the right label for example 0

    config = ConfigDict({"eps": EPS, "step_size": EPS / 4, "steps": 5})
    evaluator = PGDEvaluator(Basin(), 2, config, make_mesh(), batch_size=2)
    clean, robust = evaluator({"params": {}}, split, evaluator.attack_key(0))
    np.testing.assert_array_equal(np.asarray(clean.correct), [1, 1])  # class 0: 1/1; 1: 1/2
    np.testing.assert_array_equal(np.asarray(robust.correct), [0, 1])  # only example 1
    np.testing.assert_array_equal(np.asarray(robust.total), [1, 2])


def _index_fn(params, batch, key):
    del params
    noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(batch["index"])
    return {"index": batch["index"], "noise": noise, "real": batch["mask"]}


def test_driver_pads_unpads_and_resumes_any_chunking():
    n, population = 23, np.arange(3, 23, 2)
    arrays = {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": np.zeros(n, np.int32)}
    key = jax.random.PRNGKey(1)
    reports = []
    full = Driver(make_mesh(), 4).run(_index_fn, None, arrays, population, key,
                                      on_chunk=reports.append)
    assert [len(r.positions) for r in reports] == [4, 4, 2]  # the last chunk padded, unpadded
    assert all(r.outputs["real"].all() for r in reports)
    np.testing.assert_array_equal(np.flatnonzero(full.done), population)
    np.testing.assert_array_equal(full.outputs["index"][population], population)

    partial = StageRecord.empty(n)  # half done with chunks of 4, the rest with chunks of 3
    Driver(make_mesh(), 4).run(_index_fn, None, arrays, population[:4], key, record=partial)
    resumed = Driver(make_mesh(), 3).run(_index_fn, None, arrays, population, key,
                                         record=partial)
    np.testing.assert_array_equal(resumed.outputs["noise"], full.outputs["noise"])
    assert resumed.images == len(population)


def _rows_fn(params, batch, key):
    """Per example: its index, and the number of rows the chunk ran on."""
    del params, key
    rows = jnp.full(batch["index"].shape, batch["index"].shape[0], jnp.int32)
    return {"index": batch["index"], "rows": rows, "real": batch["mask"]}


def test_a_short_tail_runs_in_smaller_pieces_with_little_padding():
    """Chunks of 16 (sizes 16, 8, 4, 2): a tail of 3 runs on 4 rows, a tail of 9 as 8 + 1 (on
    8 + 2 rows), never padded by as much as the smallest size; the padding rows are masked and
    dropped, the results per example unchanged."""
    driver = Driver(make_mesh(), 16)
    assert [driver.chunk_size(c) for c in (1, 2, 3, 4, 5, 8, 9, 16)] == [2, 2, 4, 4, 8, 8, 16, 16]
    assert driver.chunk_plan(19) == [16, 3]
    assert driver.chunk_plan(25) == [16, 8, 1]
    assert driver.chunk_plan(32) == [16, 16]
    for count in range(1, 70):
        plan = driver.chunk_plan(count)
        assert sum(plan) == count
        assert sum(driver.chunk_size(c) for c in plan) - count < 2
    big = Driver(make_mesh(), 256)
    assert big.chunk_plan(132) == [128, 4] and big.chunk_plan(180) == [128, 52]
    n = 40
    arrays = {"image": np.zeros((n, 2, 2, 1), np.uint8), "label": np.zeros(n, np.int32)}
    for population, rows in ((np.arange(19), [16, 4]), (np.arange(25), [16, 8, 2])):
        reports = []
        record = driver.run(_rows_fn, None, arrays, population, jax.random.PRNGKey(0),
                            on_chunk=reports.append)
        assert [int(r.outputs["rows"][0]) for r in reports] == rows
        assert all(r.outputs["real"].all() for r in reports)
        np.testing.assert_array_equal(record.outputs["index"][population], population)


def test_class_counts_are_exact_sums():
    counts = class_counts(np.array([1, 0, 1, 1], bool), np.array([0, 0, 2, 2]), 3)
    assert counts.to_json() == {"correct": [1, 0, 2], "total": [2, 0, 2]}
