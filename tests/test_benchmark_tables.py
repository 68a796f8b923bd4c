"""The Fashion-MNIST driver (benchmarks/fashion_mnist_*.py): wall and ledger ratios, the bucket
histogram and the other tables on hand-made epoch records, where results are written, and the
suites' configs read from configs/fashion_mnist.py."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import fashion_mnist_compare as fmc  # noqa: E402
import fashion_mnist_logs as logs  # noqa: E402
import fashion_mnist_results as results  # noqa: E402
import fashion_mnist_suites as suites  # noqa: E402
import fashion_mnist_tables as tables  # noqa: E402
import quiet_wall  # noqa: E402


def record(epoch: int, seconds: float, ledger: float, **metrics) -> dict:
    return {"kind": "epoch", "epoch": epoch, "train_seconds": seconds,
            "ledger": {"relative_to_pgd_at": ledger}, "train_metrics": metrics}


def test_epoch_rows_wall_ratios_and_histogram(tmp_path):
    ham = [record(1, 100.0, 1.0, warmup=1.0), record(2, 110.0, 1.0, warmup=1.0),
           record(3, 63.0, 0.52, warmup=0.0, hard_fraction=0.25,
                  **{"bucket_share/0.25": 0.4, "bucket_share/0.3125": 0.6,
                     "bucket_share/1": 0.0})]
    pgd = [record(1, 100.0, 1.0), record(2, 100.0, 1.0), record(3, 105.0, 1.0)]
    # A resumed run logs an epoch again: the last record of each epoch counts.
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ham[0], *ham]))
    assert [r["epoch"] for r in logs.epoch_records(str(tmp_path))] == [1, 2, 3]

    per_run = {"pgd_at": [logs.epoch_row(r) for r in pgd],
               "ham": [logs.epoch_row(r) for r in ham]}
    logs.with_wall_ratios(per_run)
    third = per_run["ham"][2]
    assert third["wall_ratio_vs_pgd_at"] == pytest.approx(63.0 / 105.0, abs=1e-3)
    assert third["wall_ratio_vs_own_warmup"] == pytest.approx(63.0 / 105.0, abs=1e-3)
    assert third["bucket_histogram"] == {"0.25": 0.4, "0.3125": 0.6}  # unused buckets left out
    assert "wall_ratio_vs_own_warmup" not in per_run["ham"][0]  # warm-up epochs are the base
    assert per_run["pgd_at"][1]["wall_ratio_vs_pgd_at"] == 1.0

    table = tables.epochs_markdown({0: per_run})
    assert "| 0 | ham | 3 | 63 |  | 0.52 | 0.250 | 0.25: 0.40, 0.3125: 0.60 |" in table
    assert "| 0 | ham | 1 | 100 |  | 1.00 |  | warm-up (PGD-AT) |" in table


def train_record(step: int, time: float, epoch: int, rate: float) -> dict:
    return {"kind": "train", "step": step, "time": time, "epoch": epoch, "images_per_s": rate}


def test_same_window_ratio_compares_only_intervals_both_runs_trained_through(tmp_path):
    """Batch 10, 4 steps per epoch, a log every 2 steps (20 images per interval)."""
    ham, ref = tmp_path / "ham", tmp_path / "ref"
    ham.mkdir()
    ref.mkdir()
    epoch_end = {"kind": "epoch", "epoch": 1, "step": 4, "train_seconds": 0.0,
                 "ledger": {"relative_to_pgd_at": 1.0}, "train_metrics": {}}
    # HAM: epoch 0 at 10 img/s (2 s per interval), a restart at step 6, then 20 img/s.
    (ham / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "run", "step": 0}, train_record(2, 2.0, 0, 10.0), train_record(4, 4.0, 0, 10.0),
        epoch_end, {"kind": "run", "step": 6}, train_record(8, 11.0, 1, 20.0)]))
    # The reference: 10 img/s until t = 6, then 5 img/s; nothing after t = 10.
    (ref / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "run", "step": 0}, train_record(2, 2.0, 0, 10.0), train_record(4, 4.0, 0, 10.0),
        epoch_end, train_record(6, 6.0, 1, 10.0), train_record(8, 10.0, 1, 5.0)]))
    windows = logs.train_windows(str(ham), batch=10)
    assert windows == [(0, 0.0, 2.0, 10.0), (0, 2.0, 4.0, 10.0), (1, 10.0, 11.0, 20.0)]
    ref_windows = logs.train_windows(str(ref), batch=10)
    assert ref_windows[-1] == (1, 6.0, 10.0, 5.0)
    # Epoch 1 (0-based 0) ran beside the reference at the same rate; HAM's last interval
    # (t 10-11) has no reference beside it, so epoch 2 gets no ratio.
    assert logs.same_window_ratios(windows, ref_windows) == {1: 1.0}
    half = [(0, 6.0, 10.0, 10.0)]  # twice the reference's rate in its t 6-10 interval
    assert logs.same_window_ratios(half, ref_windows) == {1: 0.5}


def test_results_go_to_docs_results_and_never_into_the_readme(tmp_path):
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- fashion_mnist_x -->\nold\n<!-- /fashion_mnist_x -->\n")
    before = readme.read_text()
    json_path, md_path = results.write_results("x", {"rows": [1]}, "| new |", repo=str(tmp_path))
    assert md_path == str(tmp_path / "docs" / "results" / "fashion_mnist_x.md")
    assert (tmp_path / "docs" / "results" / "fashion_mnist_x.md").read_text() == "| new |\n"
    assert results.read_previous("x", repo=str(tmp_path)) == {"rows": [1]}
    assert results.read_previous("y", repo=str(tmp_path)) is None
    assert readme.read_text() == before


def test_shipped_suite_trains_the_setup_as_configured(tmp_path):
    """ham_full reads configs/fashion_mnist.py: the shipped files' configs, but for the seed
    and the save interval."""
    from hamjax.config import load_config

    for name, shipped in (("pgd_at", "fashion_mnist_pgdat"), ("ham", "fashion_mnist_ham")):
        config = suites.build_config("ham_full", suites.suite_runs("ham_full")[name], 0, 0,
                                     seed=2)
        expected = load_config(os.path.join(suites.REPO, "configs", f"{shipped}.py"))
        expected.seed, expected.train.checkpoint_every_steps = 2, 150
        assert config.to_dict() == expected.to_dict()
    assert suites.is_shipped("ham_full") and not suites.is_shipped("noisy")


def test_autoattack_table_has_both_checkpoints_and_the_seed_spread():
    def aa(avg, worst, epoch):
        return {"examples": 500, "clean_avg": 0.8, "clean_worst": 0.5, "robust_avg": avg,
                "robust_worst": worst, "epoch": epoch, "seconds": 1.0}

    rows = [{"run": "ham", "seed": s, "autoattack": {"last": aa(0.5 + s / 100, 0.1 * s, 8),
                                                     "best": aa(0.4, 0.2, 3)}} for s in (0, 1)]
    table = tables.autoattack_markdown(rows)
    assert "| ham | 0 | last (8) | 500 | 80.0 | 50.0 | 50.0 | 0.0 |" in table
    assert "| ham | 1 | best (3) | 500 | 80.0 | 50.0 | 40.0 | 20.0 |" in table
    # last: robust avg 50.0 / 51.0 (spread 1.0), worst 0.0 / 10.0 (spread 10.0)
    assert "| ham | mean of 2 (spread 0.0 / 0.0 / 1.0 / 10.0) | last | 500 | 80.0 | 50.0 | 50.5 " \
           "| 5.0 |" in table


def test_the_autoattack_table_gives_the_worst_class_its_sampling_interval():
    """30 of 100 shirts robust: Wilson's 95% interval 21.9-39.6% (scipy's binomtest), from the
    evaluation JSON's counts of the combined attack; none from a JSON without counts."""
    import fashion_mnist_followups as followups

    result = {"combined": {"robust": {"worst_class": 1, "worst": 0.3}},
              "counts": {"combined": {"correct": [90, 30, 60], "total": [100, 100, 100]}}}
    interval = followups.worst_interval(result)["robust_worst_ci95"]
    assert interval == pytest.approx([0.2189, 0.3958], abs=1e-4)
    assert followups.worst_interval({"combined": result["combined"]}) == {}
    a = {"examples": 300, "clean_avg": 0.8, "clean_worst": 0.5, "robust_avg": 0.6,
         "robust_worst": 0.3, "epoch": 12, "seconds": 1.0, "robust_worst_ci95": interval}
    table = tables.autoattack_markdown([{"run": "pgd_at", "seed": 0, "autoattack": {"last": a}}])
    assert "| pgd_at | 0 | last (12) | 300 | 80.0 | 50.0 | 60.0 | 30.0 | 22-40 |" in table


