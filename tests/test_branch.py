"""`train.branch_from`: a run that starts from another run's full state at the end of an epoch.

Checked against the runs it stands for: a branch with the same method is the source run, bit
for bit (the same state, data order and RNG from the branch point on); HAM branched from PGD-AT
at the end of its warm-up is the HAM run from scratch, bit for bit, and keeps the source's
records up to the branch.
"""

from __future__ import annotations

import json
import shutil
import sys

import jax
import numpy as np
import pytest
from digits_configs import digits_config

from hamjax.checkpoint import BEST, Checkpointer
from hamjax.config import validate_config
from hamjax.errors import CheckpointError, ConfigError
from hamjax.train.loop import Trainer

STEPS_PER_EPOCH = 10


def _config(method: str = "pgd_at", **method_fields):
    c = digits_config(method, train_size=16 * STEPS_PER_EPOCH, val_size=40, crop_pad=4,
                      batch_size=16, epochs=3, lr=0.02, lr_drop=(1, 0.005),
                      attack=(0.1, 0.03, 2), evaluation=(0.1, 0.03, 2), eval_examples=20,
                      log_every_steps=5, **method_fields)
    c.train.keep_checkpoints = 10  # the end of epoch 1 stays for the branches
    return c


def _branched(config, source, epoch: int = 1):
    config.train.branch_from = str(source)
    config.train.branch_epoch = epoch
    return config


