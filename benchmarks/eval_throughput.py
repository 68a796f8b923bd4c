"""Evaluation throughput (images/s, compilation excluded): hamjax vs torchattacks, same machine.

    python benchmarks/eval_throughput.py                      # default: a few minutes on 2 CPUs
    python benchmarks/eval_throughput.py --aa standard --cnn_batch 64 --resnet_batch 32

Models with random weights: the small CNN on 28x28x1 and PreAct-ResNet-18 on 32x32x3, each
defined twice (hamjax's flax modules and the equivalent PyTorch modules below), in eval mode.
Labels are each model's own clean predictions, so every example is clean-correct and attacked
(with random labels ~90% would be skipped as already misclassified).

- PGD-20: L_inf eps 8/255, step 2/255, random start; hamjax `pgd` jitted (one warm-up call,
  then `--repeats` timed calls) vs `torchattacks.PGD` (one warm-up call, same repeats).
- AutoAttack: APGD-CE -> APGD-T -> FAB-T -> Square, each on the examples still robust after the
  previous ones: hamjax through `hamjax.evaluation.runner.run_attacks` (the code
  `python -m hamjax.evaluate` runs; its per-stage times exclude compilation) vs torchattacks'
  APGD, APGDT, FAB(multi_targeted) and Square chained as `torchattacks.MultiAttack` chains them,
  with the same settings and each stage timed (torchattacks' own `AutoAttack` class fixes 10
  APGD/FAB steps where the reference uses 100, so both sides are built explicitly).
  AutoAttack is timed at `--aa_eps` (default 1e-5): with labels = predictions nothing is fooled
  at that radius, so all four attacks run on every example: the cost on a fully robust model, an
  upper bound (at eps 8/255 a random-weight model falls to APGD-CE and the other three would
  never run). The JSON reports the robust fraction each side ended with.
  `--aa reduced` (default, for a CPU) = 10 APGD/FAB steps, 3 targets, 100 Square queries;
  `--aa torchattacks` = what torchattacks.AutoAttack runs (10 steps, 9 targets, 5000 queries);
  `--aa standard` = the reference (100 steps, 9 targets, 5000 queries).
- `--workdir DIR` (a trained 10-class small-CNN run): instead, standard AutoAttack on `--images`
  class-stratified test images with their true labels at the run's eval eps, torchattacks on
  the twin holding the run's weights (their clean logits are compared and reported).

Prints one JSON object: machine (platform, CPU count, load average, versions), settings and
per model/attack the images/s of each framework and jax/torch (> 1: hamjax is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from hamjax.cpu_devices import setting_from_argv, use_cpu_devices

if __name__ == "__main__":
    use_cpu_devices(setting_from_argv(sys.argv[1:]) or "1")  # before jax starts its backend

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hamjax.attacks import pgd
from hamjax.backends.cpu.compile_options import compiler_options, jit
from hamjax.backends.cpu.conv import CONV_VJP_MODES
from hamjax.evaluation.runner import run_attacks
from hamjax.evaluation.specs import parse_attacks
from hamjax.flops import compiled_flops, cpu_isa, flop_report, jaxpr_flops
from hamjax.models import build_model, init_variables, make_logits_fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from json_output import emit  # noqa: E402  (benchmarks/ beside this file)
from torch_twins import WEIGHT_LOADERS, torch_models  # noqa: E402

NUM_CLASSES = 10
EPS, STEP = 8 / 255, 2 / 255
MODELS = {"small_cnn": (28, 28, 1), "preact_resnet18": (32, 32, 3)}
AA_SETTINGS = {  # APGD-CE / APGD-T / FAB-T steps, targets of APGD-T and FAB-T, Square queries
    "reduced": {"steps": 10, "n_target_classes": 3, "n_queries": 100},
    "torchattacks": {"steps": 10, "n_target_classes": 9, "n_queries": 5000},
    "standard": {"steps": 100, "n_target_classes": 9, "n_queries": 5000},
}


# ----------------------------------------------------------------------------- jax side
def jax_model(name: str, shape: tuple[int, int, int], conv_vjp: str = "auto"):
    channels = shape[-1]
    model = build_model(ml_collections.ConfigDict({"name": name, "dtype": "float32",
                                                   "conv_vjp": conv_vjp}),
                        NUM_CLASSES, shape, mean=(0.5,) * channels, std=(0.25,) * channels)
    return model, init_variables(model, jax.random.PRNGKey(0), shape)


def jax_pgd(model, variables, x: np.ndarray, repeats: int) -> dict[str, Any]:
    logits_fn = make_logits_fn(model, variables)
    y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))

    @jit
    def attack(variables, x, y, key):
        x_adv, info = pgd(make_logits_fn(model, variables), x, y, key, eps=EPS, step_size=STEP,
                          steps=20)
        return x_adv, info.success

    t0 = time.perf_counter()
    jax.block_until_ready(attack(variables, x, y, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - t0
    times, fooled = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        _, success = jax.block_until_ready(attack(variables, x, y, jax.random.PRNGKey(r + 1)))
        times.append(time.perf_counter() - t0)
        fooled.append(float(np.mean(success)))
    sec = statistics.median(times)
    args = (variables, x, y, jax.random.PRNGKey(0))
    counted, notes = jaxpr_flops(attack, *args)
    flop_fields = flop_report(counted, sec, "float32",
                              xla_flops=compiled_flops(attack.lower(*args).compile()),
                              notes=notes)
    return {"images_per_s": len(x) / sec, "seconds_per_batch": sec,
            "first_call_seconds_incl_compile": compile_s, "fooled": statistics.mean(fooled),
            **flop_fields}


def jax_autoattack(model, variables, x: np.ndarray, aa: dict, eps: float,
                   labels: np.ndarray | None = None, chunk: int | None = None) -> dict[str, Any]:
    """hamjax's AutoAttack through `run_attacks` (labels: the model's predictions unless
    given; chunk: the evaluation chunk, default all of x, rounded up to the device count)."""
    logits_fn = make_logits_fn(model, variables)
    y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1)) if labels is None else labels
    comp = {"steps": aa["steps"], "n_target_classes": aa["n_target_classes"]}
    specs = parse_attacks("autoattack", eps=eps, num_classes=NUM_CLASSES, overrides={
        "apgd-ce": {"steps": aa["steps"]}, "apgd-t": comp, "fab-t": comp,
        "square": {"n_queries": aa["n_queries"]}})
    n_dev = jax.device_count()
    chunk = -(-(chunk or len(x)) // n_dev) * n_dev
    out = run_attacks(model, variables, x, y, NUM_CLASSES, specs, eps=eps, seed=0,
                      batch_size=chunk, log=lambda s: None, progress=False)
    stages = {k: v for k, v in out.stages.items() if k.startswith("autoattack/")}
    seconds = sum(v["seconds"] for v in stages.values())
    return {"images_per_s": len(x) / seconds, "seconds": seconds, "devices": n_dev,
            "chunk": chunk,
            "compile_seconds": sum(v["compile_seconds"] for v in stages.values()),
            "clean_accuracy": float(out.clean_correct.mean()),
            "robust_fraction": float(out.robust["autoattack"].mean()),
            "attacked_per_stage": {k.split("/")[1]: v["attacked"] for k, v in stages.items()},
            "seconds_per_stage": {k.split("/")[1]: round(v["seconds"], 3)
                                  for k, v in stages.items()}}


# ----------------------------------------------------------------------------- torch side
def torch_pgd(net, x, repeats: int) -> dict[str, Any]:
    import torch
    import torchattacks

    with torch.no_grad():
        y = net(x).argmax(1)
    atk = torchattacks.PGD(net, eps=EPS, alpha=STEP, steps=20, random_start=True)
    atk(x, y)  # warm-up
    times, fooled = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        adv = atk(x, y)
        times.append(time.perf_counter() - t0)
        with torch.no_grad():
            fooled.append(float((net(adv).argmax(1) != y).float().mean()))
    sec = statistics.median(times)
    return {"images_per_s": len(x) / sec, "seconds_per_batch": sec,
            "fooled": statistics.mean(fooled)}


def torch_autoattack(net, x, aa: dict, eps: float, labels=None) -> dict[str, Any]:
    """torchattacks.MultiAttack's loop (each attack on the examples still classified correctly),
    written out so that each stage is timed. labels: the model's predictions unless given."""
    import torch
    import torchattacks as ta

    with torch.no_grad():
        pred = net(x).argmax(1)
    y = pred if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    steps, n_cls = aa["steps"], aa["n_target_classes"] + 1  # torchattacks: targets = n_classes-1
    stages = {
        "apgd-ce": ta.APGD(net, eps=eps, steps=steps, loss="ce", n_restarts=1, seed=0),
        "apgd-t": ta.APGDT(net, eps=eps, steps=steps, n_classes=n_cls, n_restarts=1, seed=0),
        "fab-t": ta.FAB(net, eps=eps, steps=steps, multi_targeted=True, n_classes=n_cls,
                        n_restarts=1, seed=0),
        "square": ta.Square(net, eps=eps, n_queries=aa["n_queries"], n_restarts=1, seed=0),
    }
    alive = torch.nonzero(pred == y).flatten()  # clean-correct: the rows either side attacks
    clean_accuracy = len(alive) / len(x)
    seconds, attacked = {}, {}
    for name, attack in stages.items():
        attacked[name] = len(alive)
        if len(alive) == 0:
            seconds[name] = 0.0
            continue
        t0 = time.perf_counter()
        adv = attack(x[alive], y[alive])
        with torch.no_grad():
            alive = alive[net(adv).argmax(1) == y[alive]]
        seconds[name] = time.perf_counter() - t0
    total = sum(seconds.values())
    return {"images_per_s": len(x) / total, "seconds": total, "clean_accuracy": clean_accuracy,
            "robust_fraction": len(alive) / len(x), "attacked_per_stage": attacked,
            "seconds_per_stage": {k: round(v, 3) for k, v in seconds.items()}}


