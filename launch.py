"""Trains and evaluates one experiment: `python launch.py --config=configs/<name>.py --workdir=DIR`.

The same as the installed console script `hamjax-train`; the launcher lives in `hamjax.launch`
(flags: `python launch.py --help`). Rerunning the same command with the same --workdir resumes
from the last checkpoint. Override any field on the command line, e.g. `--config.train.epochs=3`.
"""

from hamjax.launch import run

if __name__ == "__main__":
    run()
