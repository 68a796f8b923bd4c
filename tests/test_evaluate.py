"""hamjax.evaluate on a tiny trained digits run: outputs, consistency with the trainer's own
evaluation, one definition of robust accuracy, independence of the batch size, resume, errors.

One run is trained per module (about 30 s on 2 CPU cores) and every test evaluates a few dozen
examples with short attacks; compilation dominates the time, so each test compiles few attacks.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from digits_configs import digits_config

from hamjax import evaluate as ev
from hamjax.errors import CheckpointError, ConfigError
from hamjax.evaluation import cli, driver, report
from hamjax.evaluation.specs import attack_key

EPS = 0.1
FAST = {"square": {"n_queries": 20}}


def _tiny_config():
    # eval: the trainer's PGD-20, compared with the CLI's
    return digits_config("standard", crop_pad=0, batch_size=32, epochs=1,
                         evaluation=(EPS, 0.05, 20), eval_examples=20, eval_batch_size=20)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    from hamjax.train import train_and_evaluate

    path = str(tmp_path_factory.mktemp("run"))
    train_and_evaluate(_tiny_config(), path)
    return path


@pytest.fixture(scope="module")
def first_eval(workdir):
    """PGD-3 and a reduced AutoAttack on 40 test examples; the progress lines it printed."""
    lines: list[str] = []
    result = ev.evaluate_workdir(workdir, "pgd3,autoattack", "test", 40, batch_size=16,
                                 fast=True, overrides=FAST, log=lines.append)
    return result, lines


def test_json_png_and_fields(workdir, first_eval):
    result, lines = first_eval
    path = os.path.join(workdir, "eval", "test_best.json")
    assert result["json_path"] == path
    with open(path) as f:
        saved = json.load(f)
    for key in ("checkpoint", "checkpoint_step", "seed", "num_examples", "eps", "attacks",
                "clean", "combined", "gradient_masking_warnings", "table", "config"):
        assert key in saved, key
    assert saved["checkpoint"] == "best" and saved["checkpoint_step"] > 0
    assert saved["num_examples"] == 40 and saved["eps"] == pytest.approx(EPS)
    assert saved["seed"] == _tiny_config().seed and saved["fast"] is True
    assert saved["config"]["model"]["name"] == "small_cnn"
    pgd = saved["attacks"]["pgd3"]["settings"]
    # the default step is the run's own (config.eval.step_size at this eps)
    assert pgd["steps"] == 3 and pgd["step_size"] == pytest.approx(0.05) and pgd["loss"] == "ce"
    aa = saved["attacks"]["autoattack"]["settings"]
    assert list(aa["components"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa["components"]["square"]["n_queries"] == 20
    assert aa["matches_reference_settings"] is False
    # reduced target counts are flagged among AutoAttack's warnings
    assert any("target classes" in w for w in saved["gradient_masking_warnings"])
    with open(result["chart_path"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"epoch {saved['checkpoint_epoch']}," in report.chart_title(saved)
    assert saved["checkpoint_epoch"] == 1
    assert any("img/s" in line and line.startswith("[pgd3]") for line in lines)
    assert any(line.startswith("[autoattack/apgd-ce]") for line in lines)


def test_per_class_numbers_consistent(first_eval):
    result, _ = first_eval
    clean = np.array(result["clean"]["per_class"])
    combined = np.array(result["combined"]["robust"]["per_class"])
    assert result["clean"]["average"] > 0.3  # the tiny run learned something
    for name in ("pgd3", "autoattack"):
        robust = np.array(result["attacks"][name]["robust"]["per_class"])
        assert np.all(robust <= clean + 1e-9)
        assert np.all(combined <= robust + 1e-9)
        assert result["combined"]["robust"]["average"] <= result["attacks"][name]["robust"][
            "average"] + 1e-9
    # The per-image record (for paired comparisons) sums to the per-class counts.
    from hamjax.evaluation.resume import unbits

    labels = np.asarray(result["per_example"]["labels"])
    for key, kind in (("clean_correct", "clean"), ("robust", "combined")):
        flags = unbits(result["per_example"][key])
        np.testing.assert_array_equal(np.bincount(labels[flags], minlength=10),
                                      result["counts"][kind]["correct"])
        np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                      result["counts"][kind]["total"])
        boundary = np.array(result["attacks"][name]["boundary_error"]["per_class"])
        np.testing.assert_allclose(boundary, clean - robust)
    # 40 examples, 4 per class (stratified): every per-class accuracy is a multiple of 1/4
    np.testing.assert_allclose(clean * 4, np.round(clean * 4))
    stages = result["attacks"]["autoattack"]["stages"]
    attacked = [s["attacked"] for s in stages.values()]
    assert attacked == sorted(attacked, reverse=True)  # later attacks see only the survivors


def test_rerun_skips_completed_work(workdir, first_eval, monkeypatch):
    result, _ = first_eval

    def no_compile(*args, **kwargs):
        raise AssertionError("a stage was compiled although every example was done")

    monkeypatch.setattr(driver.Driver, "_compile", no_compile)
    again = ev.evaluate_workdir(workdir, "pgd3,autoattack", "test", 40, batch_size=16,
                                fast=True, overrides=FAST, log=lambda s: None)
    assert again["progress"]["computed_chunks"] == 0
    attacked = sum(s["attacked"] for a in result["attacks"].values() for s in a["stages"].values())
    assert again["progress"]["resumed_examples"] == 40 + attacked  # clean pass + every attack
    for name in ("pgd3", "autoattack"):
        assert again["attacks"][name]["robust"] == result["attacks"][name]["robust"]
    with open(result["partial_path"]) as f:
        partial = json.load(f)
    # the per-stage counters of computed chunks did not move
    assert partial["stages"]["pgd3"]["computed_chunks"] == -(-partial["stages"]["pgd3"][
        "images"] // 16)


def test_interrupted_run_resumes_to_the_same_answer(workdir):
    class Stop(Exception):
        pass

    def stop_after_first_pgd_chunk(line: str) -> None:
        if line.startswith("[pgd2] chunk 1/"):
            raise Stop

    kwargs = dict(batch_size=16, seed=5)
    with pytest.raises(Stop):
        ev.evaluate_workdir(workdir, "pgd2", "val", 48, log=stop_after_first_pgd_chunk, **kwargs)
    resumed = ev.evaluate_workdir(workdir, "pgd2", "val", 48, log=lambda s: None, **kwargs)
    assert resumed["progress"]["resumed_examples"] >= 48 + 1  # the clean pass, one pgd chunk
    assert resumed["progress"]["computed_chunks"] >= 1
    fresh = ev.evaluate_workdir(workdir, "pgd2", "val", 48, resume=False, write=False,
                                log=lambda s: None, **kwargs)
    assert fresh["progress"]["resumed_examples"] == 0
    assert resumed["attacks"]["pgd2"]["robust"] == fresh["attacks"]["pgd2"]["robust"]


def test_cli_last_checkpoint(workdir, capsys):
    status = ev.main(["--workdir", workdir, "--attacks", "fgsm", "--checkpoint", "last",
                      "--num_examples", "20", "--override", "fgsm.step_size=0.05"])
    assert status == 0
    with open(os.path.join(workdir, "eval", "test_last.json")) as f:
        saved = json.load(f)
    assert saved["checkpoint"] == "last"
    assert saved["attacks"]["fgsm"]["settings"]["step_size"] == pytest.approx(0.05)
    assert "per-class accuracy" in capsys.readouterr().out


def test_compare_to_prints_the_paired_gaps_and_refuses_other_images(workdir, capsys):
    """--compare_to: this evaluation against another of the same images, image by image; a
    missing file is refused before any work, other images after this one is saved."""
    common = ["--workdir", workdir, "--attacks", "fgsm", "--num_examples", "20"]
    assert ev.main([*common, "--checkpoint", "last", "--name", "base"]) == 0
    base = os.path.join(workdir, "eval", "test_last_base.json")
    capsys.readouterr()
    assert ev.main([*common, "--checkpoint", "best", "--name", "vs", "--compare_to", base]) == 0
    out = capsys.readouterr().out
    mine = json.load(open(os.path.join(workdir, "eval", "test_best_vs.json")))
    theirs = json.load(open(base))
    gap = 100 * (mine["combined"]["robust"]["average"] - theirs["combined"]["robust"]["average"])
    paired = out[out.index("paired interval"):]  # after the evaluation's own table
    line = next(row for row in paired.splitlines() if row.startswith("average"))
    assert float(line.split()[3]) == pytest.approx(gap, abs=0.06)
    missing = os.path.join(workdir, "eval", "nothing.json")
    assert ev.main([*common, "--checkpoint", "best", "--name", "never", "--compare_to",
                    missing]) == 2
    assert "--compare_to=" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(workdir, "eval", "test_best_never.json"))
    assert ev.main(["--workdir", workdir, "--attacks", "fgsm", "--num_examples", "10",
                    "--checkpoint", "best", "--name", "other", "--compare_to", base]) == 2
    assert "num_examples: 10 against 20" in capsys.readouterr().err
    assert os.path.exists(os.path.join(workdir, "eval", "test_best_other.json"))


def test_named_evaluation_keeps_its_own_files(workdir, capsys):
    """--name: another evaluation of the same checkpoint beside test_last.json, not over it."""
    plain = os.path.join(workdir, "eval", "test_last.json")
    before = open(plain).read() if os.path.exists(plain) else None
    assert ev.main(["--workdir", workdir, "--attacks", "fgsm", "--checkpoint", "last",
                    "--num_examples", "10", "--name", "fgsm-10"]) == 0
    with open(os.path.join(workdir, "eval", "test_last_fgsm-10.json")) as f:
        assert json.load(f)["num_examples"] == 10
    assert (open(plain).read() if os.path.exists(plain) else None) == before
    assert ev.main(["--workdir", workdir, "--name", "../x"]) == 2
    assert "name='../x': letters, digits" in capsys.readouterr().err


def test_best_falls_back_to_last(workdir, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "best"))
    lines: list[str] = []
    run = ev.load_run(copy, "best", log=lines.append)
    assert run.checkpoint == "last" and run.step > 0
    assert any("evaluating the last checkpoint instead" in line for line in lines)


def test_unknown_attack_lists_valid_names(workdir):
    with pytest.raises(ConfigError, match="unknown attack.*'foo'.*valid names: pgdN"):
        ev.evaluate_workdir(workdir, "pgd20,foo")
    for bad in ("pgd", "pgd0", "cw-5"):
        with pytest.raises(ConfigError, match="autoattack"):
            ev.check_attack_names(bad)


def test_missing_checkpoint_says_where_it_looked(tmp_path, capsys):
    empty = tmp_path / "nothing"
    with pytest.raises(CheckpointError, match="no checkpoint found.*best.*checkpoints"):
        ev.evaluate_workdir(str(empty), "pgd20")
    assert not empty.exists()  # looking never creates the workdir
    assert ev.main(["--workdir", str(empty)]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_cli_refuses_to_run_on_several_processes(tmp_path, capsys, monkeypatch):
    """On N hosts every process would redo and rewrite the whole evaluation."""
    monkeypatch.setattr(cli.jax, "process_count", lambda: 2)
    assert ev.main(["--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m hamjax.evaluate runs on one host")
    assert "2 processes" in err and "single host" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_parse_attacks_settings():
    specs = ev.parse_attacks("PGD20, cw, fgsm, apgd-t", eps=8 / 255, num_classes=10,
                             step_size="eps/8")
    by_name = {s.name: s for s in specs}
    assert by_name["pgd20"].settings["step_size"] == pytest.approx(1 / 255)
    assert by_name["cw"].settings["loss"] == "cw" and by_name["cw"].settings["steps"] == 20
    assert by_name["fgsm"].settings["step_size"] == pytest.approx(8 / 255)
    assert by_name["apgd-t"].settings["n_target_classes"] == 9
    default = ev.parse_attacks("pgd10", eps=8 / 255, num_classes=10)[0]
    assert default.settings["step_size"] == pytest.approx(2 / 255)
    aa = ev.parse_attacks("autoattack", eps=8 / 255, num_classes=10)[0]
    assert aa.settings["matches_reference_settings"] is True
    assert [s.stage_id for s in aa.stages] == [
        "autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/fab-t", "autoattack/square"]
    with pytest.raises(ConfigError, match="not run"):
        ev.parse_attacks("pgd20", eps=0.1, num_classes=10, overrides={"square": {"n_queries": 1}})


@pytest.mark.slow
def test_autoattack_matches_host_driver(workdir):
    """Same per-example answer as hamjax.attacks.run_autoattack: the same chain and keys."""
    from hamjax.attacks import STANDARD_ATTACKS
    from hamjax.data import stratified_subset
    from hamjax.evaluation.autoattack import run_autoattack
    from hamjax.models import make_logits_fn

    run = ev.load_run(workdir, "best", log=lambda s: None)
    data = stratified_subset(run.splits.test, 32, 0, 10)
    specs = ev.parse_attacks("autoattack", eps=EPS, num_classes=10, fast=True, overrides=FAST)
    out = ev.run_attacks(run.model, run.variables, data.images, data.labels, 10, specs,
                         eps=EPS, seed=0, batch_size=16, log=lambda s: None)
    kwargs = {s.kind: s.kwargs for s in specs[0].stages}
    assert list(kwargs) == list(STANDARD_ATTACKS)
    _, ref = run_autoattack(make_logits_fn(run.model, run.variables),
                            data.images.astype(np.float32) / 255, data.labels,
                            attack_key(0, "autoattack"), eps=EPS, num_classes=10,
                            attack_kwargs=kwargs, batch_size=16, log_fn=None, progress=False)
    np.testing.assert_array_equal(out.clean_correct, ref.clean_correct)
    np.testing.assert_array_equal(out.robust["autoattack"], ref.robust)


def test_trainer_and_cli_give_the_same_pgd20_counts(workdir, capsys):
    """report.json's PGD-20 (the trainer's validation and its final test report) and
    `python -m hamjax.evaluate --attacks pgd20` on the same checkpoint: the same per-class
    counts, clean and robust, with nothing but the split and the sample passed."""
    with open(os.path.join(workdir, "report.json")) as f:
        trained = json.load(f)
    val = trained["epochs"][0]["val"]["counts"]  # the epoch whose state is the best checkpoint
    test = trained["results"]["best_on_val"]["counts"]
    for split, counts in (("val", val), ("test", test)):
        assert ev.main(["--workdir", workdir, "--attacks", "pgd20", "--split", split,
                        "--num_examples", "20", "--no_resume"]) == 0
        with open(os.path.join(workdir, "eval", f"{split}_best.json")) as f:
            cli_counts = json.load(f)["counts"]
        assert cli_counts["clean"] == counts["clean"], split
        assert cli_counts["pgd20"] == counts["robust"], split
        assert sum(counts["robust"]["correct"]) <= sum(counts["clean"]["correct"])
    capsys.readouterr()


def test_tensorboard_has_validation_cost_and_test_scalars(workdir):
    """The 1-epoch run's event file, read back: validation clean/robust average and worst class
    and the ledger at the epoch's step, test numbers of both checkpoints, as in report.json."""
    from hamjax.runlog import read_scalars

    with open(os.path.join(workdir, "report.json")) as f:
        trained = json.load(f)
    epoch, step = trained["epochs"][0], trained["results"]["last"]["step"]
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    for kind in ("clean", "robust"):
        for stat in ("average", "worst"):
            assert scalars[f"val/{kind}_{stat}"] == [
                (step, pytest.approx(epoch["val"][kind][stat]))]
            for name in ("last", "best_on_val"):
                assert scalars[f"test/{name}/{kind}_{stat}"] == [
                    (step, pytest.approx(trained["results"][name][kind][stat]))]
    assert scalars["cost/relative_to_pgd_at"] == [
        (step, pytest.approx(epoch["ledger"]["relative_to_pgd_at"]))]
    assert scalars["time/epoch_seconds"][0][1] >= scalars["time/train_seconds"][0][1] > 0
    assert "train/loss" in scalars


