"""config.train.steps_per_dispatch: k train steps in one jitted lax.scan equal k single steps bit
for bit (every method, AWP, EMA), and the trainer built on it logs, checks, saves and resumes at
dispatch boundaries with the same final state as one step per dispatch."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from toy_models import TinyNet

from hamjax.checkpoint import Checkpointer
from hamjax.config import base_config, load_config, method_config, validate_config
from hamjax.errors import ConfigError, TrainingDivergedError, TrainingInterrupted
from hamjax.methods import available_methods, get_method
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.sharding import make_mesh, put_replicated, shard_batch
from hamjax.state import StepContext, create_train_state
from hamjax.train import loop
from hamjax.train.dispatch import add_steps, add_trees, dispatch_spans, passes_multiple
from hamjax.train.lifecycle import first_nonfinite
from hamjax.train.loop import Trainer
from hamjax.train.step import jit_multi_step, jit_train_step, make_multi_step, make_train_step

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py")


# ---------------------------------------------------------------- the schedule of dispatches
@pytest.mark.parametrize("steps_per_epoch", [1, 5, 8, 17])
@pytest.mark.parametrize("per_dispatch", [1, 3, 4, 20])
def test_dispatch_spans_cover_the_epoch_and_end_on_multiples(steps_per_epoch, per_dispatch):
    for start in range(steps_per_epoch + 1):
        spans = dispatch_spans(start, steps_per_epoch, per_dispatch)
        covered = [i for first, end in spans for i in range(first, end)]
        assert covered == list(range(start, steps_per_epoch))
        for first, end in spans:
            assert 1 <= end - first <= per_dispatch
            assert end % per_dispatch == 0 or end == steps_per_epoch
        # Resumed at a boundary of the uninterrupted epoch: the same dispatches from there on.
        whole = dispatch_spans(0, steps_per_epoch, per_dispatch)
        if any(first == start for first, _ in whole):
            assert spans == [s for s in whole if s[0] >= start]


def test_passes_multiple_is_a_multiple_in_the_half_open_range():
    for every in (1, 4, 6, 19):
        for before in range(40):
            for after in range(before + 1, before + 9):
                expected = any(s % every == 0 for s in range(before + 1, after + 1))
                assert passes_multiple(before, after, every) == expected


def test_first_nonfinite_names_the_step_inside_a_dispatch():
    pending = [(1, jnp.ones(4), jnp.arange(4.0)),
               (5, jnp.array([1.0, 1.0, 0.0, 0.0]), jnp.array([5.0, 6.0, jnp.nan, 8.0])),
               (9, jnp.asarray(0.0), jnp.asarray(9.0))]
    step, loss = first_nonfinite(pending)
    assert step == 7 and np.isnan(loss)
    assert first_nonfinite(pending[2:]) == (9, 9.0)  # one-step entries: scalars
    assert first_nonfinite(pending[:1]) is None


def test_add_steps_adds_in_step_order_as_single_steps_do():
    rng = np.random.default_rng(0)
    stacked = {"a": jnp.asarray(rng.normal(size=(5,)).astype(np.float32) * 1e4),
               "b": jnp.asarray(rng.normal(size=(5, 3)).astype(np.float32))}
    one_by_one = None
    for j in range(5):
        step = jax.tree.map(lambda m, j=j: m[j], stacked)
        one_by_one = step if one_by_one is None else add_trees(one_by_one, step)
    first = add_steps(None, jax.tree.map(lambda m: m[:2], stacked))
    together = add_steps(first, jax.tree.map(lambda m: m[2:], stacked))
    for key in stacked:
        np.testing.assert_array_equal(np.asarray(together[key]), np.asarray(one_by_one[key]))


@pytest.mark.parametrize("value", [0, -2, 1.5, "4", True])
def test_bad_steps_per_dispatch_is_refused_naming_the_field(value):
    tree = base_config().to_dict()
    tree["train"]["steps_per_dispatch"] = value  # any type, as a config file may hold
    config = ml_collections.ConfigDict(tree)
    with pytest.raises(ConfigError, match=r"config\.train\.steps_per_dispatch=.*must be an int "
                                          r">= 1"):
        validate_config(config)


# ---------------------------------------------------------------- one dispatch, every method
K, B, STEPS, SPE = 4, 8, 6, 2  # 2 dispatches of 3 steps: warm-ups end and epochs roll inside


def _step_case(name: str, train: dict | None = None, **method) -> StepContext:
    config = base_config()
    config.data.augment.crop_pad = 1
    config.data.augment.flip = True
    config.data.val_size = 40
    config.data.meta_per_class = 4
    config.method = method_config(name)
    for field, value in {"warmup_epochs": 1, "mining_step": 1, "meta_interval": 2,
                         "begin": 1, "begin_epoch": 1, "awp_warmup_epochs": 1}.items():
        if field in config.method:
            config.method[field] = value
    config.method.update(method)
    config.attack.eps, config.attack.step_size, config.attack.steps = 0.1, 0.05, 2
    config.train.lr, config.train.lr_schedule = 0.1, "cosine"
    config.train.epochs = 3
    config.train.update(train or {})
    return StepContext(
        model=TinyNet(num_classes=K, conv_vjp="auto"), tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, SPE), config=ml_collections.FrozenConfigDict(config),
        num_classes=K, class_counts=np.array([10, 8, 6, 4]), steps_per_epoch=SPE,
        image_shape=(4, 4, 1), mesh=make_mesh())


def _batches(meta: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for j in range(STEPS):
        batch = {"image": rng.integers(0, 256, (B, 4, 4, 1), dtype=np.uint8),
                 "label": rng.integers(0, K, B).astype(np.int32),
                 "index": np.arange(j * B, (j + 1) * B, dtype=np.int32)}
        if meta:
            batch["meta_image"] = rng.integers(0, 256, (B, 4, 4, 1), dtype=np.uint8)
            batch["meta_label"] = (np.arange(B) % K).astype(np.int32)
        out.append(batch)
    return out


# Methods whose step is another case's with terms removed, scanned through that case:
# standard is pgd_at without the attack, trades is scanned with AWP on (its case below), and
# frl_rw and frl_rm move a subset of frl_rwrm's multipliers (hamjax.methods.frl.VARIANTS).
SCANNED_AS = {"standard": "pgd_at", "trades": "trades", "frl_rw": "frl_rwrm",
              "frl_rm": "frl_rwrm"}
STEP_CASES = [(name, {}, {}) for name in available_methods() if name not in SCANNED_AS] + [
    ("trades", {}, {"awp_gamma": 0.01}),
    ("pgd_at", {"ema_decay": 0.9}, {"awp_gamma": 0.01}),
]


def test_every_method_is_scanned_itself_or_as_the_case_that_holds_its_step():
    scanned = {name for name, _, _ in STEP_CASES}
    assert set(available_methods()) == scanned | set(SCANNED_AS)
    assert set(SCANNED_AS.values()) <= scanned


@pytest.mark.parametrize("name, train, method", STEP_CASES,
                         ids=[f"{n}{'-' if t or m else ''}{'-'.join(list(t) + list(m))}"
                              for n, t, m in STEP_CASES])
def test_scanned_steps_equal_single_steps_bit_for_bit(name, train, method):
    """6 steps as two scans of 3 equal 6 single dispatches in every state leaf (params,
    optimiser, BN, method state, ledger, averaged weights, rng, step) and every per-step
    metric, through the trainer's own jitted (sharded, donated) programs. TinyNet's conv is
    the library's (`model.conv_vjp`): XLA's own conv VJP inside a scan is not bit-exact on
    the CPU (docs/performance.md)."""
    ctx, algorithm = _step_case(name, train, **method), get_method(name)
    mesh = ctx.mesh
    batches = _batches(algorithm.needs_meta_batch)
    train_step = make_train_step(ctx, algorithm)
    single, multi = jit_train_step(train_step, mesh), jit_multi_step(make_multi_step(train_step),
                                                                     mesh)

    def fresh():
        return put_replicated(create_train_state(ctx, algorithm, seed=3), mesh)

    def stacked(part):
        return shard_batch({k: np.stack([b[k] for b in part]) for k in part[0]}, mesh,
                           stacked=True)

    state, singles = fresh(), []
    for batch in batches:
        state, metrics = single(state, shard_batch(batch, mesh))
        singles.append(jax.device_get(metrics))
    expected = jax.device_get(state)
    assert int(expected.step) == STEPS
    assert float(expected.ledger.forward) > 0

    got, first = multi(fresh(), stacked(batches[:3]))
    got, second = multi(got, stacked(batches[3:]))
    got = jax.device_get(got)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
    for key in singles[0]:
        per_step = np.stack([m[key] for m in singles])
        scanned = np.concatenate([jax.device_get(first[key]), jax.device_get(second[key])])
        np.testing.assert_array_equal(scanned, per_step, err_msg=key)


# ---------------------------------------------------------------- the trainer
def quickstart(steps_per_dispatch: int, method: str = "ham", **train
               ) -> ml_collections.ConfigDict:
    """The quick start, tiny: 2 epochs of 19 steps (HAM from the second), PGD-3, 40 eval
    examples; logs and checkpoints every 6 steps (not multiples of 4)."""
    config = load_config(f"{QUICKSTART}:method={method}")
    if method == "ham":
        config.method.warmup_epochs = 1
        config.method.mining_step = 2
    config.attack.steps = 3
    config.eval.steps = 2
    config.eval.num_examples = 40
    config.train.epochs = 2
    config.train.lr_boundaries = (1, 2)
    config.train.checkpoint_every_steps = 6
    config.train.log_every_steps = 6
    config.train.steps_per_dispatch = steps_per_dispatch
    config.train.update(train)
    return config


def _final_state(workdir: str):
    ckpt = Checkpointer(workdir)
    state = ckpt.restore_host(step=ckpt.latest_step())
    ckpt.close()
    return state


def _records(workdir: str, kind: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def _assert_same_state(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The tiny quick start with 1 and with 4 steps per dispatch (no periodic saves, so the
    epoch metric sums are folded at the same steps)."""
    root = tmp_path_factory.mktemp("dispatch")
    runs = {}
    for per in (1, 4):
        workdir = str(root / f"per{per}")
        report = Trainer(quickstart(per, checkpoint_every_steps=1000), workdir).run()
        runs[per] = workdir, report
    return runs


