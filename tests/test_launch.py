"""The launcher (hamjax.launch, run by launch.py and hamjax-train): multi-process arguments (flags
win over the environment, nothing set means one process, --multihost alone leaves everything to
cluster auto-detection), command-line mistakes as one line and exit 2, device choice and the
refusal of idle accelerators."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from absl import flags

import hamjax.launch as launch_module
from hamjax import accelerators
from hamjax.cpu_devices import cpu_device_count, with_cpu_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quickstart.py")


@pytest.fixture(scope="module")
def launch():
    return launch_module


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
    for bad in ("0", "-1", "abc", ""):
        with pytest.raises(ValueError, match=f"--cpu_devices='{bad}': give 'auto' or a count"):
            cpu_device_count(bad, 2, (128,))


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


# ---------------------------------------------------------------------------------------------
# Command-line mistakes: one message naming the flag, field or file, exit status 2.


@pytest.fixture
def parse(capsys):
    """Runs launch.parse_flags on a command line; returns (exit code or None, stderr)."""

    def run(*args: str) -> tuple[int | None, str]:
        code = None
        try:
            launch_module.parse_flags(["launch.py", *args])
        except SystemExit as exit_:
            code = exit_.code
        finally:
            flags.FLAGS.unparse_flags()
        return code, capsys.readouterr().err

    return run


def test_a_misspelt_field_names_it_and_the_suggestion(parse):
    code, err = parse(f"--config={CONFIG}", "--config.train.epoch=3")
    assert (code, err) == (2, "error: config.train.epoch: no such field; did you mean epochs?\n")
    code, err = parse(f"--config={CONFIG}", "--config.trian.epochs=3")
    assert (code, err) == (2, "error: config.trian: no such field; did you mean train?\n")


def test_ml_collections_own_error_is_traced_to_the_override(launch):
    """The command-line path: ml_collections raises while applying the override."""
    import ml_collections

    config = ml_collections.ConfigDict({"train": {"epochs": 1}})
    with pytest.raises(AttributeError) as err:
        _ = config.train.epoch
    argv = ["launch.py", "--config=c.py", "--config.train.epoch=3"]
    assert launch.missing_key_message(err.value, argv) == (
        "config.train.epoch: no such field; did you mean epochs?")
    assert launch.missing_key_message(ValueError("'epoch'"), argv) is None


def test_a_misspelt_field_on_the_real_command_line():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch.py"), f"--config={CONFIG}",
         "--config.train.epoch=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stderr) == (
        2, "error: config.train.epoch: no such field; did you mean epochs?\n")


def test_a_missing_config_file_is_one_line(parse, tmp_path):
    code, err = parse(f"--config={tmp_path}/nope.py:method=trades")
    assert (code, err) == (2, f"error: --config={tmp_path}/nope.py: no such file\n")


def test_a_config_syntax_error_shows_file_line_and_caret(parse, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef get_config(:\n    return None\n")
    code, err = parse(f"--config={bad}")
    assert code == 2
    assert err.splitlines() == [f"error: {bad}:3: invalid syntax", "    def get_config(:",
                                "                   ^"]


def test_an_unknown_flag_is_one_line(parse):
    code, err = parse(f"--config={CONFIG}", "--nope=1")
    assert (code, err) == (2, "error: Unknown command line flag 'nope'\n")


def _values(**changes) -> dict:
    values = {"cpu_devices": "auto", "local_device_ids": None, "mesh_devices": None,
              "workdir": "runs/x"}
    return dict(values, **changes)


def test_bad_flag_values_and_unusable_workdirs_are_refused_before_starting(launch, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = {
        "--cpu_devices='0': give 'auto' or a count >= 1": _values(cpu_devices="0"),
        "--cpu_devices='abc': give 'auto' or a count >= 1": _values(cpu_devices="abc"),
        "--mesh_devices=0: give a count >= 1": _values(mesh_devices=0),
        "--local_device_ids='0,0': give 'auto', 'all'": _values(local_device_ids="0,0"),
        f"--workdir={afile} is a file": _values(workdir=str(afile)),
        f"--workdir={afile}/run cannot be created: {afile} is a file": _values(
            workdir=str(afile / "run")),
    }
    for message, values in cases.items():
        with pytest.raises(launch.UsageError) as err:
            launch.check_usage(values)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), err.value
    launch.check_usage(_values(workdir=str(tmp_path / "new" / "run")))  # creatable: fine
    launch.check_usage(_values(workdir="gs://bucket/run", local_device_ids="all"))
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_mesh_smaller_than_the_devices_of_a_process_is_refused():
    """Two fake CPU devices, a mesh of one: refused with the fix, exit 2, before any training;
    the layout line comes first."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch.py"), f"--config={CONFIG}",
         "--mesh_devices=1", "--workdir=gs://never-created/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == (
        "devices: 1 process x 1 local cpu device(s) = 1 global (cpu)")
    assert proc.stderr.splitlines() == [
        "error: " + accelerators.idle_devices_message(1, 2, "cpu")], proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Accelerators: counted without jax, so a one-GPU-of-eight launch is caught.


