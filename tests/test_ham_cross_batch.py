"""HAM's opt-in cross-batch variant (`method.cross_batch_rows`) against independent references:
a plain-Python model of the buffer's bookkeeping (which rows enter, in which order, when it
flushes, what is trained, what carries over or is dropped), an eager continuation and training
pass with the weights current at the flush, invariants of the stored rows, and a run stopped
mid-accumulation and resumed that equals the uninterrupted run.

The step tests use test_ham's MarkerNet, whose marker pixels fix the hard set exactly.
"""

from __future__ import annotations

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from launching import run_on_host_devices
from test_ham import ALPHA, EPS, HAM_STEP, B, K, M, close, make_config, make_ctx, marker_batch

from hamjax.errors import ConfigError
from hamjax.methods import get_method
from hamjax.methods.ham import HamSettings, cross_batch_terms, validate
from hamjax.methods.ham_buffer import append_rows, init_buffer, keep_overflow, take_rows
from hamjax.state import create_train_state
from hamjax.train.step import make_train_step

# ---------------------------------------------------------------------------------------------
# The bookkeeping alone, against a list-based model


def reference_bookkeeping(masks: list[np.ndarray], rows: int) -> list[dict]:
    """Per step: rows are (step, position, updates_behind); a queue in arrival order; flush when
    it holds `rows`: the oldest `rows` train, at most rows - 1 of the rest wait (one update
    older), any beyond are dropped."""
    queue: list[list[int]] = []
    log = []
    for t, mask in enumerate(masks):
        queue += [[t, int(i), 0] for i in np.flatnonzero(mask)]
        if len(queue) < rows:
            log.append({"trained": None, "dropped": 0, "held": [tuple(r) for r in queue]})
            continue
        trained, rest = queue[:rows], queue[rows:]
        queue = [[s, i, u + 1] for s, i, u in rest[: rows - 1]]
        log.append({"trained": [tuple(r) for r in trained], "dropped": len(rest) - len(queue),
                    "held": [tuple(r) for r in queue]})
    return log


@functools.cache
def buffer_step(rows: int, batch: int):
    """One jitted append + (flush if full) of ham_buffer's functions on one device."""

    @jax.jit
    def step(buffer, selected, new):
        buffer = append_rows(buffer, selected, new)
        full = buffer["count"][0] >= rows
        taken, valid = take_rows(buffer, rows)
        kept, dropped = keep_overflow(buffer, rows)
        after = jax.tree.map(lambda a, b: jnp.where(full, a, b), kept, buffer)
        return after, full, taken, valid, jnp.where(full, dropped[0], 0)

    return step


@pytest.mark.parametrize("rows", [3, 8, 13])  # below, at and above the batch of 8
def test_buffer_bookkeeping_matches_the_list_model(rows):
    batch, steps = 8, 12
    rs = np.random.RandomState(rows)
    masks = [rs.rand(batch) < p for p in rs.uniform(0.0, 1.0, steps)]
    masks[3][:] = True  # a full batch: overflow (and drops when rows < batch)
    masks[4][:] = False
    expected = reference_bookkeeping(masks, rows)
    buffer = init_buffer(rows, batch, 1, (2,))
    step = buffer_step(rows, batch)
    for t, (mask, want) in enumerate(zip(masks, expected, strict=True)):
        ids = t * batch + np.arange(batch)
        clean = np.stack([ids / 100.0, np.full(batch, 0.5)], 1).astype(np.float32)
        new = {"clean": clean, "adv": clean + 0.01, "label": (ids % 7).astype(np.int32),
               "kappa": (ids % 3).astype(np.int32), "index": ids.astype(np.int32),
               "mined_step": np.full(batch, t, np.int32)}
        buffer, full, taken, valid, dropped = step(buffer, jnp.asarray(mask), new)
        assert bool(full) == (want["trained"] is not None), t
        if want["trained"] is not None:
            assert bool(jnp.all(valid))
            got = list(zip(np.asarray(taken["mined_step"]).tolist(),
                           (np.asarray(taken["index"]) % batch).tolist(),
                           np.asarray(taken["updates_behind"]).tolist(), strict=True))
            assert got == want["trained"], t
            assert int(dropped) == want["dropped"]
        count = int(buffer["count"][0])
        held = list(zip(np.asarray(buffer["mined_step"][:count]).tolist(),
                        (np.asarray(buffer["index"][:count]) % batch).tolist(),
                        np.asarray(buffer["updates_behind"][:count]).tolist(), strict=True))
        assert held == want["held"], t
        # Every field stays with its row; empty slots are zero.
        index = np.asarray(buffer["index"][:count])
        np.testing.assert_array_equal(np.asarray(buffer["label"][:count]), index % 7)
        np.testing.assert_array_equal(np.asarray(buffer["kappa"][:count]), index % 3)
        np.testing.assert_allclose(np.asarray(buffer["clean"][:count, 0]), index / 100.0,
                                   rtol=1e-6)
        assert not np.any(np.asarray(buffer["adv"][count:]))
    assert rows >= batch or any(w["dropped"] for w in expected)  # the drop path ran


