"""Trains and evaluates one experiment: `python launch.py --config=configs/<name>.py --workdir=DIR`.

Kept short on purpose: the logic lives in `hamjax.train`, importable from a notebook.
Rerunning the same command with the same --workdir resumes from the last checkpoint.
Override any field on the command line, e.g. `--config.train.epochs=3`.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hamjax.cpu_devices import use_cpu_devices

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard and report.json. "
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
flags.DEFINE_string("cpu_devices", "auto", "On the CPU: host devices to split the batch over "
                    "('auto': one per core, the most that divides train and eval batches; 1: "
                    "none). XLA:CPU runs one device's step on about one core, so this is the "
                    "CPU's data parallelism. No effect on GPU/TPU or when XLA_FLAGS sets "
                    "--xla_force_host_platform_device_count.")
flags.DEFINE_bool("allow_config_change", False, "Resume a workdir whose checkpoint was written "
                  "with a different config (any field outside "
                  "hamjax.config.RESUME_MAY_CHANGE); refused without it. The changed fields "
                  "are listed in report.json under config_changed_on_resume.")
flags.mark_flag_as_required("config")

_ENV = {"coordinator_address": ("JAX_COORDINATOR_ADDRESS", str),
        "num_processes": ("JAX_NUM_PROCESSES", int), "process_id": ("JAX_PROCESS_ID", int)}


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


def main(argv: list[str]) -> None:
    del argv
    config = flags.FLAGS.config
    sizes = tuple(v for v in (config.train.batch_size, config.eval.batch_size)
                  if isinstance(v, int))
    use_cpu_devices(flags.FLAGS.cpu_devices, sizes)  # before anything touches a device
    import jax

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
    std_logging.getLogger("absl").addFilter(quiet_orbax_disk_full)

    names = ("multihost", *_ENV)
    init_args = distributed_args({n: flags.FLAGS[n].value for n in names}, dict(os.environ))
    if init_args is not None:
        jax.distributed.initialize(**init_args)
    from hamjax.errors import HamjaxError, TrainingInterrupted, disk_full_error, is_disk_full
    from hamjax.train import train_and_evaluate

    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = flags.FLAGS.workdir or os.path.join("runs", name)
    try:
        train_and_evaluate(flags.FLAGS.config, workdir,
                           allow_config_change=flags.FLAGS.allow_config_change)
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


if __name__ == "__main__":
    app.run(main)