def _params(workdir):
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.restore_host()["params"]
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished 3-epoch PGD-AT run and its report."""
    workdir = tmp_path_factory.mktemp("branch") / "pgd_at"
    report = Trainer(_config(), str(workdir)).run()
    return workdir, report


def test_a_branch_with_the_same_method_is_the_uninterrupted_run(source, tmp_path):
    workdir, report = source
    branch = tmp_path / "branch"
    branched = Trainer(_branched(_config(), workdir), str(branch)).run()

    jax.tree.map(np.testing.assert_array_equal, _params(branch), _params(workdir))
    assert branched["branched_from"] == {"workdir": str(workdir), "epoch": 1,
                                         "step": STEPS_PER_EPOCH, "method": "pgd_at"}
    assert [e["ledger"] for e in branched["epochs"]] == [e["ledger"] for e in report["epochs"]]
    assert [e["val"] for e in branched["epochs"]] == [e["val"] for e in report["epochs"]]
    assert branched["epochs"][0]["train_seconds"] == report["epochs"][0]["train_seconds"]
    assert branched["results"]["last"]["robust"] == report["results"]["last"]["robust"]
    assert branched["results"]["best_on_val"] == report["results"]["best_on_val"]
    assert "branched_from" not in report


def test_a_ham_branch_keeps_the_warmup_and_then_mines(source, tmp_path):
    workdir, report = source
    branch = tmp_path / "ham"
    config = _branched(_config("ham", warmup_epochs=1, mining_step=1), workdir)
    ham = Trainer(config, str(branch)).run()

    assert ham["branched_from"]["method"] == "pgd_at"
    # HAM's warm-up is PGD-AT's step: the branch is the HAM run from scratch, bit for bit.
    scratch = tmp_path / "ham_from_scratch"
    Trainer(_config("ham", warmup_epochs=1, mining_step=1), str(scratch)).run()
    jax.tree.map(np.testing.assert_array_equal, _params(branch), _params(scratch))
    assert ham["epochs"][0] == report["epochs"][0]  # PGD-AT's first epoch, as recorded there
    assert [e["epoch"] for e in ham["epochs"]] == [1, 2, 3]
    # HAM's step from the branch on: its own metrics and per-class records, not PGD-AT's.
    assert all("hard_fraction" in e["train_metrics"] for e in ham["epochs"][1:])
    assert all("method" in e for e in ham["epochs"][1:])
    assert ham["config"]["method"]["name"] == "ham"
    log = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "branch"] == [STEPS_PER_EPOCH]

    # The branch's workdir resumes by itself once branched: the source may go.
    moved = workdir.parent / "moved"
    workdir.rename(moved)
    try:
        state, meta = Trainer(config, str(branch)).initial_state()
        assert int(state.step) == 3 * STEPS_PER_EPOCH and meta["branched_from"]["epoch"] == 1
    finally:
        moved.rename(workdir)
    best = Checkpointer(branch, read_only=True)
    try:
        assert best.steps(BEST), "the selected checkpoint is kept in the branch's workdir"
    finally:
        best.close()


def test_a_branch_of_another_setup_or_a_lost_epoch_is_refused(source, tmp_path):
    workdir, _ = source
    other = _branched(_config(), workdir)
    other.train.lr = 0.1
    with pytest.raises(ConfigError, match=r"(?s)may change only the method.*train\.lr: 0\.02 "):
        Trainer(other, str(tmp_path / "a")).initial_state()
    # Another batch size: the epoch's end is found from the source's records (not at this
    # run's step count), so the refusal names the differing field.
    other = _branched(_config(), workdir)
    other.train.batch_size = 32  # its step count would put epoch 1 at step 5: none kept
    with pytest.raises(ConfigError, match=r"(?s)may change only the method.*train\.batch_size"):
        Trainer(other, str(tmp_path / "c")).initial_state()
    # A source that no longer keeps the epoch's checkpoint (a copy without it).
    pruned = tmp_path / "pruned"
    shutil.copytree(workdir, pruned)
    shutil.rmtree(pruned / "checkpoints" / str(2 * STEPS_PER_EPOCH))
    with pytest.raises(CheckpointError, match=r"branch_from=.*no checkpoint at the end of epoch 2 "
                                              r"\(it keeps the ends of epochs \[1, 3\]\)\. "
                                              r"Fix: set config\.train\.branch_epoch.*keep_chec"):
        Trainer(_branched(_config(), pruned, epoch=2), str(tmp_path / "b")).initial_state()


@pytest.mark.parametrize("field, value, message", [
    ("branch_epoch", 3, r"train\.branch_epoch.*1 \.\. 2"),
    ("branch_epoch", 0, r"train\.branch_epoch.*1 \.\. 2"),
    ("init_from", "somewhere", r"train\.branch_from.*cannot be combined with train\.init_from"),
])
def test_branch_fields_are_validated(field, value, message, source):
    config = _branched(_config(), source[0])
    config.train[field] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_a_branch_from_a_workdir_without_checkpoints_is_refused(tmp_path):
    config = _branched(_config(), tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"train\.branch_from.*holds no checkpoint"):
        validate_config(config, fresh_start=True)


def test_a_fine_tune_starts_from_the_end_of_the_epoch_it_names(source, tmp_path, capsys):
    """`train.init_epoch` N: the weights and BN statistics of the source's checkpoint at the end
    of epoch N (step N x steps per epoch), neither its selected nor its last one; an epoch it did
    not keep is refused with the epochs it kept."""
    workdir, _ = source
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        best, last = ckpt.restore_host(kind=BEST), ckpt.restore_host()
        best_step = ckpt.latest_step(BEST)
        epoch = next(e for e in (1, 2) if e * STEPS_PER_EPOCH != best_step)  # 3 is the last
        at_epoch = ckpt.restore_host(step=epoch * STEPS_PER_EPOCH)
    finally:
        ckpt.close()
    config = _config()
    config.train.init_from, config.train.init_epoch = str(workdir), epoch
    trainer = Trainer(config, str(tmp_path / "fine"))
    trainer.log.stream = sys.stdout  # the logger bound sys.stdout before capsys replaced it
    state, _ = trainer.initial_state()
    assert int(state.step) == 0
    assert f"fine-tuning the weights of {workdir} (the end of its epoch {epoch})" in (
        capsys.readouterr().out)
    for got, want in ((state.params, at_epoch["params"]),
                      (state.batch_stats, at_epoch["batch_stats"])):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(x), y)
    for other in (best, last):  # so loading either of them instead would fail the check above
        assert any(not np.array_equal(x, y) for x, y in zip(
            jax.tree.leaves(at_epoch["params"]), jax.tree.leaves(other["params"]), strict=True))
    config.train.init_epoch = 5
    with pytest.raises(CheckpointError, match=r"no checkpoint at the end of epoch 5 \(it keeps "
                                              r"the ends of epochs \[1, 2, 3\]\)"):
        Trainer(config, str(tmp_path / "lost")).initial_state()
    config.train.init_from, config.train.init_epoch = "", 1
    with pytest.raises(ConfigError, match=r"train\.init_epoch.*set train\.init_from"):
        validate_config(config)


def test_the_end_of_an_epoch_is_never_a_mid_epoch_save():
    """Kept steps 10 (end of epoch 1), 15 (mid-epoch 2: one epoch recorded, flagged partial),
    20 (end of epoch 2), 25 (mid-epoch 3), and 30 recording two epochs without the flag: epoch 1
    is step 10 and epoch 2 step 20, whatever else recorded as many epochs; with step 10 pruned,
    epoch 1 is refused rather than taken from the middle of epoch 2."""
    from hamjax.run import epoch_end_step

    class Kept:
        mid = {"seconds": 1.0}  # the epoch's record so far
        metas = {10: {"epochs": [{}]}, 15: {"epochs": [{}], "partial_epoch": mid},
                 20: {"epochs": [{}, {}]}, 25: {"epochs": [{}, {}], "partial_epoch": mid},
                 30: {"epochs": [{}, {}]}}

        def steps(self, kind):
            return sorted(self.metas)

        def read_meta(self, kind, step):
            return self.metas[step]

    assert epoch_end_step(Kept(), "src", 1) == 10
    assert epoch_end_step(Kept(), "src", 2) == 20
    with pytest.raises(CheckpointError, match=r"epochs \[1, 2\]"):
        epoch_end_step(Kept(), "src", 3)
    pruned = Kept()
    pruned.metas = {k: v for k, v in Kept.metas.items() if k != 10}  # epoch 1's end is gone
    with pytest.raises(CheckpointError, match=r"end of epoch 1 \(it keeps the ends of epochs "
                                              r"\[2\]\)"):
        epoch_end_step(pruned, "src", 1)  # not step 15, saved in the middle of epoch 2
