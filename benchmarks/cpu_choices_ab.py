"""Interleaved A/B of hamjax's CPU choices in the jitted PGD-AT train step, on this host's ISA.

    python benchmarks/cpu_choices_ab.py --out benchmarks/results/cpu_choices_ab_$ISA.json

The choices (`hamjax.backends.cpu.choices`) are decided per vector ISA (the JSON's `cpu_isa`:
avx2, avx512, avx512_on_256bit_pipes): run this on a quiet machine of each kind and record the
decision there. `decision` in the JSON says what the medians favour: `ynn_fusions` true if the
YNNPACK fusions beat the shipped step on most models, `conv_vjp` "xla" if XLA's VJP does,
`winograd` true if Winograd's wide convs do (where that variant ran), and for the canonical
VJP's own branches, where their variants ran, `activation_flip` and `strided_input_grad`
("phased", the shipped form, or "dilated").

Variants (`hamjax.backends.cpu.conv`, `hamjax.backends.cpu.compile_options`):
  canonical                  the AVX2 choice: custom transposes, the input gradient's spatial
                             reversal on the kernel, YNNPACK fusions off
  ynn_fusions                the same conv, compiled with XLA's default options (YNNPACK
                             fusions on where this jaxlib has them)
  canonical_activation_flip  the same, except that where the kernel outweighs the activations
                             (deep layers at small spatial size) the input gradient reverses the
                             activations and its result instead (patched in from here)
  canonical_dilated_input_grad  the same, except that a strided conv's input gradient is one
                             lhs-dilated conv (XLA's form, in the canonical layout) instead
                             of one stride-1 correlation per output phase (patched in)
  canonical_winograd         `model.conv_vjp='canonical_winograd'`: the canonical conv whose
                             3x3 stride-1 convs of at least `winograd.MIN_CHANNELS` channels
                             and `winograd.MIN_PIXELS` positions (forward and input gradient)
                             run as Winograd F(2x2, 3x3) (only PreAct-ResNet-18 has such convs)
  xla                        `model.conv_vjp='xla'`: XLA's own conv VJP, YNNPACK fusions off
                             (the CNNs only by default: on PreAct-ResNet-18 its backward convs
                             inside the PGD loop are the jax-ml/jax#12868 slow path)

benchmarks/results/conv_vjp_ab.json and conv_vjp_ab_resnet_8_repeats.json were taken while the
activation flip was still shipped: their `canonical` is today's canonical_activation_flip and
their `canonical_kernel_flip` today's canonical. Their per-repeat ratios (13 repeats, 0.85-1.36,
median ~0.98) showed no gain from the activation flip, so it was removed.

Each variant's step is compiled first (the reversal is chosen while tracing); then every repeat
times one step of each variant in turn, the order rotating per repeat, so that load on shared
cores hits all variants alike. Reported: per-variant median and all times, and the per-repeat
ratio of each variant to `canonical` (median; > 1: slower than canonical).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from json_output import emit  # benchmarks/ beside this file

from hamjax.backends.cpu import conv
from hamjax.backends.cpu.choices import cpu_choices
from hamjax.backends.cpu.compile_options import compiler_options, jit
from hamjax.backends.cpu.isa import cpu_isa
from hamjax.config import base_config, method_config, validate_config
from hamjax.methods import get_method
from hamjax.models import build_model
from hamjax.optim import make_lr_fn, make_optimizer
from hamjax.state import StepContext, create_train_state
from hamjax.train.step import make_train_step

NUM_CLASSES = 10
SHAPES = {"small_cnn": (28, 28, 1), "fmnist_cnn": (28, 28, 1), "preact_resnet18": (32, 32, 3)}
# name -> (model.conv_vjp, whether the input gradient may reverse the activations, YNNPACK on,
# whether a strided conv's input gradient is one lhs-dilated conv instead of one per phase)
VARIANTS = {
    "canonical": ("canonical", False, False, False),
    "ynn_fusions": ("canonical", False, True, False),
    "canonical_activation_flip": ("canonical", True, False, False),
    "canonical_dilated_input_grad": ("canonical", False, False, True),
    "canonical_winograd": ("canonical_winograd", False, False, False),
    "xla": ("xla", False, False, False),
}


def _kernel_outweighs(g_shape, w_shape, padding) -> bool:
    """Whether the kernel holds more elements than g and the correlation's result together."""
    out_hw = [n + lo + hi - k + 1 for n, (lo, hi), k in zip(g_shape[1:3], padding, w_shape[:2],
                                                            strict=True)]
    activations = g_shape[0] * g_shape[1] * g_shape[2] * w_shape[3]
    activations += g_shape[0] * out_hw[0] * out_hw[1] * w_shape[2]
    return w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3] > activations