# ---------------------------------------------------------------------------------------------
# The train step


ROWS = 8  # cross_batch_rows in the step tests: half the batch of 16


@functools.cache
def cross_batch_step(rows: int = ROWS):
    ctx = make_ctx(make_config(cross_batch_rows=rows))
    method = get_method("ham")
    return ctx, method, jax.jit(make_train_step(ctx, method))


def indexed_batch(hard_count: int, seed: int) -> dict:
    """marker_batch with indices unique to the seed (so stored rows can be traced back)."""
    return dict(marker_batch(hard_count, seed=seed), index=jnp.arange(B) + 100 * seed)


def test_steps_flush_train_and_count_as_the_model_says():
    ctx, method, step = cross_batch_step()
    state = create_train_state(ctx, method, seed=0).replace(step=jnp.int32(HAM_STEP))
    assert set(state.method_state) == {"hard", "mined", "buffer", "cross_batch"}
    hard_counts = (3, 0, 4, 9, 16, 2, 5)
    batches = [indexed_batch(h, seed) for seed, h in enumerate(hard_counts, start=1)]
    masks = [np.asarray(b["image"][:, 0, :4, 0].argmax(-1) != b["label"]) for b in batches]
    assert [int(m.sum()) for m in masks] == list(hard_counts)
    expected = reference_bookkeeping(masks, ROWS)
    images = {int(i): x for b in batches for i, x in zip(b["index"], b["image"], strict=True)}
    labels = {int(i): y for b in batches for i, y in zip(b["index"], b["label"], strict=True)}
    for t, (batch, want) in enumerate(zip(batches, expected, strict=True)):
        new, metrics = step(state, batch)
        flushed = want["trained"] is not None
        assert float(metrics["cross_batch_flush"]) == float(metrics["update_applied"]) == flushed
        changed = any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                                   new.params, state.params)))
        assert changed == flushed, t
        rows = ROWS if flushed else 0
        assert float(new.ledger.forward - state.ledger.forward) == (M + 1) * B + (K - M + 1) * rows
        assert float(new.ledger.backward - state.ledger.backward) == M * B + (K - M + 1) * rows
        buffer = jax.device_get(new.method_state["buffer"])
        count = int(buffer["count"][0])
        assert count == len(want["held"])
        for slot in range(count):  # invariants of every stored row
            i = int(buffer["index"][slot])
            np.testing.assert_array_equal(buffer["clean"][slot], images[i])
            assert buffer["label"][slot] == labels[i]
            assert int(buffer["mined_step"][slot]) == HAM_STEP + want["held"][slot][0]
            gap = np.abs(buffer["adv"][slot] - buffer["clean"][slot]).max()
            assert gap <= EPS + 1e-6 and gap > 0
            assert 0.0 <= buffer["adv"][slot].min() and buffer["adv"][slot].max() <= 1.0
        state = new
    record = method.summarize_state(jax.device_get(state.method_state))["cross_batch"]
    trained = [r for w in expected if w["trained"] for r in w["trained"]]
    assert record["flushes"] == sum(w["trained"] is not None for w in expected) == 3
    assert record["trained_rows"] == len(trained)
    assert record["dropped_rows"] == sum(w["dropped"] for w in expected) > 0  # R < B: 16 hard
    flush_steps = [t for t, w in enumerate(expected) if w["trained"]]
    ages = [t - s for t, w in zip(flush_steps, [w for w in expected if w["trained"]],
                                  strict=True) for s, _, _ in w["trained"]]
    assert record["mean_staleness_steps"] == pytest.approx(np.mean(ages))
    assert record["max_staleness_steps"] == max(ages)
    assert record["stale_weight_rows"] == sum(u > 0 for _, _, u in trained) > 0
    assert record["max_updates_behind"] == 1
    assert record["buffered_rows"] == len(expected[-1]["held"])
    # The epoch's end zeroes the counters and keeps the buffer for the next epoch.
    rolled = method.epoch_end(state, ctx, None)
    assert not any(np.any(np.asarray(v)) for v in jax.tree.leaves(
        rolled.method_state["cross_batch"]))
    jax.tree.map(np.testing.assert_array_equal, rolled.method_state["buffer"],
                 state.method_state["buffer"])


