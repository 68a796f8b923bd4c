"""config.eval.select_attack=apgd on a quick-start-sized digits run: it trains, selects on the
APGD validation numbers and records them; those numbers are at most PGD-20's on the same model
and equal a direct call of `apgd` / `apgd_targeted` on the same examples; the sharded
evaluator counts each example once; and `python -m hamjax.evaluate --attacks=pgd20,autoattack`
on the run prints the per-class PGD vs AutoAttack gap and writes the margin histogram.

One 2-epoch PGD-AT run per module (small CNN, 40 validation examples, chunks of 40).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from digits_configs import digits_config

from hamjax import evaluate as ev

pytestmark = pytest.mark.slow  # a training run: started first under --dist loadfile
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, TARGETS = 10, 2


def _config():
    c = digits_config("pgd_at", crop_pad=0, batch_size=32, attack=(0.1, 0.05, 2),
                      evaluation=(0.1, 0.025, 20), eval_examples=40, eval_batch_size=40)
    c.eval.select_attack = "apgd"
    c.eval.select_apgd_steps = STEPS
    c.eval.select_apgd_targets = TARGETS
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, report.json as read back, the lines the run printed)."""
    from hamjax.runlog import RunLogger
    from hamjax.train import train_and_evaluate

    path = str(tmp_path_factory.mktemp("apgd_select"))
    lines: list[str] = []
    show = RunLogger.print
    with mock.patch.object(RunLogger, "print",
                           lambda self, message: (lines.append(message), show(self, message))):
        train_and_evaluate(_config(), path)
    with open(os.path.join(path, "report.json")) as f:
        report = json.load(f)
    return path, report, lines


def test_apgd_selection_trains_selects_and_records(run):
    workdir, report, lines = run
    selection = report["selection"]
    assert selection["select_attack"] == "apgd" and selection["select_on"] == "robust_worst"
    assert selection["settings"]["components"] == {
        "apgd-ce": {"steps": STEPS, "n_restarts": 1},
        "apgd-t": {"steps": STEPS, "n_restarts": 1, "n_target_classes": TARGETS}}
    epochs = report["epochs"]
    assert [e["val"]["attack"] for e in epochs] == ["apgd", "apgd"]
    # the best checkpoint is the epoch with the highest APGD worst-class accuracy (first on ties)
    scores = [e["val"]["robust"]["worst"] for e in epochs]
    assert report["results"]["best_on_val"]["epoch"] == 1 + int(np.argmax(scores))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[0]["kind"] == "run" and records[0]["selection"] == selection
    logged = [r["val"] for r in records if r["kind"] == "epoch"]
    assert [v["attack"] for v in logged] == ["apgd", "apgd"]
    assert [v["counts"] for v in logged] == [e["val"]["counts"] for e in epochs]
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert all(" APGD-CE+T " in line and "PGD-20" not in line for line in epoch_lines)


def _val_subset(loaded):
    from hamjax.data import stratified_subset as subset

    cfg = loaded.config
    return subset(loaded.splits.val, cfg.eval.num_examples, cfg.seed, loaded.splits.num_classes)


def _direct_apgd_robust(loaded, images, labels) -> np.ndarray:
    """Per-example robustness from `apgd` then `apgd_targeted` called directly, with the
    evaluator's keys: stage k of the chain folds each example's index into
    fold_in(attack_key(seed, "apgd"), k)."""
    from hamjax.attacks import apgd, apgd_targeted, example_keys
    from hamjax.data.augment import images_to_float
    from hamjax.evaluation.specs import attack_key
    from hamjax.evaluation.stages import stage_key
    from hamjax.models import make_logits_fn

    cfg = loaded.config
    logits_fn = make_logits_fn(loaded.model, loaded.variables, "eval")
    root = attack_key(cfg.seed, "apgd")
    x = images_to_float(jnp.asarray(images))
    y = jnp.asarray(labels, jnp.int32)
    eps = float(cfg.eval.eps)

    def fooled(x_adv, rows):
        assert float(jnp.max(jnp.abs(x_adv - x[rows]))) <= eps + 1e-5
        return np.asarray(jnp.argmax(logits_fn(x_adv), -1) != y[rows])

    robust = np.array(jnp.argmax(logits_fn(x), -1) == y)
    rows = np.flatnonzero(robust)
    x_ce, _ = apgd(logits_fn, x[rows], y[rows], example_keys(stage_key(root, 0), rows),
                   eps=eps, loss="ce", steps=STEPS, n_restarts=1)
    robust[rows[fooled(x_ce, rows)]] = False
    rows = np.flatnonzero(robust)
    x_t, _ = apgd_targeted(logits_fn, x[rows], y[rows], example_keys(stage_key(root, 1), rows),
                           eps=eps, steps=STEPS, n_target_classes=TARGETS, n_restarts=1)
    robust[rows[fooled(x_t, rows)]] = False
    return robust


