"""Trains and evaluates one experiment: `hamjax-train --config=configs/<name>.py --workdir=DIR`
(the same as `python launch.py ...` in a checkout, or `python -m hamjax.launch ...`).

Rerunning the same command with the same --workdir resumes from the last checkpoint. Override any
field on the command line, e.g. `--config.train.epochs=3`. Every mistake in the command line ends
in one message naming the flag or field and exit status 2; the training logic lives in
`hamjax.train`, importable from a notebook.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import sys
import zlib

from absl import app, flags, logging
from ml_collections import config_flags

from hamjax import accelerators
from hamjax.cpu_devices import cpu_device_count, use_cpu_devices
from hamjax.paths import local_dir_problem

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard and report.json: "
                    "a local folder (one every host mounts, for several hosts) or gs://bucket/dir. "
                    "Default: runs/<config name>.")
flags.DEFINE_bool("multihost", False, "Join a multi-process run: jax.distributed.initialize() "
                  "with the flags below, or cluster auto-detection (TPU VM pods, SLURM) where "
                  "they are not given.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --multihost; "
                    "default: $JAX_COORDINATOR_ADDRESS or auto-detection).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (default: $JAX_NUM_PROCESSES "
                     "or auto-detection).")
flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1 (default: "
                     "$JAX_PROCESS_ID or auto-detection).")
flags.DEFINE_string("local_device_ids", None, "GPUs of this process in a multi-process run: "
                    "'auto' (jax's choice: under SLURM/Open MPI the one GPU of the process's "
                    "local rank, for one process per GPU), 'all' (every GPU it sees, for one "
                    "process per node) or ids such as 0,1 (default: $HAMJAX_LOCAL_DEVICE_IDS, "
                    "else auto).")
flags.DEFINE_integer("mesh_devices", None, "Devices of each process to train on (default: all "
                     "of them); fewer than the process sees is refused without "
                     "--allow_idle_devices.")
flags.DEFINE_bool("allow_idle_devices", False, "Run even when the mesh leaves some of the "
                  "accelerators a host can see idle (refused by default: a launch that gives "
                  "each process one GPU of eight looks healthy and is 8x slower).")
flags.DEFINE_string("cpu_devices", "auto", "On the CPU backend only: host devices to split the "
                    "batch over ('auto': one per core, the most that divides train and eval "
                    "batches; 1: none). XLA:CPU runs one device's step on about one core, so this "
                    "is the CPU's data parallelism. Ignored when a GPU/TPU will run the job or "
                    "when XLA_FLAGS sets --xla_force_host_platform_device_count.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose checkpoint was written "
                  "with a different config (any field outside "
                  "hamjax.config.RESUME_MAY_CHANGE); refused without it. The changed fields "
                  "are listed in report.json under config_changed_on_resume.")
flags.DEFINE_bool("break_lock", False, "Remove the workdir's lock before starting, whoever "
                  "holds it: only when no run uses the workdir (a lock of a dead run on another "
                  "host is taken over by itself once its heartbeat is 15 minutes old).")

_ENV = {"coordinator_address": ("JAX_COORDINATOR_ADDRESS", str),
        "num_processes": ("JAX_NUM_PROCESSES", int), "process_id": ("JAX_PROCESS_ID", int)}
LOCAL_DEVICE_IDS_ENV = "HAMJAX_LOCAL_DEVICE_IDS"


class UsageError(Exception):
    """A mistake in the command line: its message is the one line printed."""


def distributed_args(values: dict, environ: dict) -> dict | None:
    """jax.distributed.initialize() keyword arguments from flags, else the environment; None
    when this is not a multi-process run. Unset fields are left to cluster auto-detection."""
    args = {}
    for name, (variable, kind) in _ENV.items():
        value = values.get(name)
        if value is None and environ.get(variable):
            value = kind(environ[variable])
        if value is not None:
            args[name] = value
    if not args and not values.get("multihost"):
        return None
    return args


# ---------------------------------------------------------------------------------------------
# Command-line mistakes as one line each.


def config_path(argv: list[str]) -> str | None:
    """The file of --config in argv (before any ':' argument), None when not given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def syntax_error_message(err: SyntaxError) -> str:
    """A config file's syntax error as the compiler shows it: file, line, the line and a caret."""
    where = f"{err.filename}:{err.lineno}: {err.msg}"
    text = (err.text or "").rstrip("\n")
    if not text:
        return where
    indent = len(text) - len(text.lstrip())
    caret = " " * max((err.offset or 1) - 1 - indent, 0) + "^"
    return f"{where}\n    {text.strip()}\n    {caret}"