def test_visible_gpus_follow_cuda_visible_devices_else_the_driver(tmp_path):
    for i in range(8):
        (tmp_path / f"0000:{i:02x}:00.0").mkdir()
    pattern = str(tmp_path / "*")
    assert accelerators.visible_gpus({}, pattern) == 8
    assert accelerators.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, pattern) == 4
    assert accelerators.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ab12, GPU-cd34"}, pattern) == 2
    for hidden in ("", "-1"):
        assert accelerators.visible_gpus({"CUDA_VISIBLE_DEVICES": hidden}, pattern) == 0
    assert accelerators.visible_gpus({}, str(tmp_path / "none" / "*")) == 0


def test_cpu_devices_apply_only_where_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(accelerators, "visible_tpu_chips", lambda environ: 0)
    cuda = lambda module: module == "jax_cuda12_plugin"  # noqa: E731
    assert accelerators.runs_on_cpu({"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "0"}, cuda)
    assert not accelerators.runs_on_cpu({"JAX_PLATFORMS": "cuda,cpu"}, cuda)
    assert not accelerators.runs_on_cpu({"JAX_PLATFORMS": "tpu"}, cuda)
    assert not accelerators.runs_on_cpu({"CUDA_VISIBLE_DEVICES": "0,1"}, cuda)
    assert accelerators.runs_on_cpu({"CUDA_VISIBLE_DEVICES": "0,1"}, lambda module: False)
    assert accelerators.runs_on_cpu({"CUDA_VISIBLE_DEVICES": ""}, cuda)
    monkeypatch.setattr(accelerators, "visible_tpu_chips", lambda environ: 4)
    assert not accelerators.runs_on_cpu({"CUDA_VISIBLE_DEVICES": ""}, lambda m: m == "libtpu")
    assert accelerators.runs_on_cpu({"CUDA_VISIBLE_DEVICES": ""}, cuda)


def test_local_device_ids_choices():
    parse = accelerators.parse_local_device_ids
    assert parse(None) is None and parse("auto") is None and parse("") is None
    assert parse("all") == "all" and parse("0,2") == [0, 2] and parse("3") == [3]
    for bad in ("a", "0,0", "-1", "0,,1"):
        with pytest.raises(ValueError, match="--local_device_ids"):
            parse(bad)
    resolve = accelerators.resolve_local_device_ids
    assert resolve("all", 8) == list(range(8)) and resolve("all", 0) is None
    assert resolve([1], 8) == [1] and resolve(None, 8) is None


def _device(process: int, index: int):
    return SimpleNamespace(process_index=process, id=10 * process + index)


def test_mesh_devices_take_the_same_number_from_every_process():
    devices = [_device(p, i) for p in range(3) for i in range(4)]
    chosen = accelerators.mesh_devices(devices, 2)
    assert [d.id for d in chosen] == [0, 1, 10, 11, 20, 21]
    assert accelerators.mesh_devices(devices, None) == devices
    assert accelerators.mesh_devices(devices, 9) == devices


def test_idle_hosts_add_up_the_processes_sharing_a_machine():
    first_idle = accelerators.first_idle_host
    # SLURM, one task per node of 8 GPUs, jax's default of one GPU per process: refused.
    assert first_idle([(7, 1, 8), (9, 1, 8)]) == (1, 8)
    # One process per GPU (8 per node), each with CUDA_VISIBLE_DEVICES of all 8: accepted.
    assert first_idle([(7, 1, 8)] * 8 + [(9, 1, 8)] * 8) is None
    # One process per node with --local_device_ids=all; one process per GPU bound to its GPU.
    assert first_idle([(7, 8, 8), (9, 8, 8)]) is None
    assert first_idle([(7, 1, 1)] * 8) is None
    assert first_idle([(7, 1, -1)]) is None  # a platform that cannot be counted: not judged
    assert first_idle([(7, 4, 4), (9, 2, 4)]) == (2, 4)
    assert "--local_device_ids=all" in accelerators.idle_devices_message(1, 8, "gpu")
