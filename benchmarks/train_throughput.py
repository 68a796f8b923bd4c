# ruff: noqa: E402  (jax is imported after --cpu_devices has set XLA_FLAGS)
"""Train-step throughput (images/s, compilation excluded) per model x method, random data.

    python benchmarks/train_throughput.py                     # default: a few minutes on 2 CPUs
    python benchmarks/train_throughput.py --models small_cnn preact_resnet18 wrn34_10 \
        --methods all --batch 128 --repeats 10

Each cell is the real jitted `make_train_step` (augmentation, the method's attack and loss,
optimiser update, ledger) with the method's default config (`hamjax.config.method_config`) and
the default training attack (PGD-10, eps 8/255, step 2/255). Timing: one warm-up call that
compiles, then the median of `--repeats` calls on the same state and batch, each ended by
block_until_ready. HAM runs past its PGD-AT warm-up (warmup_epochs=0); its cost depends on the
hard fraction it mines, reported per cell (random weights and labels: most rows are hard, so
this is close to HAM's worst case). CAAT gets a meta batch of the same size and its official
hyperparameters. Besides images/s each cell reports the example passes
(forward + backward) the step's ledger counted per image, a hardware-independent cost. Every
timed call is step 0 of the same state, so step-dependent work is what step 0 does (CAAT's meta
update every `meta_interval` steps is not in it).

    python benchmarks/train_throughput.py --vs_torch --models small_cnn preact_resnet18 \
        --cpu_devices 1    # or --cpu_devices auto: one host device per core, as launch.py does

`--vs_torch` adds the side-by-side column: the jitted PGD-AT step (jitted over a mesh of
`--cpu_devices` host devices, the batch split over them) against an eager PyTorch PGD-AT step of
the twin architecture (`benchmarks/torch_twins.py`: same layers, PGD-K with random start, BN in
eval mode while attacking, SGD with momentum and weight decay), same batch, K and data, the two
timed in turn within each repeat so that load on the shared cores hits them alike; the ratio is
the median over repeats of torch seconds / jax seconds (> 1: the jitted step is faster).
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

if __name__ == "__main__" and (_setting := setting_from_argv(sys.argv[1:])) is not None:
    use_cpu_devices(_setting)  # before jax starts its backend

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hamjax.backends.cpu.compile_options import compiler_options, jit
from hamjax.backends.cpu.conv import CONV_VJP_MODES, resolved_conv_vjp
from hamjax.config import base_config, method_config, validate_config
from hamjax.flops import compiled_flops, cpu_isa, flop_report, jaxpr_flops
from hamjax.methods import available_methods, get_method
from hamjax.models import build_model
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.sharding import make_mesh, put_replicated, shard_batch
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import jit_train_step, make_multi_step, make_train_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_twins import make_torch_pgd_at_step, torch_models  # benchmarks/ beside this file

NUM_CLASSES = 10
SHAPES = {"small_cnn": (28, 28, 1), "fmnist_cnn": (28, 28, 1), "preact_resnet18": (32, 32, 3),
          "wrn34_10": (32, 32, 3)}
DEFAULT_METHODS = ("standard", "pgd_at", "trades", "ham", "caat")


def method_block(name: str) -> ml_collections.ConfigDict:
    """`config.method` with every field (`method_config(name)`, from the method's registered
    defaults); HAM's warm-up is switched off so that HAM itself is timed (in warm-up it is
    PGD-AT)."""
    block = method_config(name)
    if "warmup_epochs" in block:
        block.warmup_epochs = 0
    return block


def make_config(model: str, method: str, batch: int, dtype: str = "float32",
                conv_vjp: str = "auto") -> ml_collections.FrozenConfigDict:
    config = base_config()
    config.model.name = model
    config.model.dtype = dtype
    config.model.conv_vjp = conv_vjp
    config.method = method_block(method)
    if get_method(method).needs_meta_batch:
        config.data.meta_per_class = 10
    config.train.batch_size = batch
    config.train.lr_schedule = "constant"
    validate_config(config)
    return ml_collections.FrozenConfigDict(config)


def make_step(config, shape: tuple[int, int, int], mesh=None, per_dispatch: int = 1):
    """(jitted train step, initial state, method) on a StepContext built without a dataset;
    with a mesh, jitted over it (the batch split over its devices, the state replicated).
    per_dispatch > 1: the trainer's `train.steps_per_dispatch` program, that many steps as one
    `lax.scan` over stacked batches (no mesh)."""
    ctx = StepContext(
        model=build_model(config.model, NUM_CLASSES, shape), tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, 1000), config=config, num_classes=NUM_CLASSES,
        class_counts=np.ones(NUM_CLASSES, np.int64), steps_per_epoch=1000, image_shape=shape,
        mesh=mesh)
    method = get_method(config.method.name)
    state = create_train_state(ctx, method, seed=0)
    if per_dispatch > 1:
        return jit(make_multi_step(make_train_step(ctx, method))), state, method
    if mesh is None:
        return jit(make_train_step(ctx, method)), state, method
    return jit_train_step(make_train_step(ctx, method), mesh), put_replicated(state, mesh), method


def step_flops(step, args: tuple, seconds: float, dtype: str, devices=None) -> dict[str, Any]:
    """FLOPs of one step (jaxpr count, loops multiplied out; XLA's one-trip count beside it),
    achieved FLOP/s and the fraction of the devices' peak (`hamjax.flops`)."""
    counted, notes = jaxpr_flops(step, *args)
    xla = compiled_flops(step.lower(*args).compile())
    return flop_report(counted, seconds, str(dtype), devices, xla_flops=xla, notes=notes)


def time_cell(model: str, method_name: str, batch: int, repeats: int,
              dtype: str = "float32", per_dispatch: int = 1,
              conv_vjp: str = "auto") -> dict[str, Any]:
    """One model x method cell; per_dispatch > 1 times the scanned program of that many steps
    (the same batch each step) and reports per-step figures (FLOPs and FLOP/s per call)."""
    shape = SHAPES[model]
    config = make_config(model, method_name, batch, dtype, conv_vjp)
    step, state, method = make_step(config, shape, per_dispatch=per_dispatch)
    rs = np.random.RandomState(0)
    data = {"image": jnp.asarray(rs.rand(batch, *shape).astype(np.float32)),
            "label": jnp.asarray(rs.randint(0, NUM_CLASSES, batch).astype(np.int32)),
            "index": jnp.arange(batch, dtype=jnp.int32)}
    if method.needs_meta_batch:
        data["meta_image"] = jnp.asarray(rs.rand(batch, *shape).astype(np.float32))
        data["meta_label"] = jnp.asarray(rs.randint(0, NUM_CLASSES, batch).astype(np.int32))
    if per_dispatch > 1:
        data = jax.tree.map(lambda x: jnp.stack([x] * per_dispatch), data)
    t0 = time.perf_counter()
    new_state, metrics = jax.block_until_ready(step(state, data))
    if per_dispatch > 1:  # per-step figures: the first step's metrics, the ledger per step
        metrics = jax.tree.map(lambda m: m[0], metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(state, data))
        times.append(time.perf_counter() - t0)
    call = statistics.median(times)
    flop_fields = step_flops(step, (state, data), call, config.model.dtype)
    sec = call / per_dispatch
    passes = float(new_state.ledger.forward + new_state.ledger.backward) / batch / per_dispatch
    cell = {"images_per_s": round(batch / sec, 3), "seconds_per_step": round(sec, 5),
            "steps_per_dispatch": per_dispatch,
            "first_call_seconds_incl_compile": round(compile_s, 2),
            "example_passes_per_image": round(passes, 3), **flop_fields}
    extra = {k: round(float(v), 4) for k, v in metrics.items()
             if k in ("warmup", "hard_fraction", "train_fraction", "bucket_fraction",
                      "update_applied")}
    if extra:
        cell["metrics"] = extra
    return cell


WARM_ROUNDS = 3  # untimed rounds of every peer before the timed repeats (--vs_torch)


def vs_torch_cell(model: str, batch: int, repeats: int, torch_device: str = "cpu",
                  compile_mode: str = "default", dtype: str = "float32",
                  conv_vjp: str = "auto") -> dict[str, Any]:
    """The jitted PGD-AT step over all of JAX's devices vs its PyTorch twin on `torch_device`,
    eager and (unless compile_mode is "none") through `torch.compile(mode=compile_mode)`, the
    three interleaved within each repeat in rotating order. On CUDA the twins run as research
    scripts run them there (cudnn.benchmark on); their step ends with `float(loss)`, which
    waits for the GPU."""
    import torch

    if torch_device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    shape = SHAPES[model]
    config = make_config(model, "pgd_at", batch, dtype, conv_vjp)
    mesh = make_mesh()
    step, state, _ = make_step(config, shape, mesh)
    rs = np.random.RandomState(0)
    images = rs.rand(batch, *shape).astype(np.float32)
    labels = rs.randint(0, NUM_CLASSES, batch).astype(np.int32)
    data = shard_batch({"image": images, "label": labels,
                        "index": np.arange(batch, dtype=np.int32)}, mesh)

    attack, train = config.attack, config.train
    twin = torch_models()[model]

    def torch_step(mode: str | None):
        torch.manual_seed(0)
        net = (twin(channels=shape[-1]) if model.endswith("cnn") else twin()).to(torch_device)
        return make_torch_pgd_at_step(
            net, eps=attack.eps, step_size=attack.step_size, steps=attack.steps, lr=train.lr,
            momentum=train.momentum, weight_decay=train.weight_decay, compile_mode=mode,
            autocast_dtype=dtype)

    x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(torch_device)
    y_t = torch.from_numpy(labels.astype(np.int64)).to(torch_device)
    fresh = lambda s: jax.block_until_ready(jax.tree.map(jnp.copy, s))  # the step donates it
    peers = {"torch": torch_step(None)}
    if compile_mode != "none":
        peers["torch_compiled"] = torch_step(compile_mode)

    t0 = time.perf_counter()
    jax.block_until_ready(step(fresh(state), data))
    warmup = {"jax": time.perf_counter() - t0}
    for name, peer in peers.items():  # warm-up: allocator, thread pool, torch.compile's graphs
        t0 = time.perf_counter()
        peer(x_t, y_t)
        peer(x_t, y_t)  # the second call compiles nothing new once both BN modes are seen
        warmup[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {"jax": [], **{name: [] for name in peers}}
    runners = {"jax": lambda copy: jax.block_until_ready(step(copy, data)),
               **{name: (lambda _, peer=peer: peer(x_t, y_t)) for name, peer in peers.items()}}
    order = list(runners)
    # Untimed rounds of all three in turn: on 2 shared cores the jitted step took 1.3-1.5x its
    # steady time for its first ~3 calls after compiling (the allocator's first touches).
    for _ in range(WARM_ROUNDS):
        for name in order:
            runners[name](fresh(state) if name == "jax" else None)
    for r in range(repeats):  # the order rotates, so no one always runs after torch's threads
        for name in order[r % len(order):] + order[:r % len(order)]:
            copy = fresh(state) if name == "jax" else None
            t0 = time.perf_counter()
            runners[name](copy)
            times[name].append(time.perf_counter() - t0)
    jax_s = statistics.median(times["jax"])
    cell: dict[str, Any] = {
        "batch": batch, "input_shape": list(shape), "attack_steps": int(attack.steps),
        "jax_devices": len(mesh.devices.flat), "jax_backend": jax.default_backend(),
        "torch_device": torch_device, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "torch_compile_mode": compile_mode,
        "dtype": dtype, "torch_precision": "float32" if dtype == "float32" else
        f"torch.autocast({dtype}), float32 weights",
        "jax_seconds_per_step": round(jax_s, 4), "jax_images_per_s": round(batch / jax_s, 2),
        "jax_first_call_seconds_incl_compile": round(warmup["jax"], 2),
        "seconds_per_step_all": {n: [round(t, 4) for t in ts] for n, ts in times.items()},
    }
    for name in peers:
        sec = statistics.median(times[name])
        cell[f"{name}_seconds_per_step"] = round(sec, 4)
        cell[f"{name}_images_per_s"] = round(batch / sec, 2)
        cell[f"{name}_warmup_seconds_incl_compile"] = round(warmup[name], 2)
        cell[f"speed_jax_over_{name}"] = round(statistics.median(
            t / j for t, j in zip(times[name], times["jax"], strict=True)), 3)
    cell.update(step_flops(step, (fresh(state), data), jax_s, config.model.dtype,
                           list(mesh.devices.flat)))
    return cell


def run(args: argparse.Namespace) -> dict[str, Any]:
    registered = available_methods()
    methods = registered if args.methods == ["all"] else [m for m in args.methods
                                                          if m in registered]
    skipped = [m for m in args.methods if m != "all" and m not in registered]
    result: dict[str, Any] = {
        "benchmark": "train_throughput",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()],
                    "compiler_options": compiler_options(), "cpu_isa": cpu_isa(),
                    # what model.conv_vjp="auto" ran as (the canonical conv, Winograd or not)
                    "conv_vjp_auto": resolved_conv_vjp("auto"),
                    "load_average_at_start": list(os.getloadavg())},
        "settings": {"training_attack": "PGD-10, eps 8/255, step 2/255 (base_config)",
                     "data": "random images and labels", "repeats": args.repeats,
                     "timing": "median of repeats after a compiling warm-up call" + (
                         f" and {WARM_ROUNDS} untimed rounds of every peer, interleaved in "
                         "rotating order" if args.vs_torch else ""),
                     "dtype": args.dtype, "steps_per_dispatch": args.steps_per_dispatch,
                     "conv_vjp": args.conv_vjp,
                     "batch": {m: batch_of(m, args) for m in args.models}},
        "results": {},
    }
    if skipped:
        result["skipped_unregistered_methods"] = skipped
    if args.vs_torch:
        result["vs_torch"] = {}
        for model in args.models:
            result["vs_torch"][model] = vs_torch_cell(
                model, batch_of(model, args), args.repeats, args.torch_device,
                args.torch_compile_mode, args.dtype, args.conv_vjp)
            print(f"# {model} vs torch: {json.dumps(result['vs_torch'][model])}",
                  file=sys.stderr, flush=True)
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
        return result
    for model in args.models:
        batch = batch_of(model, args)
        row = {}
        for method in methods:
            try:
                row[method] = time_cell(model, method, batch, args.repeats, args.dtype,
                                        args.steps_per_dispatch, args.conv_vjp)
            except Exception as err:  # one broken method must not hide the others' numbers
                row[method] = {"error": f"{type(err).__name__}: {err}"}
            print(f"# {model} {method}: {json.dumps(row[method])}", file=sys.stderr,
                  flush=True)
        base = row.get("pgd_at", {}).get("images_per_s")
        for cell in row.values():
            if base and "images_per_s" in cell:
                cell["speed_vs_pgd_at"] = round(cell["images_per_s"] / base, 3)
        result["results"][model] = {"input_shape": list(SHAPES[model]), "batch": batch,
                                    "methods": row}
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return result