def missing_field(config, dotted: str) -> str | None:
    """'config.train.epoch: no such field; did you mean epochs?' when the override path
    `dotted` (without 'config.') leaves the fields of `config`, else None."""
    node, walked = config, ["config"]
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None:
            return None  # below a leaf: not a missing field
        walked.append(part)
        if part not in keys:
            close = difflib.get_close_matches(part, [str(k) for k in keys], n=1)
            fix = f"did you mean {close[0]}?" if close else "see the config file for the fields"
            return f"{'.'.join(walked)}: no such field; {fix}"
        node = node[part]
    return None


def override_error_message(argv: list[str], config) -> str | None:
    """The first --config.<path> override in argv naming no field of the loaded `config`."""
    if config is None:
        return None
    for arg in argv:
        if arg.startswith("--config."):
            message = missing_field(config, arg[len("--config."):].split("=", 1)[0])
            if message is not None:
                return message
    return None


_QUOTED_NAME = re.compile(r"""^[\s'"\\]*([A-Za-z_]\w*)""")
_SUGGESTION = re.compile(r'Did you mean "([^"]+)"')


def missing_key_message(err: BaseException, argv: list[str]) -> str | None:
    """The same message from ml_collections' own error ("'epoch'... Did you mean "epochs"..."),
    for when the parser failed before the config was kept: the override holding the key."""
    text = str(err.args[0]) if err.args else ""
    match = _QUOTED_NAME.match(text)
    if not isinstance(err, (AttributeError, KeyError)) or match is None:
        return None
    missing = match.group(1)
    for arg in argv:
        parts = arg[2:].split("=", 1)[0].split(".") if arg.startswith("--config.") else []
        if missing in parts[1:]:
            hint = _SUGGESTION.search(text)
            fix = f"did you mean {hint.group(1)}?" if hint else "see the config file for the fields"
            return f"{'.'.join(parts[: parts.index(missing, 1) + 1])}: no such field; {fix}"
    return None


def usage_message(err: BaseException, argv: list[str], config=None) -> str:
    """One message for anything the flag parser raised (`config`: the loaded config, if it
    was loaded before the failure)."""
    if isinstance(err, SyntaxError):
        return syntax_error_message(err)
    message = override_error_message(argv, config) or missing_key_message(err, argv)
    if message is not None:
        return message
    return " ".join(str(err).split()) or type(err).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure turned into one message and exit status 2."""
    path = config_path(argv)
    if path is not None and not os.path.isfile(path):
        fail(f"--config={path}: no such file")
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - flags, ml_collections and the config module raise
        try:
            config = flags.FLAGS["config"].value
        except Exception:  # noqa: BLE001 - the config file itself did not load
            config = None
        fail(usage_message(err, argv, config))


def fail(message: str) -> None:
    """Prints one error message and leaves with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_usage(values: dict) -> None:
    """Raises UsageError for a flag value that cannot work, before anything starts."""
    try:
        cpu_device_count(values["cpu_devices"], 1)
        accelerators.parse_local_device_ids(values["local_device_ids"])
    except ValueError as err:
        raise UsageError(str(err)) from err
    if values["mesh_devices"] is not None and values["mesh_devices"] < 1:
        raise UsageError(f"--mesh_devices={values['mesh_devices']}: give a count >= 1 "
                         "(default: every device)")
    problem = local_dir_problem(values["workdir"])
    if problem:
        raise UsageError(problem)


# ---------------------------------------------------------------------------------------------
# Devices.


def start_jax(values: dict, environ: dict):
    """Joins the multi-process run if there is one and returns jax."""
    import jax

    init_args = distributed_args(values, environ)
    choice = accelerators.parse_local_device_ids(values["local_device_ids"])
    ids = accelerators.resolve_local_device_ids(choice, accelerators.visible_gpus(environ))
    if init_args is not None:
        if ids is not None:
            init_args["local_device_ids"] = ids
        jax.distributed.initialize(**init_args)
    elif ids is not None:  # one process: what initialize would do with local_device_ids
        jax.config.update("jax_cuda_visible_devices", ",".join(map(str, ids)))
    return jax


def device_rows(jax, used_local: int) -> list[tuple[int, int, int]]:
    """(machine key, devices in the mesh, accelerators seen) of every process, in process order
    (a collective on several processes). On the CPU each process is its own machine."""
    import socket

    import numpy as np

    platform = jax.default_backend()
    if platform == "cpu":
        key, visible = jax.process_index(), jax.local_device_count()
    else:
        key = zlib.crc32(socket.gethostname().encode()) % (2**31)
        seen = accelerators.visible_accelerators(platform)
        visible = -1 if seen is None else seen
    row = np.asarray([key, used_local, visible], np.int32)
    if jax.process_count() == 1:
        return [tuple(int(x) for x in row)]
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(-1, 3)
    return [tuple(int(x) for x in r) for r in rows]