def test_noisy_full_builds_valid_fine_tunes_of_one_warm_start(tmp_path):
    from hamjax.config import validate_config

    runs = suites.suite_runs("noisy_full")
    assert runs["warm_start"].get("first") and not runs["caat"].get("first")
    configs = {name: suites.build_config("noisy_full", run, 0, 0, seed=1, root=str(tmp_path))
               for name, run in runs.items()}
    warm = suites.workdir_of(str(tmp_path), "noisy_full", "warm_start", 1)
    for name, config in configs.items():
        validate_config(config)
        assert config.data.label_noise.rate == 0.2 and config.seed == 1
        assert (config.data.val_size, config.data.meta_per_class) == (2000, 100)  # equal pools
        assert config.train.init_from == ("" if name == "warm_start" else warm)
    assert configs["warm_start"].method.name == "pgd_at"
    assert configs["caat_floor0.5"].method.adv_weight_floor == 0.5
    assert configs["caat"].method.adv_weight_floor == 0.0
    assert configs["trades"].method.name == "trades"


def test_routing_and_per_class_tables():
    epoch = logs.epoch_row({"epoch": 2, "train_seconds": 1.0, "ledger": {"relative_to_pgd_at": 2.0},
                           "train_metrics": {}, "method": {"adv_fraction": 0.55,
                                                            "per_class_adv_fraction": [0.9, None]}})
    table = tables.routing_markdown({0: {"caat": [epoch], "pgd_at": [{"epoch": 2}]}})
    assert "| 0 | caat | 2 | 0.55 | 0.90 |  |" in table
    rows = [{"run": "caat", "seed": 0, "last": {"clean_per_class": [0.9, 0.5],
                                                "robust_per_class": [0.7, 0.0]}}]
    assert "| caat | 0 | 90 / 70 | 50 / 0 |" in tables.per_class_markdown(rows)


