"""`python -m hamjax.evaluate`: absl flags -> `evaluate_workdir`.

Flags are absl flags, as launch.py's. Attack settings are an ml_collections ConfigDict flag, so
`--attack.square.n_queries=1000` or `--attack.pgd.step_size=eps/8` is parsed and type-checked
exactly as launch.py parses `--config.train.epochs=3` (kinds: pgd, cw, fgsm, apgd_ce, apgd_dlr,
apgd_t, fab_t, fab, square). The older `--override square.n_queries=1000` spells the same flag.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from hamjax.accelerators import runs_on_cpu
from hamjax.cpu_devices import use_cpu_devices
from hamjax.errors import ConfigError, HamjaxError
from hamjax.evaluation.inflation import DEFAULT_THRESHOLD
from hamjax.evaluation.specs import (
    TUNABLE,
    VALID_ATTACKS_TEXT,
    override_schema,
    overrides_from,
    section,
)
from hamjax.evaluation.workdir import CHECKPOINTS, SPLITS, evaluate_workdir

PROG = "python -m hamjax.evaluate"


def _define(fv: flags.FlagValues, argv: Sequence[str]) -> flags.FlagHolder:
    """Defines every flag on `fv`; returns the attack-settings ConfigDict flag."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (launch.py --workdir).",
                        flag_values=fv)
    flags.DEFINE_string("attacks", "pgd20,autoattack",
                        f"Comma-separated attack names: {VALID_ATTACKS_TEXT}.", flag_values=fv)
    flags.DEFINE_enum("split", "test", SPLITS, "Split to evaluate.", flag_values=fv)
    flags.DEFINE_integer("num_examples", 0, "Class-stratified subset size; 0 = the whole split.",
                         flag_values=fv)
    flags.DEFINE_enum("checkpoint", "best", sorted(CHECKPOINTS),
                      "best on validation (falls back to last) or last.", flag_values=fv)
    flags.DEFINE_integer("batch_size", None, "Chunk size. Default: config.eval.batch_size.",
                         flag_values=fv)
    flags.DEFINE_integer("seed", None, "Default: the run's seed.", flag_values=fv)
    flags.DEFINE_float("eps", None, "L_inf radius in [0, 1]. Default: config.eval.eps.",
                       flag_values=fv)
    flags.DEFINE_string("step_size", None, "PGD/CW step: a number or eps/K. Default: the run's "
                        "config.eval.step_size at this eps (what its report used).",
                        flag_values=fv)
    flags.DEFINE_bool("fast", False, "Smoke-test preset: 10 APGD/FAB steps, 3 targets, 100 "
                      "Square queries (recorded; not comparable with published numbers).",
                      flag_values=fv)
    flags.DEFINE_bool("no_resume", False, "Ignore the partial results file.", flag_values=fv)
    flags.DEFINE_string("name", "", "Suffix of the output files (eval/<split>_<checkpoint>_<name>"
                        ".json), to keep another evaluation of the same checkpoint beside them.",
                        flag_values=fv)
    flags.DEFINE_string("compare_to", "", "Another evaluation JSON of the same images (e.g. "
                        "a baseline run's eval/test_last.json, same --split, --num_examples, "
                        "--seed and eps): print this evaluation against it image by image, "
                        "with paired 95% intervals (hamjax.evaluation.paired).", flag_values=fv)
    flags.DEFINE_float("inflation_threshold", DEFAULT_THRESHOLD, "With pgdN beside autoattack "
                       "or an apgd attack: warn (and flag in the JSON) when pgdN's robust "
                       "accuracy exceeds the strong attack's by more than this many points, on "
                       "average or in any class.", flag_values=fv)
    flags.DEFINE_string("cpu_devices", "auto", "On the CPU: host devices to split each chunk "
                        "over ('auto': one per core; 1: none), as launch.py does; chunks are "
                        "rounded up to a multiple of the devices. Results do not depend on it "
                        "(per-example keys).", flag_values=fv)
    flags.DEFINE_bool("help", False, "Show this help.", short_name="h", flag_values=fv)
    return config_flags.DEFINE_config_dict(
        "attack", override_schema(), "Attack settings, e.g. --attack.square.n_queries=1000.",
        flag_values=fv, sys_argv=list(argv))


