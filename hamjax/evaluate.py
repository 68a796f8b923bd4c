"""Evaluate a trained workdir: per-class clean and robust accuracy under a list of attacks.

`python -m hamjax.evaluate --workdir DIR [--attacks pgd20,autoattack] [--split test|val]
[--num_examples N] [--checkpoint best|last] [--batch_size B] [--seed S] [--eps E]
[--step_size S] [--attack.<kind>.<field>=V] [--fast] [--no_resume] [--inflation_threshold P]`

Results go to `DIR/eval/<split>_<ckpt>.json` plus a per-class bar chart `.png`; per-example
progress goes to `DIR/eval/<split>_<ckpt>.partial.json`, so an interrupted evaluation rerun with
the same flags resumes. With pgdN beside autoattack (or an apgd attack) the JSON's `inflation`
holds the per-class gap between them and which stage broke what PGD missed (a warning above
`--inflation_threshold` points), and `<split>_<ckpt>_margins.png` the clean logit margins per
class. An example counts as robust only if it is classified correctly clean and
after every attack. This module is the entry point; the code lives in `hamjax.evaluation`
(notebooks: `evaluate_workdir`, or `load_run` + `run_attacks` on your own arrays).
"""

from __future__ import annotations

import sys

from hamjax.evaluation.cli import main
from hamjax.evaluation.runner import run_attacks
from hamjax.evaluation.specs import check_attack_names, parse_attacks
from hamjax.evaluation.workdir import evaluate_workdir, load_run

__all__ = ["check_attack_names", "evaluate_workdir", "load_run", "main", "parse_attacks",
           "run_attacks"]

if __name__ == "__main__":
    sys.exit(main())