# ---------------------------------------------------------------------------------------------
# The continuation runs with the weights of the flush, not those that mined the rows


@functools.cache
def terms_fn():
    ctx = make_ctx(make_config(cross_batch_rows=ROWS))
    settings = HamSettings.from_config(ctx.config)

    @jax.jit
    def terms(params, stats, batch, rng, step, buffer):
        return cross_batch_terms(ctx, settings, params, stats, batch["image"], batch["label"],
                                 batch["index"], rng, jnp.int32(1), step, buffer)

    return ctx, terms


def eager_flush(model, variables, x_mid, x, y):
    """K - M PGD steps from x_M with `variables` (eval-mode BN), then mean CE in train mode."""
    def attack_loss(z):
        logits = model.apply(variables, z, train=False)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    x_adv = x_mid
    for _ in range(K - M):
        x_adv = x_adv + ALPHA * jnp.sign(jax.grad(attack_loss)(x_adv))
        x_adv = jnp.clip(jnp.minimum(jnp.maximum(x_adv, x - EPS), x + EPS), 0.0, 1.0)

    def train_loss(p):
        logits, new = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x_adv,
                                  train=True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), new

    (loss, new), grads = jax.value_and_grad(train_loss, has_aux=True)(variables["params"])
    return x_adv, loss, grads, new["batch_stats"]


def test_the_flush_continues_with_the_current_weights():
    ctx, terms = terms_fn()
    state = create_train_state(ctx, get_method("ham"), seed=0)
    old = state.params
    first, second = indexed_batch(5, seed=1), indexed_batch(6, seed=2)
    a = terms(old, state.batch_stats, first, jax.random.PRNGKey(1), jnp.int32(2),
              state.method_state["buffer"])
    assert not bool(a.flushed) and int(a.buffer["count"][0]) == 5
    # The weights move (as a flush elsewhere would move them) before the buffer fills.
    new = jax.tree.map(lambda p: p * 1.3 + 0.05, old)
    b = terms(new, state.batch_stats, second, jax.random.PRNGKey(2), jnp.int32(3), a.buffer)
    assert bool(b.flushed) and int(b.buffer["count"][0]) == 3
    trained = b.trained
    assert bool(jnp.all(trained["valid"]))
    hard_a = np.flatnonzero(np.asarray(a.out.selected))
    hard_b = np.flatnonzero(np.asarray(b.out.selected))
    np.testing.assert_array_equal(trained["index"], np.concatenate(
        [np.asarray(first["index"])[hard_a], np.asarray(second["index"])[hard_b[:3]]]))
    # Starts: each row's x_M from the step that mined it, with the weights of that step.
    x_mid = jnp.concatenate([a.out.x_adv[hard_a], b.out.x_adv[hard_b[:3]]])
    x = jnp.concatenate([first["image"][hard_a], second["image"][hard_b[:3]]])
    y = jnp.concatenate([first["label"][hard_a], second["label"][hard_b[:3]]])
    np.testing.assert_array_equal(trained["clean"], x)
    np.testing.assert_array_equal(trained["label"], y)
    variables = {"params": new, "batch_stats": state.batch_stats}
    x_adv, loss, grads, stats = eager_flush(ctx.model, variables, x_mid, x, y)
    close(trained["x_adv"], x_adv, 1e-6)
    close(b.out.loss, loss)
    close(b.out.grads, grads)
    close(b.out.batch_stats, stats)
    stale, *_ = eager_flush(ctx.model, {"params": old, "batch_stats": state.batch_stats},
                            x_mid, x, y)
    assert float(jnp.max(jnp.abs(stale - trained["x_adv"]))) > 1e-3  # the weights matter
    # Ledger: mining on the batch, continuation + training on the R rows of the flush.
    assert float(b.out.ledger.forward) == (M + 1) * B + (K - M + 1) * ROWS
    assert float(a.out.ledger.forward) == (M + 1) * B