def test_routing_diagnosis_table():
    d = {"temperature": 0.001, "adv_weight_floor": 0.0, "meta_updates": 36,
         "meta_weight_drift": 0.00312, "agreement_with_initial_router": 0.991,
         "class_majority_agreement": 0.874, "agreement_without_class_features": 0.61,
         "adv_fraction": 0.52, "anti_share_mislabelled": 0.5, "anti_share_correctly_labelled": 0.47}
    rows = [{"run": "caat", "seed": 0, "routing_diagnosis": d}, {"run": "pgd_at", "seed": 0}]
    table = tables.diagnosis_markdown(rows)
    assert ("| caat | 0 | 0.001 | 0 | 36 | 0.0031 | 0.991 | 0.874 | 0.610 | 0.520 "
            "| 0.500 / 0.470 |") in table
    assert "pgd_at" not in table
    assert tables.diagnosis_markdown(rows[1:]) == ""
    d["initialisation_lottery"] = [{"seed": 4, "adv_fraction": 0.45, "class_majority_agreement":
                                    0.9, "per_class_adv_fraction": [0.05, 1.0, None, 0.1]}]
    assert "| 4 | 0.450 | 0.900 | 0, 3 |" in tables.diagnosis_markdown(rows)


def test_carry_over_keeps_earlier_runs_and_lets_local_workdirs_win():
    earlier = {"rows": [{"run": "pgd_at", "seed": 0, "last": {"clean_avg": 0.7}},
                        {"run": "trades", "seed": 0, "last": {"clean_avg": 0.1}},
                        {"run": "caat", "seed": 0, "last": {"clean_avg": 0.8}},
                        {"run": "pgd_at", "seed": 1, "last": {"clean_avg": 0.6}}],
               "per_epoch": {"0": {"pgd_at": [{"epoch": 1, "train_seconds": 5.0}],
                                   "trades": [{"epoch": 1, "train_seconds": 9.0}]}}}
    # Trained here: trades again with other numbers, caat again with the same ones.
    rows = [{"run": "trades", "seed": 0, "last": {"clean_avg": 0.5}},
            {"run": "caat", "seed": 0, "last": {"clean_avg": 0.8}}]
    per_seed = {0: {"pgd_at": [], "trades": [{"epoch": 1, "train_seconds": 7.0}], "caat": []}}
    carried = results.carry_over(earlier, rows, per_seed, seeds=[0])
    assert carried == ["pgd_at/0", "trades (earlier)/0"]  # seed 1 was not asked for
    assert [(r["run"], r["last"]["clean_avg"]) for r in rows] == [
        ("trades", 0.5), ("caat", 0.8), ("pgd_at", 0.7), ("trades (earlier)", 0.1)]
    assert per_seed[0]["pgd_at"] == [{"epoch": 1, "train_seconds": 5.0}]
    assert per_seed[0]["trades"] == [{"epoch": 1, "train_seconds": 7.0}]
    assert per_seed[0]["trades (earlier)"] == [{"epoch": 1, "train_seconds": 9.0}]
    # Written out and read back: the same rows, nothing carried twice.
    again = results.carry_over({"rows": [dict(r) for r in rows]}, rows, per_seed, seeds=[0])
    assert again == [] and len(rows) == 4
    assert results.carry_over(None, rows, per_seed, seeds=[0]) == []
    order = results.suite_order(["warm_start", "pgd_at", "trades", "caat"])
    assert [r["run"] for r in sorted(rows, key=lambda r: order(r["run"]))] == [
        "pgd_at", "trades", "trades (earlier)", "caat"]


def test_run_devices_are_read_from_the_run_record(tmp_path):
    """Tables of workdirs trained elsewhere (--trained_elsewhere) name the devices the runs
    logged, not this machine's."""
    assert logs.run_devices(str(tmp_path)) == []  # no metrics.jsonl yet
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"kind": "run", "step": 0, "devices": ["cuda:0"]},
        {"kind": "epoch", "epoch": 1, "step": 4}]))
    assert logs.run_devices(str(tmp_path)) == ["cuda:0"]


def test_trained_elsewhere_needs_report_only(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fashion_mnist_compare.py", "--suite=ham_full",
                                      "--trained_elsewhere=an H200"])
    with pytest.raises(SystemExit, match="needs --report_only"):
        fmc.main()


@pytest.mark.parametrize("argv, expected", [
    (["--suite=noisy_full", "--seeds", "0", "--autoattack_checkpoints", "last",
      "--runs", "frl_rwrm", "caat_floor0.5"],
     "python benchmarks/fashion_mnist_compare.py --suite=noisy_full --autoattack_checkpoints last"
     " --runs frl_rwrm caat_floor0.5 --seeds 0"),
    (["--suite=ham_full", "--seeds", "0", "1", "2", "--autoattack_examples=250", "--report_only",
      "--tag=h200", "--trained_elsewhere=an H200", "--root=/data/runs"],
     "python benchmarks/fashion_mnist_compare.py --suite=ham_full --autoattack_examples=250"
     " --tag=h200 --seeds 0 1 2 --report_only --root=<the workdirs>"),
    (["--suite=ham", "--seeds", "3"],
     "python benchmarks/fashion_mnist_compare.py --suite=ham --epochs=4 --train_size=10000"
     " --seeds 3"),
])
def test_recorded_command_reproduces_the_invocation(argv, expected):
    args = fmc.make_parser().parse_args(argv)
    command = fmc.reproducing_command(args, suites.is_shipped(args.suite))
    assert command == expected
    # Parsing the recorded command gives back every option that shapes the runs and tables.
    replayed = fmc.make_parser().parse_args(
        command.replace(" --root=<the workdirs>", "").split()[2:])
    for key in ("suite", "seeds", "runs", "autoattack_examples", "autoattack_checkpoints",
                "epochs", "train_size", "tag", "parallel", "cpu_devices"):
        assert getattr(replayed, key) == getattr(args, key), key


