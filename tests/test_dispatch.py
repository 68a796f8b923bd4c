"""Bounded run-ahead (hamjax.train.dispatch): the XLA:CPU multi-device deadlock it prevents."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np

from hamjax.train.dispatch import RunAhead, add_trees

# The training loop's pattern at its most extreme: a data-parallel step with an all-reduce on 2
# host devices, its 10 metrics summed every step, nothing read back. Without RunAhead this
# aborts within the first steps ("only 1 of 2 arrived"), checked by hand on 2 cores; with it,
# it runs to the end.
LOOP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from hamjax.train.dispatch import RunAhead, add_trees

    mesh = Mesh(np.array(jax.devices()), ("d",))
    assert len(jax.devices()) == 2

    @jax.jit
    def step(w, x):
        g = jnp.mean(jnp.tanh(x @ w), axis=0)
        return w - 0.01 * g[None, :], {f"m{i}": jnp.sum(g) * i for i in range(10)}

    w = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.ones((128, 64)), NamedSharding(mesh, P("d")))
    in_flight, sums = RunAhead(depth=1), None
    for _ in range(1500):
        w, metrics = step(w, x)
        in_flight.dispatched(metrics["m1"])
        sums = metrics if sums is None else add_trees(sums, metrics)
    in_flight.drain()
    print("sum", float(sums["m1"]))
    """
)


def test_bounded_run_ahead_survives_many_multi_device_steps(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
                        " --xla_cpu_collective_call_terminate_timeout_seconds=20").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sum" in proc.stdout


def test_run_ahead_keeps_at_most_depth_markers_in_flight():
    ahead = RunAhead(depth=2)
    for i in range(5):
        ahead.dispatched(jnp.asarray(i))
        assert len(ahead._in_flight) == min(i + 1, 2)
    ahead.drain()
    assert not ahead._in_flight


def test_add_trees_is_the_leafwise_sum():
    a = {"x": jnp.arange(3.0), "y": {"z": jnp.float32(1.5)}}
    b = {"x": jnp.ones(3), "y": {"z": jnp.float32(2.0)}}
    out = add_trees(a, b)
    np.testing.assert_array_equal(out["x"], [1.0, 2.0, 3.0])
    assert float(out["y"]["z"]) == 3.5