# ---------------------------------------------------------------------------------------------
# Defaults and validation


def test_off_by_default_and_the_faithful_state_is_unchanged():
    ctx = make_ctx(make_config())
    assert HamSettings.from_config(ctx.config).cross_batch_rows == 0
    assert set(create_train_state(ctx, get_method("ham"), seed=0).method_state) == {"hard",
                                                                                   "mined"}


@pytest.mark.parametrize("fields, message", [
    ({"cross_batch_rows": -1}, "int >= 0"), ({"cross_batch_rows": 8.0}, "int >= 0"),
    ({"cross_batch_rows": True}, "int >= 0"),
    ({"cross_batch_rows": 8, "easy_examples": "train_at_m"}, "easy_examples='drop'"),
    ({"cross_batch_rows": 8, "bucketed": False}, "bucketed=True"),
])
def test_cross_batch_rows_is_validated(fields, message):
    with pytest.raises(ConfigError, match=rf"config\.method\.cross_batch_rows.*{message}"):
        validate(make_config(**fields))
    validate(make_config(cross_batch_rows=8, gair=True, hard_keep_fraction=0.5))


# ---------------------------------------------------------------------------------------------
# Two devices (a child process: JAX fixes its device count at start-up)

TWO_DEVICES = textwrap.dedent(
    """
    import jax
    import ml_collections
    import numpy as np

    from hamjax.config import base_config, method_config
    from hamjax.errors import ConfigError
    from hamjax.methods import get_method
    from hamjax.methods.ham import FORCE_HARD_KEY
    from hamjax.models import build_model
    from hamjax.optim import make_lr_fn, make_optimizer
    from hamjax.sharding import make_mesh, put_replicated, shard_batch
    from hamjax.state import StepContext, create_train_state
    from hamjax.train.step import jit_train_step, make_train_step

    assert jax.device_count() == 2, jax.devices()
    B, SHAPE, METHOD = 16, (16, 16, 3), get_method("ham")

    def setup(rows, devices):
        c = base_config()
        c.model.name, c.model.conv_vjp = "small_cnn", "xla"
        c.method = method_config("ham", warmup_epochs=0, mining_step=1, cross_batch_rows=rows)
        c.attack.steps = 3
        c.train.batch_size, c.train.lr_schedule = B, "constant"
        c.data.augment.crop_pad, c.data.augment.flip = 0, False
        c = ml_collections.FrozenConfigDict(c)
        mesh = make_mesh(jax.devices()[:devices])
        ctx = StepContext(model=build_model(c.model, 10, SHAPE), tx=make_optimizer(c.train),
                          lr_fn=make_lr_fn(c.train, 100), config=c, num_classes=10,
                          class_counts=np.ones(10), steps_per_epoch=100, image_shape=SHAPE,
                          mesh=mesh)
        state = put_replicated(create_train_state(ctx, METHOD, seed=0), mesh)
        return jit_train_step(make_train_step(ctx, METHOD), mesh), state, mesh

    def batch(t, per_device, mesh):
        rs = np.random.RandomState(t)
        hard = np.zeros((2, B // 2), bool)
        for block, n in zip(hard, per_device):
            block[rs.permutation(B // 2)[:n]] = True
        host = {"image": rs.rand(B, *SHAPE).astype(np.float32),
                "label": rs.randint(0, 10, B).astype(np.int32),
                "index": (100 * t + np.arange(B)).astype(np.int32),
                FORCE_HARD_KEY: hard.reshape(B)}
        return host, shard_batch(host, mesh)

    def run(rows, devices, pattern):
        step, state, mesh = setup(rows, devices)
        hosts, flushes = [], []
        for t, per_device in enumerate(pattern):
            host, device_batch = batch(t, per_device, mesh)
            state, metrics = step(state, device_batch)
            hosts.append(host)
            flushes.append(float(metrics["cross_batch_flush"]))
        return jax.device_get(state), flushes, hosts

    # Even: 2 hard rows per device per step. Two devices of R/2 = 4 and one device of R = 8
    # flush at the same step on the same 8 rows: same weights, statistics and ledger.
    even = [(2, 2)] * 3
    one, one_flushes, _ = run(8, 1, even)
    two, two_flushes, _ = run(8, 2, even)
    assert one_flushes == two_flushes == [0.0, 1.0, 0.0], (one_flushes, two_flushes)
    for tree in ("params", "batch_stats", "opt_state", "ledger"):
        for a, b in zip(jax.tree.leaves(getattr(one, tree)), jax.tree.leaves(getattr(two, tree)),
                        strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=tree)
    assert one.method_state["buffer"]["count"].tolist() == [4]
    assert two.method_state["buffer"]["count"].tolist() == [2, 2]
    print("two devices equal one ok", flush=True)

    # Uneven: device 0 gathers 3 rows a step, device 1 one. At the second step device 0 holds
    # 6 >= 4 and both flush: device 0 trains its oldest 4 and keeps 2, device 1 trains its 2
    # (2 slots padded) and keeps none. Each device's block of the buffer holds its own rows.
    state, flushes, hosts = run(8, 2, [(3, 1), (3, 1)])
    assert flushes == [0.0, 1.0], flushes
    buffer, record = state.method_state["buffer"], state.method_state["cross_batch"]
    assert buffer["count"].tolist() == [2, 0]
    assert {k: int(record[k]) for k in ("flushes", "trained_rows", "padded_rows",
                                        "dropped_rows")} == {"flushes": 1, "trained_rows": 6,
                                                             "padded_rows": 2, "dropped_rows": 0}
    slots = buffer["label"].shape[0] // 2  # per device: R/2 + B/2 = 12
    last = hosts[1]
    rows_dev0 = np.flatnonzero(last[FORCE_HARD_KEY][: B // 2])  # its 3 rows of step 2
    kept = rows_dev0[1:]  # 3 from step 1 + the first of step 2 trained; the other 2 kept
    np.testing.assert_array_equal(buffer["index"][:2], last["index"][kept])
    np.testing.assert_array_equal(buffer["label"][:2], last["label"][kept])
    np.testing.assert_array_equal(buffer["clean"][:2], last["image"][kept])
    assert not buffer["index"][2:slots].any() and not buffer["index"][slots:].any()
    print("per-device bookkeeping ok", flush=True)

    try:
        setup(7, 2)
    except ConfigError as err:
        assert "config.method.cross_batch_rows=7" in str(err), err
        print("divisibility ok", flush=True)
    """
)


