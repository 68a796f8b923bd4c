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
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first (TPU VM pods, "
                  "multi-node GPU).")
flags.mark_flag_as_required("config")


def main(argv: list[str]) -> None:
    del argv
    import jax

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO

    if flags.FLAGS.multihost:
        jax.distributed.initialize()
    from hamjax.train import train_and_evaluate

    config_path = flags.FLAGS["config"].config_filename
    name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
    workdir = flags.FLAGS.workdir or os.path.join("runs", name)
    train_and_evaluate(flags.FLAGS.config, workdir)


if __name__ == "__main__":
    app.run(main)