# ----------------------------------------------------------------------------- driver
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "compiler_options": compiler_options(), "cpu_isa": cpu_isa(),
        "load_average_at_start": list(os.getloadavg()),
        "flops": "PGD cells count their FLOPs (hamjax.flops); AutoAttack's depend on which "
                 "examples each stage still attacks and on Square's early stop: not counted",
    }
    try:
        import torch
        import torchattacks

        info.update(torch=torch.__version__, torchattacks=torchattacks.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        info["torch"] = None
    return info


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "images_per_s" not in a or "images_per_s" not in b:
        return None
    return round(a["images_per_s"] / b["images_per_s"], 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    has_torch = info.get("torch") is not None
    aa = AA_SETTINGS[args.aa]
    info["conv_vjp"] = args.conv_vjp
    result: dict[str, Any] = {
        "benchmark": "eval_throughput", "machine": info,
        "settings": {
            "pgd": {"eps": EPS, "step_size": STEP, "steps": 20, "random_start": True,
                    "timing": "median over repeats after a warm-up call (both frameworks)"},
            "autoattack": {"preset": args.aa, "eps": args.aa_eps, **aa,
                           "components": ["apgd-ce", "apgd-t", "fab-t", "square"],
                           "timing": "one call, no warm-up on either side; hamjax stage "
                                     "times exclude compilation (ahead-of-time compiled)",
                           "regime": "labels = model's own predictions; nothing is fooled at "
                                     "this eps, so every attack runs on every example"},
            "weights": "random", "bn_mode": "eval"},
        "results": {},
    }
    if not has_torch:
        result["note"] = "torch/torchattacks not installed: pip install torch torchattacks"
    nets = torch_models() if has_torch else {}
    for name in args.models:
        shape = MODELS[name]
        batch = args.cnn_batch if name == "small_cnn" else args.resnet_batch
        aa_batch = args.cnn_aa_batch if name == "small_cnn" else args.resnet_aa_batch
        rng = np.random.default_rng(0)
        x = rng.random((max(batch, aa_batch),) + shape, dtype=np.float32)
        model, variables = jax_model(name, shape, args.conv_vjp)
        entry: dict[str, Any] = {"input_shape": list(shape), "pgd_batch": batch,
                                 "pgd_repeats": args.repeats if name == "small_cnn" else
                                 args.resnet_repeats,
                                 "autoattack_examples": aa_batch}
        repeats = args.repeats if name == "small_cnn" else args.resnet_repeats
        entry["pgd20"] = {"jax": jax_pgd(model, variables, x[:batch], repeats)}
        if "autoattack" in args.attacks:
            entry["autoattack"] = {"jax": jax_autoattack(model, variables, x[:aa_batch], aa,
                                                         args.aa_eps)}
        if has_torch:
            import torch

            torch.manual_seed(0)
            net = nets[name](shape[-1]) if name == "small_cnn" else nets[name]()
            net.eval()
            xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            entry["pgd20"]["torch"] = torch_pgd(net, xt[:batch], repeats)
            if "autoattack" in args.attacks:
                entry["autoattack"]["torch"] = torch_autoattack(net, xt[:aa_batch], aa,
                                                                args.aa_eps)
        for attack in ("pgd20", "autoattack"):
            if attack in entry:
                entry[attack]["jax_over_torch"] = ratio(entry[attack]["jax"],
                                                        entry[attack].get("torch"))
        result["results"][name] = entry
        print(f"# {name}: " + json.dumps({k: entry[k].get("jax_over_torch") for k in
                                           ("pgd20", "autoattack") if k in entry}),
              file=sys.stderr, flush=True)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


def trained(args: argparse.Namespace) -> dict[str, Any]:
    """AutoAttack on a trained small-CNN or fmnist_cnn workdir's test images, at the run's eval
    eps with the true labels: hamjax on the run's model, torchattacks on the twin holding the
    same weights (checked: the two give the same clean logits)."""
    import torch

    from hamjax.data import stratified_subset
    from hamjax.evaluation.workdir import load_run

    run = load_run(args.workdir, args.checkpoint, log=lambda s: None)
    name = run.config.model.name
    if name not in WEIGHT_LOADERS or run.splits.num_classes != NUM_CLASSES:
        raise SystemExit(f"--workdir={args.workdir}: needs a 10-class run of "
                         f"{' or '.join(WEIGHT_LOADERS)}, this one is {name} with "
                         f"{run.splits.num_classes} classes")
    data = stratified_subset(run.splits.test, args.images, int(run.config.seed), NUM_CLASSES)
    x = np.asarray(data.images, np.float32)
    x = x / 255.0 if np.asarray(data.images).dtype == np.uint8 else x
    y = np.asarray(data.labels, np.int64)
    eps, aa = float(run.config.eval.eps), AA_SETTINGS[args.aa]

    torch.manual_seed(0)
    net = torch_models()[name](x.shape[-1])
    WEIGHT_LOADERS[name](net, jax.device_get(run.variables), run.model.mean, run.model.std)
    net.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    jax_logits = np.asarray(make_logits_fn(run.model, run.variables)(jnp.asarray(x)))
    with torch.no_grad():
        torch_logits = net(xt).numpy()
    result: dict[str, Any] = {
        "benchmark": "eval_throughput/trained", "machine": machine(),
        "workdir": os.path.abspath(args.workdir), "model": name, "checkpoint": run.checkpoint,
        "step": run.step, "epoch": run.epoch, "images": len(y), "eps": eps,
        "settings": {"preset": args.aa, **aa,
                     "components": ["apgd-ce", "apgd-t", "fab-t", "square"],
                     "timing": "one call each; hamjax stage times exclude compilation",
                     "order": "torch first, then hamjax"},
        "twin_max_abs_logit_difference": float(np.max(np.abs(jax_logits - torch_logits))),
        "twin_same_predictions": bool(np.all(jax_logits.argmax(1) == torch_logits.argmax(1))),
    }
    result["torch"] = torch_autoattack(net, xt, aa, eps, labels=y)
    result["jax"] = jax_autoattack(run.model, run.variables, x, aa, eps, labels=y,
                                   chunk=args.chunk or int(run.config.eval.batch_size))
    result["jax_over_torch"] = ratio(result["jax"], result["torch"])
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--attacks", nargs="+", default=["pgd20", "autoattack"],
                   choices=["pgd20", "autoattack"])
    p.add_argument("--cnn_batch", type=int, default=32, help="PGD batch, small CNN")
    p.add_argument("--resnet_batch", type=int, default=2, help="PGD batch, PreAct-ResNet-18")
    p.add_argument("--cnn_aa_batch", type=int, default=4, help="AutoAttack examples, small CNN")
    p.add_argument("--resnet_aa_batch", type=int, default=1,
                   help="AutoAttack examples, PreAct-ResNet-18")
    p.add_argument("--repeats", type=int, default=2, help="timed PGD calls (median)")
    p.add_argument("--resnet_repeats", type=int, default=1,
                   help="timed PGD calls for PreAct-ResNet-18 (slow on a CPU)")
    p.add_argument("--aa", default=None, choices=sorted(AA_SETTINGS),
                   help="default: standard with --workdir, reduced otherwise")
    p.add_argument("--aa_eps", type=float, default=1e-5)
    p.add_argument("--conv_vjp", default="auto", choices=list(CONV_VJP_MODES),
                   help="model.conv_vjp of the random-weight models (auto: this CPU's choice)")
    p.add_argument("--workdir", default="",
                   help="a trained 10-class small_cnn run: AutoAttack on its test images")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--images", type=int, default=500, help="class-stratified test images")
    p.add_argument("--chunk", type=int, default=0, help="hamjax chunk (default: the run's "
                   "eval.batch_size, as python -m hamjax.evaluate)")
    p.add_argument("--cpu_devices", default="1",
                   help="host devices for hamjax (read before jax starts; auto = one per core)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args()
    args.aa = args.aa or ("standard" if args.workdir else "reduced")
    result = trained(args) if args.workdir else run(args)
    emit(result, args.out)


if __name__ == "__main__":
    main()