def test_evidence_suite_branches_ham_from_pgd_at_of_the_same_seed(tmp_path):
    """HAM (faithful and train_at_m) branch from PGD-AT at the end of epoch 6, the recipe's
    warm-up; every run is the shipped setup's config otherwise."""
    from hamjax.config import load_config, validate_config

    runs = suites.suite_runs("evidence")
    configs = {name: suites.build_config("evidence", run, 0, 0, seed=2, root=str(tmp_path))
               for name, run in runs.items()}
    source = suites.workdir_of(str(tmp_path), "evidence", "pgd_at", 2)
    for name, config in configs.items():
        validate_config(config)
        assert config.seed == 2 and config.eval.select_attack == "apgd"
        assert config.train.branch_from == (source if name.startswith("ham") else "")
    for name in ("ham", "ham_train_at_m", "ham_cross_batch"):
        method = configs[name].method
        assert (method.warmup_epochs, method.mining_step, configs[name].train.branch_epoch) == (
            6, 3, 6)
    assert configs["ham"].method.easy_examples == "drop"
    assert configs["ham_train_at_m"].method.easy_examples == "train_at_m"
    assert configs["ham_cross_batch"].method.cross_batch_rows == 128
    shipped = load_config(os.path.join(suites.REPO, "configs", "fashion_mnist.py:method=pgd_at"))
    shipped.seed, shipped.train.checkpoint_every_steps = 2, 150
    shipped.train.keep_checkpoints = 40
    assert configs["pgd_at"].to_dict() == shipped.to_dict()


def _attacked(run, seed, avg, worst, seconds, cost=1.0):
    return {"run": run, "seed": seed, "train_seconds": seconds, "cost_vs_pgd_at": cost,
            "autoattack": {"last": {
        "examples": 1000, "clean_avg": 0.8, "clean_worst": 0.5, "robust_avg": avg,
        "robust_worst": worst, "epoch": 12, "seconds": 1.0}}}


def test_verdicts_judge_the_worst_class_gain_against_the_seed_spread():
    rows = [_attacked("pgd_at", 0, 0.70, 0.30, 100), _attacked("pgd_at", 1, 0.71, 0.34, 100),
            _attacked("ham", 0, 0.62, 0.32, 60, 0.5), _attacked("ham", 1, 0.60, 0.36, 60, 0.7),
            _attacked("mart", 0, 0.69, 0.45, 120), _attacked("mart", 1, 0.70, 0.47, 120),
            _attacked("cfa", 0, 0.70, 0.40, 150)]
    lines = {line.split("**")[1]: line for line in tables.verdicts(rows)}
    assert set(lines) == {"ham", "mart", "cfa"}
    # ham: worst 34.0 vs 32.0 -> +2.0, spread max(4.0, 4.0): within; avg 61.0 vs 70.5 -> -9.5
    assert ("worst class +2.0 points against pgd_at, within the seed spread of 4.0 (2 seeds "
            "against 2); AutoAttack average -9.5 points; training passes 0.60x and logged wall "
            "time 0.60x pgd_at's") in lines["ham"]
    assert "+14.0 points against pgd_at, beyond the seed spread of 4.0" in lines["mart"]
    assert "1 seed against 2: no seed spread to judge it by yet" in lines["cfa"]
    assert tables.verdicts([_attacked("ham", 0, 0.6, 0.3, 1)]) == []  # no baseline, no verdict
    assert "(last checkpoint)" in lines["ham"]


def test_verdicts_give_each_seeds_paired_intervals_when_recorded():
    rows = [_attacked("pgd_at", 0, 0.70, 0.30, 100), _attacked("faal", 0, 0.68, 0.44, 100),
            _attacked("faal", 1, 0.69, 0.46, 100), _attacked("pgd_at", 1, 0.71, 0.31, 100)]
    rows[1]["autoattack"]["last"]["paired_vs_pgd_at"] = {
        "images": 1000, "worst": {"gap": 14.0, "interval": [3.0, 25.0]},
        "average": {"gap": -2.0, "interval": [-3.9, -0.1]}}
    (line,) = tables.verdicts(rows)
    assert line.endswith("Image by image against pgd_at of the same seed (1000 test images; "
                         "95% paired intervals, test sampling only): seed 0: worst +14.0 "
                         "[+3.0, +25.0], average -2.0 [-3.9, -0.1].")
    rows[1]["autoattack"]["last"].pop("paired_vs_pgd_at")
    assert "Image by image" not in tables.verdicts(rows)[0]


