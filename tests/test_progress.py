"""What a person watching a run sees: the per-epoch progress bar (live on a terminal, one line per
log interval elsewhere), TensorBoard scalars read back from the event files, the closing lines
saying where the results are, and the evaluation driver's bars. No training here: pure pieces."""

from __future__ import annotations

import io

import numpy as np
from etils import epath

from hamjax.evaluation.driver import Driver
from hamjax.runlog import EpochBar, RunLogger, bar_metrics, live_console, read_scalars
from hamjax.sharding import make_mesh
from hamjax.train.report import epoch_scalars, report_scalars, where_text

# What a HAM step returns (host values): the watched metrics and its internal flags.
HAM_METRICS = {"loss": 1.25, "lr": 0.1, "train_robust_acc": 0.5, "hard_fraction": 0.25,
               "bucket_index": -1.0, "empty_batch": 0.0, "update_applied": 1.0, "warmup": 1.0,
               "finite": 1.0, "bucket_size": 4.0}
INTERNAL = ("bucket_index", "empty_batch", "update_applied", "warmup", "finite", "lr=")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_shows_loss_robust_accuracy_and_hard_fraction_only():
    assert bar_metrics(HAM_METRICS) == {"loss": 1.25, "robust_acc": 0.5, "hard_frac": 0.25}
    assert bar_metrics({"loss": 2.0, "finite": 1.0}) == {"loss": 2.0}  # e.g. standard training


def test_a_pipe_gets_one_line_per_log_interval_with_eta():
    """Steps alone print nothing; each log call prints one `epoch e/E [` line (what
    test_run_safety waits for) with images/s, an ETA and no internal flags."""
    stream = io.StringIO()
    assert not live_console(stream)
    bar = EpochBar(stream, epoch=0, epochs=3, start=0, steps=10, batch_size=16, live=False)
    for step in range(1, 11):
        bar.step()
        if step % 5 == 0:
            bar.log(step, images_per_s=160.0, metrics=HAM_METRICS)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("epoch 1/3 [##########..........] 5/10 160.0 img/s eta 00:00")
    assert lines[0].endswith("loss=1.25 robust_acc=0.5 hard_frac=0.25")
    assert not any(flag in stream.getvalue() for flag in INTERNAL)


def test_a_step_that_trained_nothing_shows_the_last_trained_loss():
    """HAM's gathering or empty steps record loss 0: the line keeps the last trained step's
    loss and accuracy (none yet: not shown) and updates only the hard fraction."""
    stream = io.StringIO()
    bar = EpochBar(stream, epoch=0, epochs=1, start=0, steps=4, batch_size=16, live=False)
    idle = dict(HAM_METRICS, loss=0.0, train_robust_acc=0.0, update_applied=0.0)
    bar.log(1, 100.0, dict(idle, hard_fraction=0.125))
    bar.log(2, 100.0, HAM_METRICS)
    bar.log(3, 100.0, dict(idle, hard_fraction=0.375))
    first, trained, after = stream.getvalue().splitlines()
    assert "loss=" not in first and "robust_acc" not in first and "hard_frac=0.125" in first
    assert "loss=1.25 robust_acc=0.5 hard_frac=0.25" in trained
    assert "loss=1.25 robust_acc=0.5 hard_frac=0.375" in after
    bar.close()


def test_a_terminal_gets_a_redrawn_bar_with_the_watched_values():
    stream = FakeTerminal()
    assert live_console(stream)
    bar = EpochBar(stream, epoch=1, epochs=3, start=2, steps=10, batch_size=16, live=True)
    for _ in range(8):
        bar.step()
    bar.log(10, images_per_s=320.0, metrics=HAM_METRICS)
    bar.close()
    out = stream.getvalue()
    assert "\r" in out and "epoch 2/3" in out and "10/10" in out
    assert "loss=1.25" in out and "robust_acc=0.5" in out and "hard_frac=0.25" in out
    assert "img/s=320.0" in out
    assert not any(flag in out for flag in INTERNAL)