@pytest.mark.slow
def test_quickstart_four_steps_per_dispatch_equals_one(straight_runs):
    (one, report1), (four, report4) = straight_runs[1], straight_runs[4]
    # 19 steps an epoch: the last dispatch of each is 3 steps long (a second program)
    assert [r["step"] for r in _records(one, "epoch")] == [19, 38]
    _assert_same_state(_final_state(one), _final_state(four))
    for a, b in zip(report1["epochs"], report4["epochs"], strict=True):
        assert a["ledger"] == b["ledger"]
        assert a["train_metrics"] == b["train_metrics"]  # per-step sums, the same float32 adds
        assert a["val"]["robust"]["per_class"] == b["val"]["robust"]["per_class"]
    for key in ("last", "best_on_val"):
        assert report1["results"][key]["robust"]["per_class"] == \
            report4["results"][key]["robust"]["per_class"]
    # Logs at the first dispatch end at or past each multiple of 6 and at each epoch's end,
    # with the metrics of that step. Dispatches end at 4, 8, 12, 16, 19, 23, 27, 31, 35, 38.
    logged = {per: {r["step"]: r for r in _records(w, "train")}
              for per, (w, _) in straight_runs.items()}
    assert sorted(logged[1]) == [6, 12, 18, 19, 24, 30, 36, 38]
    assert sorted(logged[4]) == [8, 12, 19, 27, 31, 38]
    for step in (12, 19, 38):
        for key in ("loss", "lr", "finite", "update_applied"):
            assert logged[1][step][key] == logged[4][step][key], (step, key)
    assert all(r["images_per_s"] > 0 for r in logged[4].values())