def test_pgd_results_do_not_depend_on_the_batch_size(workdir):
    """Each example's random start is keyed by its index: chunks of 8 or 40, same answer."""
    from hamjax.data import stratified_subset

    run = ev.load_run(workdir, "best", log=lambda s: None)
    data = stratified_subset(run.splits.test, 40, 0, 10)
    specs = ev.parse_attacks("pgd5", eps=EPS, num_classes=10)
    outs = [ev.run_attacks(run.model, run.variables, data.images, data.labels, 10, specs,
                           eps=EPS, seed=3, batch_size=b, log=lambda s: None) for b in (8, 40)]
    np.testing.assert_array_equal(outs[0].clean_correct, outs[1].clean_correct)
    np.testing.assert_array_equal(outs[0].robust["pgd5"], outs[1].robust["pgd5"])
    assert 0 < outs[0].robust["pgd5"].sum() < outs[0].clean_correct.sum()  # PGD did something


def test_cli_attack_settings_are_config_flags(capsys):
    """--attack.<kind>.<field>=V is parsed by ml_collections (as launch.py's --config.*);
    --override NAME.FIELD=V is the same flag; a typo is named with the valid settings."""
    from hamjax.evaluation.specs import overrides_from

    _, attack = cli._parse(["--workdir=w", "--attack.pgd.step_size=eps/8",
                            "--override", "apgd-t.steps=5", "--override=square.n_queries=7"])
    assert overrides_from(attack.value) == {"pgd": {"step_size": "eps/8"},
                                            "apgd-t": {"steps": 5}, "square": {"n_queries": 7}}
    assert ev.main(["--workdir=w", "--attack.square.n_querys=1"]) == 2
    err = capsys.readouterr().err
    assert "--attack.square.n_querys is not an attack setting" in err and "n_queries" in err
    assert ev.main(["--workdir=w", "--attack.square.n_queries=many"]) == 2
    assert "invalid literal" in capsys.readouterr().err
