"""Interleaved A/B of the ways XLA:CPU can run PreAct-ResNet-18's 3x3 convolutions, on this host.

    python benchmarks/conv_kernels_ab.py --out benchmarks/results/conv_kernels_ab_$ISA.json

Why: on an AVX-512 host eager PyTorch's oneDNN kernels can outrun the jitted ResNet step, whose
time is nearly all convolution. This measures, per stage of the ResNet (batch 32, stride 1),
the forward convolution and the weight gradient (`hamjax.backends.cpu.conv`'s canonical form)
in each form XLA:CPU offers:

  eigen        XLA's convolution on its Eigen kernels (hamjax's choice: YNNPACK off)
  ynn_conv     the same convolution handed to YNNPACK (fusion type individual_convolution)
  onednn       the same convolution with XLA's oneDNN options on (`xla_cpu_use_onednn`, and
               the oneDNN fusion type for convolutions); `hlo_rewritten` says whether they
               changed the compiled program at all
  dots_eigen   nine shifted matrix products (one per kernel tap) on Eigen's GEMM
  dots_ynn     the same products handed to YNNPACK (fusion type individual_dot)
  im2col_ynn   one matrix product over the 9x patch matrix, on YNNPACK
  winograd     Winograd F(2x2, 3x3) (`hamjax.backends.cpu.winograd`): 16 matrix products of
               a quarter of the pixels each on Eigen, 2.25x fewer multiplies (the forward and
               the input gradient, which is a 3x3 stride-1 correlation itself; the weight
               gradient stays on `eigen`)

The input gradient (`input_gradient`) is timed as the canonical conv computes it: `eigen` is
its correlation with the reversed kernel, `winograd` the same by F(2x2, 3x3) (its thresholds
lifted). The stages where `winograd` beats `eigen` in both set `winograd.MIN_CHANNELS`, and the
same at a small --batch `winograd.MIN_PIXELS`.

Every form is compiled first; then each repeat times one call of every form in turn, the order
rotating per repeat, each call after a 0.2 s pause (`SETTLE_SECONDS`: YNNPACK's threads spin
after its calls and would slow whichever form runs next). Reported: median ms, GFLOP/s, and
the per-repeat ratio to `eigen`. GFLOP/s count a direct conv's multiplies for every form, so
Winograd's is an effective rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from json_output import emit  # benchmarks/ beside this file

from hamjax.backends.cpu import conv, winograd
from hamjax.backends.cpu.isa import cpu_isa
from hamjax.flops import device_peak_flops

EIGEN = {"xla_cpu_experimental_ynn_fusion_type": ""}
YNN_CONV = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
YNN_DOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
ONEDNN = {**EIGEN, "xla_cpu_use_onednn": True,
          "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
# YNNPACK's worker threads spin for a while after its calls: without a pause the Eigen form timed
# right after a YNNPACK form measured up to 2x slower than the same program elsewhere.
SETTLE_SECONDS = 0.2
STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))  # (spatial size, channels) at batch 32
_DN = ("NHWC", "HWIO", "NHWC")


def _taps(x: jax.Array):
    """The nine shifted views of x padded by one: the operand of each 3x3 kernel tap."""
    _, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def forward_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)


def forward_dots(x, w):
    taps = _taps(x)
    return sum(jnp.einsum("nhwc,cd->nhwd", t, w[k // 3, k % 3]) for k, t in enumerate(taps))


def forward_im2col(x, w):
    n, h, width, c = x.shape
    cols = jnp.concatenate(_taps(x), -1).reshape(-1, 9 * c)
    return (cols @ w.reshape(9 * c, -1)).reshape(n, h, width, -1)


def forward_winograd(x, w):
    return winograd.winograd_conv3x3(x, w)


def input_grad_conv(g, w, use_winograd=False):
    """The canonical conv's input gradient of a 3x3 stride-1 same-padded conv."""
    return conv._input_gradient(g, w, g.shape[:3] + (w.shape[2],), (1, 1), ((1, 1), (1, 1)),
                                use_winograd)


def input_grad_winograd(g, w):
    with mock.patch.multiple(winograd, MIN_CHANNELS=1, MIN_PIXELS=1):  # to find the thresholds
        return input_grad_conv(g, w, use_winograd=True)


def weight_grad_conv(x, g):
    return conv._weight_gradient(g, x, (3, 3, x.shape[-1], g.shape[-1]), (1, 1),
                                 ((1, 1), (1, 1)))


def weight_grad_dots(x, g):
    grads = [jnp.einsum("nhwc,nhwd->cd", t, g) for t in _taps(x)]
    return jnp.stack(grads).reshape(3, 3, x.shape[-1], g.shape[-1])


