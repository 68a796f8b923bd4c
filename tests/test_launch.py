"""launch.py's multi-process arguments: flags win over the environment, nothing set means a
single-process run, --multihost alone leaves everything to cluster auto-detection."""

from __future__ import annotations

import importlib.util
import os

import pytest

from hamjax.cpu_devices import cpu_device_count, with_cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("launch", os.path.join(REPO, "launch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_process_when_nothing_is_set(launch):
    assert launch.distributed_args({"multihost": False}, {}) is None


def test_multihost_alone_auto_detects(launch):
    assert launch.distributed_args({"multihost": True}, {}) == {}


def test_flags_win_over_environment(launch):
    flags = {"multihost": False, "coordinator_address": "10.0.0.2:1234", "num_processes": 4,
             "process_id": None}
    env = {"JAX_COORDINATOR_ADDRESS": "other:1", "JAX_PROCESS_ID": "3"}
    assert launch.distributed_args(flags, env) == {
        "coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}


def test_environment_alone_starts_a_multi_process_run(launch):
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:9", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
    assert launch.distributed_args({"multihost": False}, env) == {
        "coordinator_address": "localhost:9", "num_processes": 2, "process_id": 1}


def test_cpu_devices_auto_takes_the_most_cores_that_divide_every_batch():
    assert cpu_device_count("auto", 2, (128, 256)) == 2
    assert cpu_device_count("auto", 8, (48, 256)) == 8
    assert cpu_device_count("auto", 8, (12, 256)) == 4
    assert cpu_device_count("auto", 2, (15, 256)) == 1
    assert cpu_device_count("auto", 2) == 2  # no batch constraint (the evaluation CLI)
    assert cpu_device_count("3", 2, (128,)) == 3
    with pytest.raises(ValueError, match="cpu_devices"):
        cpu_device_count("0", 2, (128,))


def test_cpu_devices_never_override_a_users_xla_flag():
    patient = "--xla_cpu_collective_call_terminate_timeout_seconds=300"
    assert with_cpu_devices("", 2) == f"--xla_force_host_platform_device_count=2 {patient}"
    assert with_cpu_devices("--xla_cpu_x=1", 1) == "--xla_cpu_x=1"
    mine = "--xla_force_host_platform_device_count=4"
    assert with_cpu_devices(mine, 2) == f"{mine} {patient}"
    mine_too = f"{mine} --xla_cpu_collective_call_terminate_timeout_seconds=5"
    assert with_cpu_devices(mine_too, 2) == mine_too


def test_orbax_disk_full_tracebacks_are_dropped_and_nothing_else(launch):
    """A full disk: orbax's background threads log their tracebacks (100+ lines per save);
    the run reports it once, as one line, so those records are dropped; other records stay."""
    import errno
    import logging

    def record(level, path, message, error=None):
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("absl", level, path, 1, message, (), exc_info)

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/checkpoints/5/_METADATA")
    orbax = "/venv/orbax/checkpoint/_src/futures/future.py"
    assert not launch.quiet_orbax_disk_full(record(logging.ERROR, orbax, "thread raised", full))
    assert not launch.quiet_orbax_disk_full(
        record(logging.ERROR, orbax, f"commit failed: {full}"))
    assert launch.quiet_orbax_disk_full(record(logging.ERROR, orbax, "other", ValueError("x")))
    assert launch.quiet_orbax_disk_full(record(logging.WARNING, orbax, str(full)))
    assert launch.quiet_orbax_disk_full(record(logging.ERROR, "/jax/_src/x.py", "y", full))