def _kind(name: str) -> str:
    """An attack name of --override -> its settings section: pgd20 -> pgd, apgd-t -> apgd_t."""
    name = name.lower()
    for kind in ("pgd", "cw"):
        if name.startswith(kind) and name[len(kind):].isdigit():
            return kind
    return section(name)


def with_legacy_overrides(argv: Sequence[str]) -> list[str]:
    """argv with each `--override NAME.FIELD=VALUE` spelled `--attack.<kind>.FIELD=VALUE`."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("--override", "-override"):
            arg = "--override=" + next(args, "")
        if arg.startswith(("--override=", "-override=")):
            text = arg.split("=", 1)[1]
            name, _, rest = text.partition(".")
            arg = f"--attack.{_kind(name)}.{rest}" if rest else f"--attack.{text}"
        out.append(arg)
    return out


def require_single_host(process_count: int) -> None:
    """ConfigError on a multi-process run: the CLI writes one result file from one host, so on
    N hosts each would redo (and rewrite) the whole evaluation."""
    if process_count > 1:
        raise ConfigError(
            f"{PROG} runs on one host, but jax sees {process_count} processes;"
            " run it on a single host (the trainer's own final report is multi-host)")


def check_attack_settings(argv: Sequence[str]) -> None:
    """ConfigError naming an unknown --attack.<kind>.<field> and listing the valid ones."""
    valid = {f"{section(kind)}.{field}" for kind, fields in TUNABLE.items() for field in fields}
    for arg in argv:
        if arg.startswith("--attack."):
            path = arg[len("--attack."):].split("=", 1)[0]
            if path not in valid:
                raise ConfigError(f"--attack.{path} is not an attack setting; valid: "
                                  f"{', '.join(sorted(valid))}")


def _parse(argv: Sequence[str]) -> tuple[flags.FlagValues, flags.FlagHolder]:
    args = [PROG, *with_legacy_overrides(argv)]
    check_attack_settings(args)
    fv = flags.FlagValues()
    attack = _define(fv, args)
    fv(args)
    return fv, attack


def read_comparison(path: str) -> dict:
    """The evaluation JSON of --compare_to, read before the evaluation so that a wrong path
    costs nothing."""
    from hamjax.evaluation.paired import load_evaluation

    try:
        return load_evaluation(path)
    except ValueError as err:
        raise ConfigError(f"--compare_to={path!r}: {err}") from err


def paired_printout(result: dict, baseline: dict, baseline_path: str) -> str:
    """This evaluation against --compare_to's, image by image (a ConfigError if they did not
    attack the same images; this evaluation is saved either way)."""
    from hamjax.evaluation.paired import compare_results, format_comparison

    try:
        comp = compare_results(result, baseline, result["json_path"], baseline_path)
    except ValueError as err:
        raise ConfigError(f"--compare_to: {err}") from err
    return format_comparison(comp, result["json_path"], baseline_path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: parses flags, calls evaluate_workdir; returns the exit status."""
    try:
        fv, attack = _parse(sys.argv[1:] if argv is None else argv)
    except (ConfigError, flags.Error, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if fv.help:
        print(f"usage: {PROG} --workdir DIR [flags]\n{fv.get_help()}")
        return 0
    try:
        # a program's own command line on the CPU backend (GPU/TPU hosts keep their devices);
        # in-process callers keep theirs
        if argv is None and runs_on_cpu():
            use_cpu_devices(fv.cpu_devices)  # before anything touches a jax device
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file at INFO
    try:
        if not fv.workdir:
            raise ConfigError("--workdir is required: a training run's workdir")
        require_single_host(jax.process_count())
        baseline = read_comparison(fv.compare_to) if fv.compare_to else None  # before the work
        result = evaluate_workdir(
            fv.workdir, fv.attacks, fv.split, fv.num_examples, checkpoint=fv.checkpoint,
            batch_size=fv.batch_size, seed=fv.seed, eps=fv.eps, step_size=fv.step_size,
            overrides=overrides_from(attack.value), fast=fv.fast, resume=not fv.no_resume,
            inflation_threshold=fv.inflation_threshold, name=fv.name)
        if baseline is not None:
            print(paired_printout(result, baseline, fv.compare_to))
    except HamjaxError as err:  # config, checkpoint, data, disk full: the message says the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished chunks are saved; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0
