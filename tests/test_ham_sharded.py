"""HAM's buckets under an 8-device mesh: read from the compiled program that every convolution
runs on per-device rows (the bucket branches on their local bucket, never on the global bucket),
and check that one step on 8 devices equals the one-device step (same hard set, loss, gradients,
ledger).

JAX fixes its device count at start-up, so the check runs in a child process started with
XLA_FLAGS=--xla_force_host_platform_device_count=8. The models use XLA's own conv there
(`model.conv_vjp='xla'`), as on GPU/TPU (on CPU they default to a canonical-layout VJP whose
weight-gradient conv puts channels where the batch would be, which would muddle the shape check).
"""

from __future__ import annotations

import textwrap

from launching import run_on_host_devices

CHILD = textwrap.dedent(
    """
    import re
    import jax
    import numpy as np

    from hamjax.config import base_config, method_config, validate_config
    from hamjax.data import iterate_batches, load_splits
    from hamjax.methods import get_method
    from hamjax.methods.ham import FORCE_HARD_KEY, bucket_sizes
    from hamjax.sharding import make_mesh, put_replicated, shard_batch
    from hamjax.train import build_context, create_train_state, make_train_step
    from hamjax.train.step import jit_train_step

    DEVICES, BATCH = 8, 64
    assert jax.device_count() == DEVICES, jax.devices()
    CONV = re.compile(r"= f32\\[([\\d,]+)\\][^ ]* convolution\\(.*?window=\\{size=(\\w+)[^}]*\\}, "
                      r"dim_labels=(\\w+)->(\\w+), metadata=\\{op_name=\\"([^\\"]*)\\"")

    def conv_rows(hlo):
        # (switch branch or None, example rows) of every forward and input-gradient conv: their
        # window is the 3x3 kernel and the output's batch dimension holds the examples. Weight
        # gradients (window = activation size) contract the examples away and are skipped.
        found = []
        for m in CONV.finditer(hlo):
            shape = [int(d) for d in m.group(1).split(",")]
            window, out_labels, op_name = m.group(2), m.group(4), m.group(5)
            if window != "3x3":
                continue
            branch = re.search(r"branch_(\\d+)_fun", op_name)
            found.append((int(branch.group(1)) if branch else None,
                          shape[out_labels.index("b")]))
        return found

    c = base_config()
    c.data.name = "digits"
    c.model.conv_vjp = "xla"  # XLA's conv, as on GPU/TPU
    c.data.val_size = 40
    c.model.name = "small_cnn"
    c.method = method_config("ham")
    c.method.mining_step, c.method.warmup_epochs = 1, 0
    c.method.buckets = (0.125, 0.25, 0.5, 1.0)  # 12 of 64 rows: the global bucket is 16 too
    c.attack.eps, c.attack.step_size, c.attack.steps = 0.1, 0.03, 3
    c.train.batch_size = BATCH
    validate_config(c)
    splits = load_splits(c.data, seed=0)
    method = get_method("ham")
    batch = next(iterate_batches(splits.train, BATCH, seed=0, epoch=0))
    # 12 hard rows, unevenly spread: 2 on devices 0, 2, 4, 6 and 1 on the others, so each
    # device packs into the local bucket of 2 (the global bucket of 16 on one device)
    hard = np.zeros(BATCH, bool)
    hard[::8] = True
    hard[1::16] = True
    batch[FORCE_HARD_KEY] = hard

    results = {}
    for name, mesh in (("one", make_mesh(jax.devices()[:1])), ("eight", make_mesh())):
        ctx = build_context(c, splits, mesh)
        step = jit_train_step(make_train_step(ctx, method), mesh)
        state = put_replicated(create_train_state(ctx, method, seed=0), mesh)
        device_batch = shard_batch(batch, mesh)
        compiled = step.lower(state, device_batch).compile()
        if name == "eight":
            rows = conv_rows(compiled.as_text())
            local = BATCH // DEVICES
            sizes = bucket_sizes(c.method.buckets, local)  # (1, 2, 4, 8)
            branches = {b for b, _ in rows if b is not None}
            assert branches == set(range(1, len(sizes) + 1)), (branches, rows)
            for branch, n in rows:
                limit = local if branch is None else sizes[branch - 1]
                assert n <= limit, (branch, n, limit, sorted(set(rows), key=str))
            print("per-device buckets ok", sorted(set(rows), key=str), flush=True)
        results[name] = jax.device_get(compiled(state, device_batch))

    (one_state, one_metrics), (eight_state, eight_metrics) = results["one"], results["eight"]
    assert one_metrics["bucket_size"] == 16 == eight_metrics["bucket_size"], (
        one_metrics, eight_metrics)
    for key in one_metrics:
        np.testing.assert_allclose(eight_metrics[key], one_metrics[key], rtol=2e-4, atol=2e-5,
                                   err_msg=key)
    for tree in ("params", "batch_stats", "opt_state", "ledger"):
        for a, b in zip(jax.tree.leaves(getattr(one_state, tree)),
                        jax.tree.leaves(getattr(eight_state, tree)), strict=True):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5, err_msg=tree)
    print("eight devices equal one ok", flush=True)
    """
)


def test_ham_buckets_run_per_device_and_equal_one_device(tmp_path):
    stdout = run_on_host_devices(CHILD, tmp_path, 8)
    assert "per-device buckets ok" in stdout
    assert "eight devices equal one ok" in stdout