def test_apgd_validation_attacks_and_equals_direct_calls(run):
    """On the selected checkpoint: the recorded APGD validation counts are what a direct call
    of the APGD functions gives, and no more than PGD-20's on the same examples."""
    from hamjax.evaluation.driver import class_counts
    from hamjax.evaluation.pgd import PGDEvaluator
    from hamjax.evaluation.selection import APGDEvaluator
    from hamjax.sharding import make_mesh

    workdir, report, _ = run
    loaded = ev.load_run(workdir, "best", log=lambda s: None)
    cfg, val = loaded.config, _val_subset(loaded)
    recorded = report["epochs"][report["results"]["best_on_val"]["epoch"] - 1]["val"]["counts"]
    robust = _direct_apgd_robust(loaded, val.images, val.labels)
    direct = class_counts(robust, val.labels, 10).to_json()
    assert direct == recorded["robust"]

    mesh = make_mesh()
    pgd = PGDEvaluator(loaded.model, 10, cfg.eval, mesh, 40)
    clean, pgd_robust = pgd(loaded.variables, val, pgd.attack_key(cfg.seed))
    strong = APGDEvaluator(loaded.model, 10, cfg.eval, mesh, 40)
    _, apgd_robust = strong(loaded.variables, val, strong.attack_key(cfg.seed))
    assert apgd_robust.to_json() == recorded["robust"]  # the trainer's numbers, re-run
    assert clean.to_json() == recorded["clean"]
    n_clean, n_pgd = float(np.sum(clean.correct)), float(np.sum(pgd_robust.correct))
    n_apgd = float(np.sum(apgd_robust.correct))
    assert n_apgd <= n_pgd and n_apgd < n_clean, (n_clean, n_pgd, n_apgd)


def test_evaluate_cli_prints_the_per_class_gap_and_writes_margins(run, capsys):
    workdir, _, _ = run
    status = ev.main(["--workdir", workdir, "--attacks=pgd20,autoattack", "--num_examples=40",
                      "--fast", "--attack.square.n_queries=20", "--no_resume"])
    assert status == 0
    out = capsys.readouterr().out
    assert "pgd20 vs autoattack: robust accuracy (%), gap (points)" in out
    assert "apgd-t" in out and "pgd-only" in out
    with open(os.path.join(workdir, "eval", "test_best.json")) as f:
        saved = json.load(f)
    comp = saved["inflation"]["comparisons"][0]
    assert comp["class_names"] == [str(k) for k in range(10)]  # digits' names
    pgd = np.array(saved["attacks"]["pgd20"]["robust"]["per_class"])
    aa = np.array(saved["attacks"]["autoattack"]["robust"]["per_class"])
    np.testing.assert_allclose(comp["per_class"]["gap_points"], 100 * (pgd - aa), atol=1e-9)
    # the gap is exactly the examples PGD missed, by stage, minus those only PGD broke
    broken = np.sum(list(comp["broken_after_pgd"].values()), axis=0)
    np.testing.assert_allclose(comp["per_class"]["gap_points"],
                               100 * (broken - comp["pgd_only"]) / comp["per_class"]["examples"])
    assert saved["inflation"]["flag"] == comp["exceeds_threshold"]
    assert (comp["warning"] is not None) == comp["exceeds_threshold"]
    if comp["exceeds_threshold"]:
        assert f"warning: {comp['warning']}" in out
    chart = saved["inflation"]["margin_chart_path"]
    assert chart == os.path.join(workdir, "eval", "test_best_margins.png")
    with open(chart, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(saved["inflation"]["margins"]["median"]) == 10


CHILD = textwrap.dedent(
    """
    import flax.linen as nn
    import jax
    import numpy as np
    from ml_collections import ConfigDict
    from types import SimpleNamespace

    from hamjax.evaluation.selection import APGDEvaluator
    from hamjax.sharding import make_mesh

    assert jax.device_count() == 4, jax.devices()

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False, mask=None):
            h = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            return nn.Dense(5)(h)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 6, 6, 1)).astype(np.uint8)
    model = MLP()
    variables = model.init(jax.random.key(0), images[:1].astype(np.float32) / 255)
    logits = model.apply(variables, images.astype(np.float32) / 255)
    labels = np.asarray(np.argmax(logits, -1), np.int32)  # every example clean-correct
    split = SimpleNamespace(images=images, labels=labels)
    config = ConfigDict({"eps": 0.03, "select_attack": "apgd", "select_apgd_steps": 5,
                         "select_apgd_targets": 2})
    counts = []
    for mesh, batch in ((make_mesh(jax.devices()[:1]), 8), (make_mesh(), 12)):
        evaluator = APGDEvaluator(model, 5, config, mesh, batch)
        clean, robust = evaluator(variables, split, evaluator.attack_key(0))
        counts.append((np.asarray(clean.correct), np.asarray(robust.correct),
                       np.asarray(robust.total)))
    (c1, r1, t1), (c4, r4, t4) = counts
    assert t1.sum() == t4.sum() == 30 and c1.sum() == c4.sum() == 30, (t1, t4, c1, c4)
    np.testing.assert_array_equal(r1, r4)
    assert 0 < r1.sum() < 30, r1
    print("apgd evaluator ok", flush=True)
    """
)


def test_sharded_apgd_evaluator_counts_each_example_once(tmp_path):
    """30 examples in chunks of 12 on 4 devices (padded tail) and of 8 on one: same counts,
    every example counted once."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "apgd evaluator ok" in proc.stdout