def test_paired_with_reads_both_runs_evaluations_of_the_same_images(tmp_path):
    """Two workdirs' eval/test_last.json, 2 classes of 50 images: the run keeps 10 more
    images of class 1 than the baseline -> worst +20 points, average +10."""
    import fashion_mnist_followups as followups

    from hamjax.evaluation.resume import bits

    labels = [0] * 50 + [1] * 50

    def write(name, kept_of_class_1):
        robust = [True] * 50 + [i < kept_of_class_1 for i in range(50)]
        result = {"split": "test", "num_examples": 100, "sampling": "s", "seed": 0,
                  "eps": 0.1, "norm": "linf", "class_names": ["a", "b"],
                  "combined": {"attacks": ["autoattack"]},
                  "per_example": {"labels": labels, "robust": bits(robust),
                                  "clean_correct": bits(robust)}}
        (tmp_path / name / "eval").mkdir(parents=True)
        (tmp_path / name / "eval" / "test_last.json").write_text(json.dumps(result))
        return str(tmp_path / name)

    run, baseline = write("run", 20), write("base", 10)
    paired = followups.paired_with(run, baseline, "last")
    assert paired["images"] == 100
    assert paired["worst"]["gap"] == 20.0 and paired["average"]["gap"] == 10.0
    assert paired["worst"]["interval"][0] < 20.0 < paired["worst"]["interval"][1]
    assert followups.paired_with(run, str(tmp_path / "missing"), "last") is None

    # The baseline's workdir gone (an earlier machine's): its sample, as the suite's JSON keeps
    # it, gives the same pairing; a sample of other images is refused.
    kept = followups.sample_record(json.loads((tmp_path / "base/eval/test_last.json")
                                              .read_text()))
    assert json.loads(json.dumps(kept)) == kept and isinstance(kept["labels"], str)
    gone = str(tmp_path / "gone")
    assert followups.paired_with(run, gone, "last", kept) == paired
    previous = {"rows": [{"run": "pgd_at", "seed": 0, "autoattack": {"last": {"sample": kept}}},
                         {"run": "pgd_at", "seed": 1, "autoattack": {"last": {}}}]}
    assert results.kept_sample(previous, "pgd_at", 0, "last") == kept
    assert results.kept_sample(previous, "pgd_at", 1, "last") is None
    assert results.kept_sample(None, "pgd_at", 0, "best") is None
    with pytest.raises(ValueError, match="not evaluated on the same images"):
        followups.paired_with(run, gone, "last", dict(kept, eps=0.2))


def test_verdicts_of_selected_checkpoints_compare_them_with_the_baselines_selected_one():
    def selected(row, avg, worst):
        row["autoattack"]["best"] = dict(row["autoattack"]["last"], robust_avg=avg,
                                         robust_worst=worst)
        return row

    rows = [selected(_attacked("pgd_at", 0, 0.70, 0.30, 100), 0.72, 0.31),
            selected(_attacked("ham", 0, 0.62, 0.20, 60), 0.65, 0.29),
            _attacked("mart", 0, 0.69, 0.45, 120)]  # selected checkpoint not attacked yet
    (line,) = tables.verdicts(rows, "best")
    assert line.startswith("- **ham** (checkpoint selected on validation): AutoAttack worst "
                           "class -2.0 points against pgd_at")
    assert "AutoAttack average -7.0 points" in line


