"""Evaluation: one host driver, configured for the trainer, the CLI and AutoAttack.

Modules, one responsibility each:
  driver    pads, shards and unpads chunks once; runs a jitted per-chunk function; resumable
  stages    the per-chunk functions (clean pass, one attack judged) and attack chains
  specs     attack names (pgd20, cw, autoattack, ...) -> resolved settings and keys
  resume    the per-example resume file of an evaluation
  runner    clean pass + every requested attack over arrays (`run_attacks`)
  autoattack `run_autoattack`: AutoAttack's chain over numpy arrays
  pgd       `PGDEvaluator`: the trainer's per-epoch clean + PGD-N pass
  workdir   a trained workdir: `load_run` (through `hamjax.run`), `evaluate_workdir`
  report    the JSON record and the per-class bar chart
  inflation PGD-N vs AutoAttack/APGD per class: gap, breaking stage, margin histograms
  selection the attack that selects checkpoints on validation (config.eval.select_attack)
  cli       `python -m hamjax.evaluate`

Robust accuracy has one definition everywhere: an example is robust only if it is classified
correctly clean and after every attack (RobustBench's convention); attacks only run on the
examples still robust. Nothing is imported here, and no module of this package imports the
trainer (`hamjax.train`): the trainer configures the evaluators, never the reverse.
"""