@pytest.mark.slow
def test_resume_with_another_steps_per_dispatch_is_exact(straight_runs, tmp_path, monkeypatch):
    """Stopped (SIGTERM path) at a dispatch end mid-epoch with 4 per dispatch, resumed with 1;
    and crashed after a mid-epoch periodic save with 1 per dispatch (step 24, off the
    4-step grid of its epoch, which starts at 19) and resumed with 4: both end where the
    uninterrupted runs did, and a changed steps_per_dispatch is no config change."""
    expected = _final_state(straight_runs[1][0])
    dispatches = Trainer._dispatches

    def stop_at(step, how):
        def patched(self, epoch, start):
            for first, end, batch in dispatches(self, epoch, start):
                if epoch * self.ctx.steps_per_epoch + first >= step:
                    if how == "signal":
                        self.signals.received = signal.SIGTERM
                    else:
                        raise RuntimeError("crash")
                yield first, end, batch
        return patched

    stopped = str(tmp_path / "stopped")
    monkeypatch.setattr(Trainer, "_dispatches", stop_at(22, "signal"))
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(quickstart(4), stopped).run()
    # The prefetching producer raises the flag as it makes the dispatch of steps 24-27, so the
    # loop stops at the end of the one before or of that one.
    at = int(str(info.value).split("at step ")[1].split(";")[0])
    assert at in (23, 27), str(info.value)
    assert Checkpointer(stopped).latest_step() == at
    monkeypatch.setattr(Trainer, "_dispatches", dispatches)
    report = Trainer(quickstart(1), stopped).run()  # another steps_per_dispatch: no error
    assert report["config_changed_on_resume"] == []
    _assert_same_state(expected, _final_state(stopped))

    crashed = str(tmp_path / "crashed")
    monkeypatch.setattr(Trainer, "_dispatches", stop_at(26, "crash"))
    with pytest.raises(RuntimeError, match="crash"):
        Trainer(quickstart(1), crashed).run()
    monkeypatch.setattr(Trainer, "_dispatches", dispatches)
    assert Checkpointer(crashed).latest_step() == 24
    Trainer(quickstart(4), crashed).run()  # resumes at 24 = epoch 2's step 5: 24-27, 27-31
    _assert_same_state(expected, _final_state(crashed))
    # Before the crash: every 6th step and epoch 1's end; resumed: dispatch ends past 30, 36.
    assert [r["step"] for r in _records(crashed, "train")] == [6, 12, 18, 19, 24, 31, 38]


@pytest.mark.slow
def test_divergence_inside_a_dispatch_names_its_step(tmp_path, monkeypatch):
    """An infinite learning rate at step 7 (the third of the dispatch of steps 5-8) stops the
    run naming step 7, before the periodic save due at the end of that dispatch (8 passes 6)."""
    build = loop.build_context

    def poisoned(*args):
        ctx = build(*args)
        lr_fn = ctx.lr_fn
        return dataclasses.replace(ctx, lr_fn=lambda s: jnp.where(s == 6, jnp.inf, lr_fn(s)))

    monkeypatch.setattr(loop, "build_context", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.raises(TrainingDivergedError, match="diverged at step 7:"):
        Trainer(quickstart(4, "standard", log_every_steps=1000), workdir).run()
    assert Checkpointer(workdir).latest_step() is None