def test_frontier_plot_has_a_point_per_attacked_run(tmp_path):
    path = str(tmp_path / "frontier.png")
    rows = [_attacked("pgd_at", 0, 0.70, 0.30, 600), _attacked("ham", 0, 0.62, 0.32, 360),
            {"run": "trades", "seed": 0, "train_seconds": 900}]  # not attacked yet: no point
    rows[0]["autoattack"]["last"]["robust_worst_ci95"] = [0.22, 0.40]  # drawn as a bar
    assert results.frontier_plot(rows, path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not results.frontier_plot(rows[2:], str(tmp_path / "none.png"))
    assert not os.path.exists(tmp_path / "none.png")
    text = results.results_text("evidence", rows[:2], {}, "cmd", 2, 4, "here", [],
                                plot="fashion_mnist_evidence_frontier.png")
    assert "![AutoAttack worst class against training wall time](fashion_mnist_evidence_" \
           "frontier.png)" in text
    assert "**ham** (last checkpoint)" in text


def test_fairness_suite_runs_every_method_with_its_recipe(tmp_path):
    from hamjax.config import validate_config

    runs = suites.suite_runs("fairness")
    configs = {name: suites.build_config("fairness", run, 0, 0, seed=1, root=str(tmp_path))
               for name, run in runs.items()}
    for config in configs.values():
        validate_config(config)
    assert {c.method.name for c in configs.values()} == {"mart", "pgd_at", "cfa", "wat", "dafa",
                                                         "faal"}
    assert configs["pgd_at_awp"].method.awp_gamma == 0.005
    assert configs["pgd_at_ema"].train.ema_decay == 0.995
    assert (configs["cfa"].method.begin, configs["cfa"].train.fawa_decay) == (1, 0.88)
    assert configs["dafa"].method.warmup_epochs == 8 < configs["dafa"].train.epochs
    faal = configs["faal"]
    assert faal.train.init_from == suites.workdir_of(str(tmp_path), "evidence", "pgd_at", 1)
    assert (faal.train.epochs, faal.train.lr) == (2, 0.01)
    assert faal.train.init_epoch == 0  # the selected checkpoint
    early = configs["faal_from_pgd_at_epoch6"]
    assert (early.train.init_from, early.train.init_epoch) == (faal.train.init_from, 6)
    # The baseline is the evidence suite's PGD-AT of the same seed, on the same setup.
    root = str(tmp_path)
    assert suites.workdir_of(root, "fairness", "pgd_at", 1) == suites.workdir_of(
        root, "evidence", "pgd_at", 1)
    assert suites.workdir_of(root, "fairness", "cfa", 1).startswith(os.path.join(root, "fairness"))
    evidence = suites.build_config("evidence", suites.suite_runs("evidence")["pgd_at"], 0, 0,
                                   seed=1, root=root)
    assert configs["pgd_at"].to_dict() == evidence.to_dict()


def test_a_fine_tune_that_counts_its_start_carries_its_cost_and_wall_time():
    """FAAL fine-tunes a 12-epoch PGD-AT run for 2 epochs at 1.14x PGD-AT's passes: its true
    cost is both runs against the 12-epoch PGD-AT, (12 + 2 x 1.14) / 12, and its wall time both
    runs' seconds; the table names the start."""
    epoch_passes = 100.0  # PGD-AT forward + backward passes an epoch
    start = {"cost": {"forward_passes": 6 * epoch_passes, "backward_passes": 6 * epoch_passes,
                      "relative_to_pgd_at": 1.0, "train_seconds_excluding_compile": 3600.0}}
    own = {"cost": {"forward_passes": 1.14 * epoch_passes, "backward_passes": 1.14 * epoch_passes,
                    "relative_to_pgd_at": 1.14, "train_seconds_excluding_compile": 700.0}}
    r = {"run": "faal", "seed": 0, "cost_vs_pgd_at": 1.14, "train_seconds": 700.0,
         "last": {"clean_avg": 0.8, "clean_worst": 0.5, "robust_avg": 0.7, "robust_worst": 0.4}}
    counted = logs.with_start_cost(r, own, start, "evidence/pgd_at")
    assert counted["cost_vs_pgd_at"] == pytest.approx((12 + 2 * 1.14) / 12)
    assert counted["train_seconds"] == 4300.0 and counted["train_seconds_own"] == 700.0
    assert counted["cost_vs_pgd_at_own"] == 1.14 and r["train_seconds"] == 700.0
    assert "| faal + evidence/pgd_at seed 0 (last) |" in tables.markdown([counted])
    fairness = suites.suite_runs("fairness")
    assert fairness["faal"]["cost_includes_start"]
    assert fairness["faal_from_ham_train_at_m"]["init_from"] == ("evidence", "ham_train_at_m")


def test_a_fine_tune_from_part_of_a_run_counts_only_the_epochs_it_started_from():
    """A 2-epoch fine-tune at 1.14x PGD-AT's passes an epoch (FAAL's TRADES base; the AT base
    is 1.00) from the end of epoch 6 of a 12-epoch PGD-AT run: the start counts 6 epochs'
    passes and seconds, and the total reads against the whole 12-epoch PGD-AT run,
    (6 + 2 x 1.14) / 12."""
    epoch = {"ledger": {"forward": 50.0, "backward": 50.0, "relative_to_pgd_at": 1.0},
             "train_seconds": 100.0}
    start = {"epochs": [dict(epoch, train_seconds=100.0 + i) for i in range(12)],
             "cost": {"forward_passes": 600.0, "backward_passes": 600.0,
                      "relative_to_pgd_at": 1.0, "train_seconds_excluding_compile": 1266.0}}
    cut = logs.report_until_epoch(start, 6)
    assert len(cut["epochs"]) == 6 and len(start["epochs"]) == 12
    assert cut["cost"]["forward_passes"] == cut["cost"]["backward_passes"] == 300.0
    assert cut["cost"]["relative_to_pgd_at"] == 0.5
    assert cut["cost"]["train_seconds_excluding_compile"] == 600.0 + 15.0
    own = {"cost": {"forward_passes": 114.0, "backward_passes": 114.0,
                    "relative_to_pgd_at": 1.14, "train_seconds_excluding_compile": 700.0}}
    r = {"run": "faal_from_pgd_at_epoch6", "seed": 0, "cost_vs_pgd_at": 1.14,
         "train_seconds": 700.0}
    counted = logs.with_start_cost(r, own, cut, "evidence/pgd_at (epochs 1-6)")
    assert counted["cost_vs_pgd_at"] == pytest.approx((6 + 2 * 1.14) / 12)
    assert counted["train_seconds"] == 700.0 + 615.0
    # A HAM start (a cheaper epoch) keeps the whole run's PGD-AT equivalent as the baseline.
    cheap = dict(epoch, ledger={"forward": 25.0, "backward": 25.0, "relative_to_pgd_at": 0.5})
    ham = {"epochs": [epoch] * 6 + [cheap] * 6,
           "cost": {"forward_passes": 450.0, "backward_passes": 450.0,
                    "relative_to_pgd_at": 0.75, "train_seconds_excluding_compile": 1200.0}}
    assert logs.report_until_epoch(ham, 8)["cost"]["relative_to_pgd_at"] == pytest.approx(
        (6 + 2 * 0.5) / 12)
    with pytest.raises(ValueError, match="12 epochs, not 13"):
        logs.report_until_epoch(start, 13)
    spec = suites.suite_runs("fairness")["faal_from_pgd_at_epoch6"]
    assert (spec["init_from"], spec["init_epoch"], spec["cost_includes_start"]) == (
        ("evidence", "pgd_at"), 6, True)


# A timing as benchmarks/suite_step_times.py writes it: a HAM run branched from PGD-AT (its
# first two epochs are PGD-AT's steps), then per bucket and an empty batch; steps per epoch 10.
HAM_TIMING = {"steps_per_epoch": 10, "phases": [
    {"from_epoch": 1, "seconds": 1.0, "branched_from": "evidence/pgd_at"},
    {"from_epoch": 3, "buckets": {"0.25": 0.4, "0.5": 0.6, "1": 1.1}, "empty": 0.2}]}


def test_quiet_wall_prices_each_epoch_at_its_phase_and_bucket_mix():
    epochs = [record(1, 900.0, 1.0, warmup=1.0), record(2, 50.0, 1.0, warmup=1.0),
              record(3, 700.0, 0.5, **{"bucket_share/0.25": 0.5, "bucket_share/0.5": 0.25,
                                       "bucket_share/1": 0.0}, empty_batch=0.25)]
    # 10 x 1.0 twice, then 10 x (0.5 x 0.4 + 0.25 x 0.6 + 0.25 x 0.2) = 4.0
    assert quiet_wall.quiet_seconds(epochs, HAM_TIMING) == pytest.approx(24.0)
    # train_at_m never reports an empty batch: steps with no hard row ran no bucket (still
    # priced, at the no-bucket step)
    epochs[2]["train_metrics"].pop("empty_batch")
    assert quiet_wall.quiet_seconds(epochs, HAM_TIMING) == pytest.approx(24.0)
    cross = {"steps_per_epoch": 10, "phases": [
        {"from_epoch": 1, "seconds": 1.0}, {"from_epoch": 2, "mine": 0.2, "flush_extra": 1.2}]}
    # epoch 2: 10 x (0.2 + 0.25 x 1.2) = 5.0
    assert quiet_wall.quiet_seconds([record(1, 0, 1), record(2, 0, 0.5, cross_batch_flush=0.25)],
                                    cross) == pytest.approx(15.0)
    # CAAT: 2 of an epoch's 10 steps also run the meta update, 3.0 s more each
    caat = {"steps_per_epoch": 10, "phases": [
        {"from_epoch": 1, "seconds": 1.0, "meta_extra": 3.0, "meta_steps_per_epoch": 2}]}
    assert quiet_wall.quiet_seconds([record(1, 0, 1), record(2, 0, 1)], caat) == 2 * (10 + 6)
    late = {"steps_per_epoch": 4, "phases": [{"from_epoch": 5, "seconds": 2.0},
                                             {"from_epoch": 1, "seconds": 1.0}]}
    assert quiet_wall.quiet_seconds([record(e, 0, 1) for e in (4, 5, 6)], late) == 4 + 8 + 8
    with pytest.raises(ValueError, match=r"buckets \['0.75'\] ran but were not timed"):
        quiet_wall.quiet_seconds([record(3, 0, 1, **{"bucket_share/0.75": 1.0})], HAM_TIMING)


def test_priced_rows_count_a_fine_tunes_start_and_verdicts_use_the_quiet_wall():
    pgd = {"steps_per_epoch": 10, "phases": [{"from_epoch": 1, "seconds": 1.0}]}
    faal = {"steps_per_epoch": 10, "phases": [{"from_epoch": 1, "seconds": 1.5}]}
    start = {"epochs": [record(e, 500.0, 1.0) for e in (1, 2, 3)]}
    own = {"epochs": [record(1, 300.0, 1.2)]}
    row = _attacked("faal", 0, 0.70, 0.45, 1800)
    assert quiet_wall.priced_row(row, own, faal, (start, pgd))["quiet_seconds"] == 30 + 15
    assert quiet_wall.priced_row(row, own, faal)["quiet_seconds"] == 15
    # A missing timing, of the run or of its start, leaves the row unpriced.
    assert "quiet_seconds" not in quiet_wall.priced_row(row, own, None)
    assert "quiet_seconds" not in quiet_wall.priced_row(row, own, faal, (start, None))

    base = dict(_attacked("pgd_at", 0, 0.72, 0.30, 1000), quiet_seconds=30.0)
    priced = quiet_wall.priced_row(row, own, faal, (start, pgd))
    (line,) = tables.verdicts([base, priced])
    assert "quiet-machine wall time 1.50x pgd_at's" in line  # 45 / 30, not 1800 / 1000
    (line,) = tables.verdicts([base, row])  # one side unpriced: the logged times, said so
    assert "logged wall time 1.80x pgd_at's" in line
    assert "| 1800 | 45 |" in tables.markdown([dict(priced, last=priced["autoattack"]["last"])])


def test_step_times_phases_follow_each_methods_late_starts(tmp_path):
    import suite_step_times as sst

    from hamjax.methods import get_method

    starts = {}
    for suite in ("evidence", "fairness"):
        for name, spec in suites.suite_runs(suite).items():
            config = suites.build_config(suite, spec, 0, 0, 0, root=str(tmp_path))
            starts[name] = sst.start_epochs(config, get_method(config.method.name))
    cfa = suites.build_config("fairness", suites.suite_runs("fairness")["cfa"], 0, 0)
    dafa = suites.build_config("fairness", suites.suite_runs("fairness")["dafa"], 0, 0)
    awp = suites.build_config("fairness", suites.suite_runs("fairness")["pgd_at_awp"], 0, 0)
    assert starts["cfa"] == [0, cfa.method.begin] and 0 < cfa.method.begin < 12
    assert starts["dafa"] == [0, dafa.method.warmup_epochs]
    awp_start = awp.method.awp_warmup_epochs
    assert starts["pgd_at_awp"] == ([0, awp_start] if awp_start > 0 else [0])
    for ham in ("ham", "ham_train_at_m", "ham_cross_batch"):
        assert starts[ham] == [0, 6]  # the PGD-AT epochs of the official recipe, then mining
    for plain in ("pgd_at", "trades", "mart", "pgd_at_ema", "wat"):
        assert starts[plain] == [0], plain


def test_the_wall_caption_names_the_rows_no_step_timing_prices():
    priced = dict(_attacked("pgd_at", 0, 0.7, 0.3, 100), quiet_seconds=40.0)
    unpriced = _attacked("mart", 0, 0.7, 0.4, 120)
    text = results.wall_caption([priced, unpriced], "cmd", {"cpu_busy_before": 0.02})
    assert "(`cmd`; the CPU was 2% busy in the second before;" in text
    assert "Not priced (no step timing): mart seed 0;" in text
    assert results.wall_caption([priced], "cmd", {}).endswith("use the quiet one.")
    assert results.wall_caption([priced], None, None) == results.WALL_UNPRICED
    assert results.wall_caption([unpriced], "cmd", None) == results.WALL_UNPRICED
    borrowed = dict(priced, run="faal_b", quiet_timed_as="fairness/faal")
    assert ("Priced at the timed step of another run with the same step config: faal_b at "
            "fairness/faal's.") in results.wall_caption([priced, borrowed], "cmd", {})
    # A run read from another suite is timed with that suite.
    assert suites.timing_key("fairness", "pgd_at") == "evidence/pgd_at"
    assert suites.timing_key("fairness", "mart") == "fairness/mart"


def test_a_run_without_its_own_timing_is_priced_only_by_a_step_of_the_same_config(tmp_path):
    """A run the step timing predates borrows the timing of a timed run whose step config is
    equal (a second FAAL fine-tune); a run whose config differs in any cost field gets none."""
    spec = suites.suite_runs("fairness")
    faal = suites.build_config("fairness", spec["faal"], 0, 0, 0, root=str(tmp_path))
    early = suites.build_config("fairness", spec["faal_from_pgd_at_epoch6"], 0, 0, 0,
                                root=str(tmp_path))
    from hamjax.config import config_to_json

    config = lambda c: json.loads(json.dumps(config_to_json(c)))  # as report.json holds it
    timing = {"steps_per_epoch": 429, "phases": [{"from_epoch": 1, "seconds": 0.4}],
              "cost_config": quiet_wall.cost_config(config(faal))}
    runs = {"fairness/faal": timing, "fairness/mart": {"cost_config": {}}}
    assert quiet_wall.timing_for(runs, "fairness/faal", None) == (timing, "fairness/faal")
    assert quiet_wall.timing_for(runs, "fairness/faal_from_pgd_at_epoch6",
                                 config(early)) == (timing, "fairness/faal")
    other = config(early)
    other["method"]["lam"] = other["method"].get("lam", 0.0) + 1.0  # another method field
    assert quiet_wall.timing_for(runs, "fairness/x", other) == (None, None)
    for field, value in (("epochs", 3), ("branch_from", "/elsewhere"), ("fawa_decay", 0.88)):
        other = config(early)
        other["train"][field] = value  # the phases, or what a step does, differ
        assert quiet_wall.timing_for(runs, "fairness/x", other) == (None, None), field
    assert quiet_wall.timing_for(runs, "fairness/x", None) == (None, None)


def test_step_times_price_only_runs_trained_as_they_were_timed():
    machine = {"device": "cpu:cpu", "devices_per_run": 1}
    assert quiet_wall.timed_like(["cpu:0"], machine)
    assert not quiet_wall.timed_like(["cuda:0"], machine)  # a GPU run, CPU step times
    assert not quiet_wall.timed_like(["cpu:0", "cpu:1"], machine)  # two host devices
    assert not quiet_wall.timed_like([], machine)  # no run record
    # A HAM phase or a cross-batch phase without its metrics is an error, not a free epoch.
    with pytest.raises(ValueError, match="no bucket_share"):
        quiet_wall.quiet_seconds([record(3, 0, 1)], HAM_TIMING)
    cross = {"steps_per_epoch": 1, "phases": [{"from_epoch": 1, "mine": 0.2, "flush_extra": 1}]}
    with pytest.raises(ValueError, match="no cross_batch_flush"):
        quiet_wall.quiet_seconds([record(1, 0, 1)], cross)


def test_step_times_price_only_runs_of_the_config_they_timed():
    config = {"model": {"name": "fmnist_cnn"}, "method": {"name": "pgd_at"},
              "attack": {"steps": 10}, "data": {"name": "fashion_mnist", "val_size": 5000},
              "train": {"batch_size": 128, "ema_decay": 0.0, "steps_per_dispatch": 1}}
    timing = {"steps_per_epoch": 10, "phases": [{"from_epoch": 1, "seconds": 1.0}],
              "cost_config": quiet_wall.cost_config(config)}
    row = _attacked("pgd_at", 0, 0.7, 0.3, 100)
    same = {"config": config, "epochs": [record(1, 0, 1)]}
    assert quiet_wall.priced_row(row, same, timing)["quiet_seconds"] == 10
    # A run from before a field existed (no steps_per_dispatch in its config) is still priced.
    older = dict(config, train={"batch_size": 128, "ema_decay": 0.0})
    assert "quiet_seconds" in quiet_wall.priced_row(row, dict(same, config=older), timing)
    # A run of another model (the small_cnn suites of earlier sessions) is not.
    other = dict(config, model={"name": "small_cnn"})
    assert "quiet_seconds" not in quiet_wall.priced_row(row, dict(same, config=other), timing)