def batch_of(model: str, args: argparse.Namespace) -> int:
    """--batch, else the default: with --vs_torch 128 for the CNNs and 32 for the ResNets (the
    field's per-device batches), else 64 and 4 (a quick sweep of every method)."""
    if args.batch:
        return args.batch
    cnn = model.endswith("cnn")
    return (128 if cnn else 32) if args.vs_torch else (64 if cnn else 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["small_cnn", "preact_resnet18"],
                   choices=list(SHAPES), help="add wrn34_10 for WRN-34-10 (slow on a CPU)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="method names, or 'all' for every registered method")
    p.add_argument("--batch", type=int, default=0,
                   help="batch size (default: 64 small_cnn, 4 for the ResNets)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vs_torch", action="store_true",
                   help="only the PGD-AT step against its PyTorch twin, eager and compiled "
                        "(needs torch); "
                        "default batch 128 small_cnn, 32 for the ResNets")
    p.add_argument("--torch_device", default="cpu",
                   help="where the PyTorch twin runs with --vs_torch: cpu, or cuda beside JAX "
                        "on a GPU")
    p.add_argument("--torch_compile_mode", default="default",
                   help="torch.compile mode of the compiled PyTorch column with --vs_torch "
                        "(default, reduce-overhead, max-autotune), or 'none' for eager only")
    p.add_argument("--conv_vjp", default="auto", choices=list(CONV_VJP_MODES),
                   help="config.model.conv_vjp of the jitted steps (default auto: this "
                        "backend's and CPU's choice, recorded as machine.conv_vjp_auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="config.model.dtype (compute dtype; weights stay float32), and the "
                        "torch twin under torch.autocast of the same dtype with --vs_torch")
    p.add_argument("--steps_per_dispatch", type=int, default=1,
                   help="time the train.steps_per_dispatch program of this many scanned steps "
                        "(per-step figures reported); not with --vs_torch")
    p.add_argument("--cpu_devices", default="1",
                   help="host devices on the CPU ('auto': one per core); read before jax starts")
    args = p.parse_args()
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
