"""Trains and evaluates one experiment: `python launch.py --config=configs/<name>.py --workdir=DIR`.

Kept short on purpose: the logic lives in `hamjax.train`, importable from a notebook.
Rerunning the same command with the same --workdir resumes from the last checkpoint.
Override any field on the command line, e.g. `--config.train.epochs=3`.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

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
    import jax

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO

    names = ("multihost", *_ENV)
    init_args = distributed_args({n: flags.FLAGS[n].value for n in names}, dict(os.environ))
    if init_args is not None:
        jax.distributed.initialize(**init_args)
    from hamjax.train import train_and_evaluate

    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = flags.FLAGS.workdir or os.path.join("runs", name)
    train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