def test_only_an_enabled_logger_draws_and_a_stopped_runs_bar_is_closed(tmp_path):
    quiet = FakeTerminal()
    off = RunLogger(str(tmp_path / "off"), enabled=False, stream=quiet)
    off.epoch_bar(0, 1, 0, 4, 16).step()
    off.close()
    assert quiet.getvalue() == ""  # processes other than 0 draw nothing
    stream = FakeTerminal()
    log = RunLogger(str(tmp_path / "on"), stream=stream)
    bar = log.epoch_bar(0, 1, 0, 4, 16)
    bar.step()  # a run stopped here: closing the logs ends the bar's line
    log.close()
    assert stream.getvalue().endswith("\n")


def test_scalars_reach_tensorboard_by_tag(tmp_path):
    log = RunLogger(str(tmp_path), stream=io.StringIO())
    log.write("train", 3, loss=0.5)
    log.scalars(7, {"val/robust_worst": 0.25, "cost/relative_to_pgd_at": 0.75, "skipped": None})
    log.close()
    scalars = read_scalars(log.tensorboard_logdir)
    assert scalars["val/robust_worst"] == [(7, 0.25)]
    assert scalars["cost/relative_to_pgd_at"] == [(7, 0.75)]
    assert scalars["train/loss"] == [(3, 0.5)]
    assert "skipped" not in scalars


def _summary(clean: float, robust: float) -> dict:
    return {"clean": {"average": clean, "worst": clean / 2},
            "robust": {"average": robust, "worst": robust / 2}}


def test_epoch_and_report_scalars_name_validation_test_cost_and_time():
    record = {"epoch": 1, "train_seconds": 2.0, "epoch_seconds": 3.0, "val": _summary(0.8, 0.4),
              "ledger": {"forward": 10.0, "backward": 5.0, "relative_to_pgd_at": 0.5}}
    assert epoch_scalars(record) == {
        "val/clean_average": 0.8, "val/clean_worst": 0.4, "val/robust_average": 0.4,
        "val/robust_worst": 0.2, "cost/relative_to_pgd_at": 0.5, "cost/forward_passes": 10.0,
        "cost/backward_passes": 5.0, "time/train_seconds": 2.0, "time/epoch_seconds": 3.0}
    del record["val"]  # an epoch without validation has no val/ scalars
    assert not any(tag.startswith("val/") for tag in epoch_scalars(record))
    tags = report_scalars({"last": _summary(0.9, 0.5), "best_on_val": _summary(0.8, 0.6)})
    assert tags["test/last/clean_average"] == 0.9 and tags["test/best_on_val/robust_worst"] == 0.3
    assert len(tags) == 8


def test_the_run_ends_saying_where_everything_is(tmp_path):
    root = epath.Path(tmp_path)
    text = where_text(root, (40, 2), str(root / "metrics.jsonl"), str(root / "tensorboard"))
    assert f"report:           {root / 'report.json'}" in text
    assert f"checkpoints:      {root / 'checkpoints'}" in text
    assert f"best checkpoint:  {root / 'best' / '40'} (epoch 2" in text
    assert f"metrics:          {root / 'metrics.jsonl'}" in text
    assert f"tensorboard --logdir={root / 'tensorboard'}" in text
    bare = where_text(root, None, None, None)  # no validation, process != 0 or no tensorboardX
    assert "best checkpoint" not in bare and "tensorboard" not in bare


def test_evaluation_bars_stay_off_a_pipe(capsys):
    """A stage's bar is drawn on a terminal only: under pytest stderr is no terminal, so a
    requested bar writes nothing (a CI log gets no redraws)."""
    def fn(params, batch, key):
        return {"correct": batch["label"] >= 0}

    driver = Driver(make_mesh(), batch_size=8)
    arrays = {"label": np.arange(20, dtype=np.int32)}
    record = driver.run(fn, None, arrays, np.arange(20), np.zeros(2, np.uint32), name="clean",
                        progress=True, desc="val clean")
    assert record.done.all()
    assert capsys.readouterr().err == ""