def choose_devices(jax, values: dict) -> list:
    """The mesh's devices; prints the layout on process 0 and raises UsageError (on every
    process alike) when some accelerators would sit idle."""
    devices = accelerators.mesh_devices(jax.devices(), values["mesh_devices"])
    me = jax.process_index()
    used_local = sum(d.process_index == me for d in devices)
    platform = jax.default_backend()
    if me == 0:
        print(accelerators.layout_line(jax.process_count(), used_local, len(devices), platform,
                                       jax.devices()[0].device_kind), flush=True)
    idle = accelerators.first_idle_host(device_rows(jax, used_local))
    if idle is not None and not values["allow_idle_devices"]:
        raise UsageError(accelerators.idle_devices_message(*idle, platform))
    return devices


# ---------------------------------------------------------------------------------------------
# The run.


def flag_values() -> dict:
    fv = flags.FLAGS
    names = ("workdir", "multihost", *_ENV, "local_device_ids", "mesh_devices",
             "allow_idle_devices", "cpu_devices", "allow_config_change", "break_lock")
    values = {n: fv[n].value for n in names}
    if values["local_device_ids"] is None:
        values["local_device_ids"] = os.environ.get(LOCAL_DEVICE_IDS_ENV)
    if not values["workdir"]:
        name = os.path.splitext(os.path.basename(fv["config"].config_filename.split(":")[0]))[0]
        values["workdir"] = os.path.join("runs", name)
    return values


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected argument {argv[1]!r}: every setting is a --flag (see --help)")
    config = flags.FLAGS.config
    values = flag_values()
    try:
        check_usage(values)
    except UsageError as err:
        fail(str(err))
    if accelerators.runs_on_cpu():
        sizes = tuple(v for v in (config.train.batch_size, config.eval.batch_size)
                      if isinstance(v, int))
        use_cpu_devices(values["cpu_devices"], sizes)  # before anything touches a device
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
    std_logging.getLogger("absl").addFilter(quiet_orbax_disk_full)
    jax = start_jax(values, dict(os.environ))
    from hamjax import workdir_lock
    from hamjax.errors import HamjaxError, TrainingInterrupted, disk_full_error, is_disk_full
    from hamjax.train import train_and_evaluate

    workdir = values["workdir"]
    try:
        devices = choose_devices(jax, values)
        if values["break_lock"] and jax.process_index() == 0:
            holder = workdir_lock.break_lock(workdir)
            if holder is not None:
                print(f"removed the lock of {workdir_lock.describe(holder)}", flush=True)
        train_and_evaluate(config, workdir, allow_config_change=values["allow_config_change"],
                           devices=devices)
    except UsageError as err:
        fail(str(err))
    except TrainingInterrupted as err:
        sys.exit(exit_message(err, err.exit_code))
    except HamjaxError as err:  # the message says what to fix; a traceback would bury it
        sys.exit(exit_message(f"error: {err}", 2))
    except Exception as err:  # a full disk met outside the checkpoint and log writers
        if not is_disk_full(err):
            raise
        path = getattr(err, "filename", None) or workdir
        sys.exit(exit_message(f"error: {disk_full_error(path, err)}", 2))
    except KeyboardInterrupt:  # a second Ctrl-C, or one during the final evaluation
        exit_message("interrupted; rerun the same command to resume", 130)
        sys.stdout.flush()
        # At once, as after SIGKILL (saves are atomic, the lock goes stale): a checkpoint write
        # cut short leaves orbax threads that would block a normal interpreter exit forever.
        os._exit(130)


def quiet_orbax_disk_full(record: std_logging.LogRecord) -> bool:
    """A logging filter dropping orbax's background-thread tracebacks of a full disk (over a
    hundred lines per failed save): the run stops with that error as one line instead."""
    from hamjax.errors import is_disk_full

    if record.levelno < std_logging.ERROR or "orbax" not in record.pathname:
        return True
    error = record.exc_info[1] if record.exc_info else None
    return not (is_disk_full(error) or is_disk_full(Exception(record.getMessage())))


def exit_message(message, code: int) -> int:
    """Prints `message` on stderr and returns the exit code to leave with: 2 for a project
    error (config, data, checkpoint, workdir lock, divergence, full disk), 128 + signal for a
    signal."""
    print(message, file=sys.stderr, flush=True)
    return code


def run() -> None:
    """The console script `hamjax-train`."""
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
