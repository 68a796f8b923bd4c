"""Where a model's PGD step spends its time against PyTorch's: the forward pass and the forward
plus input gradient (one PGD iteration), jitted JAX against the eager torch twin, interleaved.

    python benchmarks/forward_vs_torch.py --model preact_resnet18 --batch 32 --repeats 9 \
        --out benchmarks/results/forward_vs_torch_preact_resnet18_$ISA.json

The train step comparison (`train_throughput.py --vs_torch`) gives one ratio for a whole step;
this splits it, random weights and data, BN in eval mode as in the attack, both on this host's
CPU (one JAX device, torch with as many threads as cores), so a gap can be put on the forward
convolutions or on the backward ones. Each repeat times the four calls in turn, the order
rotating; reported: median ms and the torch / JAX ratios (> 1: JAX faster).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hamjax.backends.cpu.compile_options import jit
from hamjax.flops import cpu_isa
from hamjax.models import build_model, init_variables

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from json_output import emit  # noqa: E402  (benchmarks/ beside this file)
from torch_twins import torch_models  # noqa: E402

SHAPES = {"small_cnn": (28, 28, 1), "fmnist_cnn": (28, 28, 1), "preact_resnet18": (32, 32, 3)}
NUM_CLASSES = 10


def timed_calls(name: str, batch: int) -> dict[str, Any]:
    """name -> a no-argument call that runs to completion, for the four measured calls."""
    import torch
    import torch.nn.functional as F

    shape = SHAPES[name]
    channels = shape[-1]
    model = build_model(ml_collections.ConfigDict({"name": name, "dtype": "float32"}),
                        NUM_CLASSES, shape, mean=(0.5,) * channels, std=(0.25,) * channels)
    variables = init_variables(model, jax.random.PRNGKey(0), shape)
    rs = np.random.RandomState(0)
    x = rs.rand(batch, *shape).astype(np.float32)
    y = rs.randint(0, NUM_CLASSES, batch)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss(x, v):
        logits = model.apply(v, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yj).mean()

    forward = jit(lambda v, x: model.apply(v, x, train=False))
    input_grad = jit(lambda v, x: jax.grad(loss)(x, v))
    net = torch_models()[name](channels) if name != "preact_resnet18" else torch_models()[name]()
    net.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))

    def torch_forward():
        with torch.no_grad():
            net(xt)

    def torch_input_grad():
        xa = xt.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(net(xa), yt), xa)

    return {"jax_forward": lambda: jax.block_until_ready(forward(variables, xj)),
            "torch_forward": torch_forward,
            "jax_forward_and_input_grad": lambda: jax.block_until_ready(input_grad(variables, xj)),
            "torch_forward_and_input_grad": torch_input_grad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet18", choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    calls = timed_calls(args.model, args.batch)
    for call in calls.values():  # compile, warm up
        call()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    load_start = [round(v, 2) for v in os.getloadavg()]
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    ms = {n: round(1e3 * statistics.median(t), 1) for n, t in times.items()}
    result = {
        "benchmark": "forward_vs_torch", "cpu_isa": cpu_isa(), "model": args.model,
        "batch": args.batch, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average_at_start": load_start,
                    "load_average_at_end": [round(v, 2) for v in os.getloadavg()]},
        "ms_median": ms, "ms_all": {n: [round(1e3 * v, 1) for v in t] for n, t in times.items()},
        "torch_over_jax": {
            "forward": round(ms["torch_forward"] / ms["jax_forward"], 3),
            "forward_and_input_grad": round(ms["torch_forward_and_input_grad"]
                                            / ms["jax_forward_and_input_grad"], 3),
            "input_grad_alone": round(
                (ms["torch_forward_and_input_grad"] - ms["torch_forward"])
                / (ms["jax_forward_and_input_grad"] - ms["jax_forward"]), 3)},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