def activation_flip_correlation(g, w, padding):
    """conv._transposed_correlation with corr(g, flip(w)) = flip(corr(flip(g), w)) (padding
    mirrored) where the kernel outweighs the activations."""
    w_io = jnp.swapaxes(w, 2, 3)
    if not _kernel_outweighs(g.shape, w.shape, padding):
        return conv._correlate(g, jnp.flip(w_io, (0, 1)), padding)
    mirrored = tuple((hi, lo) for lo, hi in padding)
    return jnp.flip(conv._correlate(jnp.flip(g, (1, 2)), w_io, mirrored), (1, 2))


def dilated_input_gradient(g, w, x_shape, strides, padding):
    """conv._input_gradient as XLA's own VJP computes it, in the canonical layout: one stride-1
    correlation of g dilated by the stride (zeros between its rows and columns) with the
    reversed, channel-swapped kernel, so (s^2 - 1)/s^2 of its multiplies fall on zeros."""
    pads = []
    for n, k, s, o, (lo, _) in zip(x_shape[1:3], w.shape[:2], strides, g.shape[1:3], padding,
                                   strict=True):
        pads.append((k - 1 - lo, n + lo - (o - 1) * s - 1))
    if min(min(pad) for pad in pads) < 0:
        raise ValueError(f"a negative padding {pads}: not a case this A/B's models have")
    return jax.lax.conv_general_dilated(g, jnp.flip(jnp.swapaxes(w, 2, 3), (0, 1)), (1, 1),
                                        pads, lhs_dilation=strides, dimension_numbers=conv._DN)


def cpu_description() -> dict[str, Any]:
    """Model name and the vector ISA flags that matter for conv kernels (Linux /proc/cpuinfo)."""
    info: dict[str, Any] = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["model_name"] = fields.get("model name")
    flags = set(fields.get("flags", "").split())
    info["isa"] = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")))
    return info


def make_step(model: str, conv_vjp: str, batch: int, ynn_fusions: bool = False):
    """(jitted PGD-AT train step, state) for `model` with `model.conv_vjp` = conv_vjp, compiled
    with XLA's default options if ynn_fusions, else with hamjax's."""
    config = base_config()
    config.model.name, config.model.conv_vjp = model, conv_vjp
    config.method = method_config("pgd_at")
    config.train.batch_size = batch
    config.train.lr_schedule = "constant"
    validate_config(config)
    config = ml_collections.FrozenConfigDict(config)
    shape = SHAPES[model]
    ctx = StepContext(
        model=build_model(config.model, NUM_CLASSES, shape), tx=make_optimizer(config.train),
        lr_fn=make_lr_fn(config.train, 1000), config=config, num_classes=NUM_CLASSES,
        class_counts=np.ones(NUM_CLASSES, np.int64), steps_per_epoch=1000, image_shape=shape)
    method = get_method("pgd_at")
    compile_with = jax.jit if ynn_fusions else jit
    return compile_with(make_train_step(ctx, method)), create_train_state(ctx, method, seed=0)