def test_two_devices(tmp_path):
    stdout = run_on_host_devices(TWO_DEVICES, tmp_path, 2)
    for line in ("two devices equal one ok", "per-device bookkeeping ok", "divisibility ok"):
        assert line in stdout


# ---------------------------------------------------------------------------------------------
# Resume mid-accumulation


@pytest.mark.slow
def test_resume_mid_accumulation_equals_a_straight_run(tmp_path):
    """Stopped mid-epoch 2 with rows waiting in the buffer and resumed from that checkpoint,
    the run ends with the straight run's state (buffer included), records and report."""
    from test_averaging import StopsAfter, averaging_config

    from hamjax.checkpoint import Checkpointer
    from hamjax.errors import TrainingInterrupted
    from hamjax.train.loop import Trainer

    config = averaging_config("ham", warmup_epochs=0, mining_step=1, cross_batch_rows=128)
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    reports = [Trainer(config, straight).run()]
    with pytest.raises(TrainingInterrupted):
        StopsAfter(config, stopped, stop_after=15).run()  # after step 14 of 20
    saved = Checkpointer(stopped, read_only=True)
    waiting = saved.restore_host()["method_state"]["buffer"]["count"]
    saved.close()
    assert 0 < int(waiting[0]) < 128  # rows were waiting when it stopped
    reports.append(Trainer(config, stopped).run())
    for key in ("last", "best_on_val"):
        a, b = (r["results"][key] for r in reports)
        assert a["robust"]["per_class"] == b["robust"]["per_class"]
    records = [[e["method"]["cross_batch"] for e in r["epochs"]] for r in reports]
    assert records[0] == records[1] and all(r["flushes"] > 0 for r in records[0])
    states = []
    for workdir in (straight, stopped):
        ckpt = Checkpointer(workdir, read_only=True)
        states.append(ckpt.restore_host())
        ckpt.close()
    for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
        np.testing.assert_array_equal(a, b)