def weight_grad_im2col(x, g):
    c = x.shape[-1]
    cols = jnp.concatenate(_taps(x), -1).reshape(-1, 9 * c)
    return (cols.T @ g.reshape(-1, g.shape[-1])).reshape(3, 3, c, -1)


FORMS: dict[str, dict[str, tuple[Callable, dict[str, Any]]]] = {
    "forward": {"eigen": (forward_conv, EIGEN), "ynn_conv": (forward_conv, YNN_CONV),
                "onednn": (forward_conv, ONEDNN), "dots_eigen": (forward_dots, EIGEN),
                "dots_ynn": (forward_dots, YNN_DOT), "im2col_ynn": (forward_im2col, YNN_DOT),
                "winograd": (forward_winograd, EIGEN)},
    "input_gradient": {"eigen": (input_grad_conv, EIGEN),
                       "winograd": (input_grad_winograd, EIGEN)},
    "weight_gradient": {"eigen": (weight_grad_conv, EIGEN),
                        "ynn_conv": (weight_grad_conv, YNN_CONV),
                        "onednn": (weight_grad_conv, ONEDNN),
                        "dots_eigen": (weight_grad_dots, EIGEN),
                        "dots_ynn": (weight_grad_dots, YNN_DOT),
                        "im2col_ynn": (weight_grad_im2col, YNN_DOT)},
}


def stage_ab(op: str, size: int, channels: int, batch: int, repeats: int,
             forms: list[str] | None = None, settle: float = SETTLE_SECONDS) -> dict[str, Any]:
    """One op at one ResNet stage: every form compiled, checked against `eigen`, timed
    interleaved."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(batch, size, size, channels).astype(np.float32))
    second = (rs.randn(3, 3, channels, channels) * 0.05 if op != "weight_gradient"
              else rs.randn(batch, size, size, channels))
    second = jnp.asarray(second.astype(np.float32))
    compiled, texts, outs = {}, {}, {}
    for name, (fn, options) in FORMS[op].items():
        if forms and name not in forms and name != "eigen":
            continue
        c = jax.jit(fn, compiler_options=options).lower(x, second).compile()
        compiled[name], texts[name] = c, c.as_text()
        outs[name] = np.asarray(c(x, second))
    scale = float(np.max(np.abs(outs["eigen"])))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    names = list(compiled)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(settle)
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[name](x, second))
            times[name].append(time.perf_counter() - t0)
    flops = 2 * batch * size * size * channels * channels * 9
    return {
        "gflop": round(flops / 1e9, 3),
        "ms_median": {n: round(1e3 * statistics.median(t), 2) for n, t in times.items()},
        "gflop_per_s": {n: round(flops / statistics.median(t) / 1e9, 1)
                        for n, t in times.items()},
        "ratio_to_eigen_median": {
            n: round(statistics.median(a / b for a, b in zip(t, times["eigen"], strict=True)), 3)
            for n, t in times.items() if n != "eigen"},
        "max_relative_difference_to_eigen": {
            n: float(np.max(np.abs(o - outs["eigen"])) / scale) for n, o in outs.items()},
        **({"onednn_hlo_rewritten": _body(texts["onednn"]) != _body(texts["eigen"])}
           if "onednn" in texts else {}),
    }


def _body(hlo_text: str) -> list[str]:
    """The compiled program's instructions without metadata (what the options could change)."""
    return [line.split(", metadata=")[0] for line in hlo_text.splitlines()
            if " = " in line and "ENTRY" not in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ops", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--forms", nargs="+", default=None,
                        help="only these forms beside eigen (default: every form of each op)")
    parser.add_argument("--settle_seconds", type=float, default=SETTLE_SECONDS,
                        help="pause before every call (for YNNPACK's spinning threads); 0 "
                             "times the calls back to back, as a train step runs its convs, "
                             "which suits forms of many small ops (winograd) without YNNPACK")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    isa = cpu_isa()
    peak, peak_source = device_peak_flops(jax.devices()[0], "float32")
    result: dict[str, Any] = {
        "benchmark": "conv_kernels_ab", "cpu_isa": isa,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__,
                    "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "peak_gflop_per_s": None if peak is None else round(peak / 1e9, 1),
        "peak_source": peak_source,
        "note": "PreAct-ResNet-18's 3x3 stride-1 convolutions, batch and stage as named; each "
                "repeat times every form once, in rotating order, each call after a "
                f"{args.settle_seconds} s pause",
        "results": {},
    }
    for op in args.ops:
        for size, channels in STAGES:
            key = f"{op}/{size}x{size}x{channels}"
            result["results"][key] = stage_ab(op, size, channels, args.batch, args.repeats,
                                              args.forms, args.settle_seconds)
            print(f"# {key}: {result['results'][key]['ms_median']}", flush=True)
    result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    emit(result, args.out)


if __name__ == "__main__":
    main()