def ab(model: str, variants: list[str], batch: int, repeats: int) -> dict[str, Any]:
    shape = SHAPES[model]
    rs = np.random.RandomState(0)
    data = {"image": jnp.asarray(rs.rand(batch, *shape).astype(np.float32)),
            "label": jnp.asarray(rs.randint(0, NUM_CLASSES, batch).astype(np.int32)),
            "index": jnp.arange(batch, dtype=jnp.int32)}
    steps, compile_s = {}, {}
    for name in variants:
        conv_vjp, flips, ynn, dilated = VARIANTS[name]
        step, state = make_step(model, conv_vjp, batch, ynn)
        correlation = activation_flip_correlation if flips else conv._transposed_correlation
        input_gradient = dilated_input_gradient if dilated else conv._input_gradient
        with (mock.patch.object(conv, "_transposed_correlation", correlation),
              mock.patch.object(conv, "_input_gradient", input_gradient)):
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, data))  # traces (reversal chosen here), compiles
            compile_s[name] = round(time.perf_counter() - t0, 2)
        steps[name] = (step, state)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        for name in variants[r % len(variants):] + variants[:r % len(variants)]:
            step, state = steps[name]
            t0 = time.perf_counter()
            jax.block_until_ready(step(state, data))
            times[name].append(round(time.perf_counter() - t0, 4))
    return {
        "batch": batch, "input_shape": list(shape), "repeats": repeats,
        "first_call_seconds_incl_compile": compile_s,
        "seconds_per_step_median": {n: round(statistics.median(t), 4) for n, t in times.items()},
        "seconds_per_step_all": times,
        "ratio_to_canonical_median": {
            n: round(statistics.median(a / b for a, b in zip(t, times["canonical"], strict=True)),
                     4)
            for n, t in times.items() if n != "canonical"},
    }


def decision(results: dict[str, Any]) -> dict[str, Any]:
    """What the medians favour over the models measured: YNNPACK fusions on if they beat the
    shipped step on most models; XLA's conv VJP if it beats the canonical one on most models
    where it ran (None where a variant did not run)."""
    def favoured(variant: str) -> bool | None:
        ratios = [r["ratio_to_canonical_median"][variant] for r in results.values()
                  if variant in r["ratio_to_canonical_median"]]
        return None if not ratios else sum(x < 1 for x in ratios) > len(ratios) / 2

    ynn, xla, wino = favoured("ynn_fusions"), favoured("xla"), favoured("canonical_winograd")
    flip, dilated = favoured("canonical_activation_flip"), favoured("canonical_dilated_input_grad")
    return {"ynn_fusions": ynn, "conv_vjp": None if xla is None else ("xla" if xla else
                                                                      "canonical"),
            # the canonical VJP's branches (fixed in hamjax.backends.cpu.conv): None where the
            # variant that tests them did not run
            "activation_flip": flip,
            "strided_input_grad": None if dilated is None else ("dilated" if dilated else
                                                                "phased"),
            # Winograd for the wide 3x3 convs (conv_vjp "canonical_winograd" where true)
            "winograd": wino}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet_batch", type=int, default=16)
    parser.add_argument("--cnn_batch", type=int, default=64)
    parser.add_argument("--resnet_variants", nargs="+", default=["canonical", "ynn_fusions"])
    parser.add_argument("--cnn_variants", nargs="+", default=["canonical", "ynn_fusions", "xla"])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {
        "benchmark": "cpu_choices_ab",
        "cpu_isa": cpu_isa(),
        "shipped_choices": dataclasses.asdict(cpu_choices()),
        "machine": {**cpu_description(), "platform": platform.platform(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "compiler_options": compiler_options(),
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "note": ("the variants are interleaved within each repeat so that any load on the cores "
                 "hits them alike; compare the per-repeat ratios, and the load averages"),
        "step": "jitted PGD-AT train step (PGD-10 attack + update), random data, step 0 state",
        "results": {},
    }
    for model in args.models:
        resnet = model == "preact_resnet18"
        variants = args.resnet_variants if resnet else args.cnn_variants
        batch = args.resnet_batch if resnet else args.cnn_batch
        result["results"][model] = ab(model, variants, batch, args.repeats)
    result["decision"] = decision(result["results"])
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    emit(result, args.out, indent=2)


if __name__ == "__main__":
    main()
