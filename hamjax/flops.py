"""FLOP accounting for speed benchmarks: XLA's count of a compiled step, achieved FLOP/s, and the
fraction of the device's peak for the step's dtype.

A throughput number alone cannot say whether a step is fast: "74 ms a step" is near the chip's
limit for one model and a tenth of it for another. FLOP/s over a known peak is the utilisation.

Two counts, because XLA's alone is wrong for adversarial training: XLA's cost analysis
(`compiled_flops`) counts the body of a `while` loop ONCE, whatever its trip count, so a PGD-10
step's ten attack iterations count as one (a 10-trip `fori_loop` of a matmul reports the FLOPs
of one matmul: tests/test_flops.py). `jaxpr_flops` counts the convolutions and matmuls of the
traced program (2 FLOPs a multiply-add, padding taps included as PyTorch counters do), times the
trip count of every `scan` and static `fori_loop`; a data-dependent `while_loop` counts once and
is reported, and a `cond`/`switch` counts its most expensive branch (HAM's buckets: an upper
bound). Benchmarks report both and use the jaxpr count for FLOP/s.

Peaks are dense (no structured sparsity), per chip, from the vendors' data sheets:
- NVIDIA A100 (SXM/PCIe): FP32 19.5 TFLOP/s, TF32 156, BF16 312 (NVIDIA A100 data sheet).
- NVIDIA H100 SXM: FP32 67, TF32 494.7, BF16 989.4; H100 PCIe: FP32 51, TF32 378, BF16 756
  (NVIDIA H100 data sheet; its table quotes TF32/BF16 with sparsity, twice these).
- NVIDIA H200 (SXM): the H100 SXM's compute, FP32 67, TF32 494.7, BF16 989.4 (NVIDIA H200
  data sheet, same halving).
- Google TPU v4: BF16 275 a chip; v5e ("TPU v5 lite"): BF16 197; v5p ("TPU v5"): BF16 459
  (Cloud TPU system architecture pages).
- CPU: cores x clock x FLOPs a cycle a core (FP32 FMA lanes x 2 x FMA pipes): AVX2 with two
  256-bit FMA pipes (Zen 2/3/4, Haswell and later) 32; AVX-512 with two 512-bit FMA pipes
  (Skylake-SP and later Xeons, Zen 5) 64. Zen 4 runs AVX-512 on its 256-bit pipes: 32. The clock
  is the one /proc/cpuinfo reports now (boost varies), so the CPU fraction is an estimate.

float32 on NVIDIA GPUs: XLA's default precision runs float32 convolutions and matmuls on TF32
tensor cores (Ampere and later), so the TF32 peak is float32's unless
`jax_default_matmul_precision` asks for "highest"/"float32". On TPUs the default precision runs
float32 matmuls as one bfloat16 pass, so bfloat16's peak applies to both.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.extend.core as jex_core

from hamjax.backends.cpu.conv import canonical_conv_p
from hamjax.backends.cpu.isa import cpu_flags, cpu_isa

# device-kind prefix -> {"fp32", "tf32", "bf16"} dense TFLOP/s per chip. Longer (more specific)
# prefixes are tried first.
GPU_TPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "NVIDIA H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "NVIDIA H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "NVIDIA H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "TPU v4": {"bf16": 275.0},
    "TPU v5 lite": {"bf16": 197.0},
    "TPU v5e": {"bf16": 197.0},
    "TPU v5p": {"bf16": 459.0},
    "TPU v5": {"bf16": 459.0},
}
# FP32 FLOPs a cycle a core by vector ISA (two FMA pipes; 2 FLOPs an FMA).
CPU_FLOPS_PER_CYCLE = {"avx512": 64, "avx512_on_256bit_pipes": 32, "avx2": 32, "sse": 8}


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled jit (`jax.jit(f).lower(...).compile()`), from XLA's
    cost analysis; None where the backend reports none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends/plugins do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _conv_flops(eqn) -> float:
    """2 x output elements x (kernel taps x input channels a group)."""
    out = eqn.outvars[0].aval
    rhs = eqn.invars[1].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
    taps = 1
    for d in rhs_spec[2:]:
        taps *= rhs.shape[d]
    in_per_group = rhs.shape[rhs_spec[1]]
    out_elems = 1
    for d in out.shape:
        out_elems *= d
    return 2.0 * out_elems * taps * in_per_group


def _hwio_conv_flops(eqn) -> float:
    """hamjax's CPU conv primitive (NHWC x HWIO, no groups): 2 x output elements x kh kw cin."""
    kh, kw, cin, _ = eqn.invars[1].aval.shape
    out_elems = 1
    for d in eqn.outvars[0].aval.shape:
        out_elems *= d
    return 2.0 * out_elems * kh * kw * cin


def _dot_flops(eqn) -> float:
    """2 x output elements x contracted size."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    contracted = 1
    for d in lhs_contract:
        contracted *= lhs.shape[d]
    out_elems = 1
    for d in eqn.outvars[0].aval.shape:
        out_elems *= d
    return 2.0 * out_elems * contracted


def _sub_jaxprs(value: Any) -> list:
    """The jaxprs held in one equation parameter (a jaxpr, a closed jaxpr or a tuple of them)."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    found = []
    for item in items:
        if isinstance(item, jex_core.ClosedJaxpr):
            found.append(item.jaxpr)
        elif isinstance(item, jex_core.Jaxpr):
            found.append(item)
    return found


def _count(jaxpr, notes: set[str]) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == canonical_conv_p.name:
            total += _hwio_conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _count(eqn.params["jaxpr"].jaxpr, notes)
        elif name == "while":
            notes.add("while_loop counted once (trip count unknown when traced)")
            total += _count(eqn.params["body_jaxpr"].jaxpr, notes)
            total += _count(eqn.params["cond_jaxpr"].jaxpr, notes)
        elif name == "shard_map":  # the body sees one device's shard: count it on each device
            mesh = eqn.params["mesh"]
            total += mesh.size * _count(eqn.params["jaxpr"], notes)
        elif name == "cond":
            notes.add("cond/switch counted as its most expensive branch")
            total += max(_count(b.jaxpr, notes) for b in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += _count(sub, notes)
    return total


def jaxpr_flops(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, list[str]]:
    """(FLOPs of convolutions and matmuls in one call of fn(*args), notes on what was bounded).

    fn may be jitted; args may be arrays or `jax.ShapeDtypeStruct`s. Loops with a static trip
    count (scan, fori_loop with Python-int bounds) are multiplied out.
    """
    # a jit with compiler_options refuses to be traced inside another trace: count its function
    fn = getattr(fn, "__wrapped__", fn)
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs).jaxpr
    notes: set[str] = set()
    try:  # drop what no output needs, as XLA will (e.g. a custom VJP's unused weight gradient)
        from jax._src.interpreters.partial_eval import dce_jaxpr

        jaxpr, _ = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    except (ImportError, AttributeError, TypeError):
        notes.add("no dead-code elimination in this jax: unused branches counted")
    return _count(jaxpr, notes), sorted(notes)


def cpu_peak_flops(cores: int | None = None) -> float | None:
    """FP32 peak of this host's CPU (bfloat16 has no faster path on these ISAs)."""
    _, _, ghz = cpu_flags()
    if ghz is None:
        return None
    cores = cores or len(os.sched_getaffinity(0))
    return cores * ghz * 1e9 * CPU_FLOPS_PER_CYCLE[cpu_isa()]


def _precision_column(dtype: str) -> str:
    if dtype == "bfloat16":
        return "bf16"
    precision = str(jax.config.jax_default_matmul_precision or "").lower()
    return "fp32" if precision in ("highest", "float32") else "tf32"


def device_peak_flops(device: Any, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for `dtype` at the current matmul precision, which peak)."""
    if device.platform == "cpu":
        return cpu_peak_flops(), f"cpu {cpu_isa()} fp32"
    kind = str(getattr(device, "device_kind", ""))
    for prefix in sorted(GPU_TPU_PEAK_TFLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            peaks = GPU_TPU_PEAK_TFLOPS[prefix]
            column = _precision_column(dtype) if "fp32" in peaks else "bf16"
            return peaks[column] * 1e12, f"{prefix} {column}"
    return None, f"unknown device kind {kind!r}"


def flop_report(flops: float | None, seconds: float, dtype: str,
                devices: list | None = None, *, xla_flops: float | None = None,
                notes: list[str] | None = None) -> dict[str, Any]:
    """JSON-able FLOP fields for a benchmark cell: FLOPs a call (the jaxpr count; XLA's beside
    it), achieved FLOP/s, the peak of the devices the call ran on and the fraction of it."""
    devices = devices or jax.local_devices()[:1]
    report: dict[str, Any] = {"flops_per_call": flops, "xla_cost_analysis_flops": xla_flops,
                              "flop_count_notes": notes or [], "dtype": dtype}
    if flops is None or seconds <= 0:
        return report
    achieved = flops / seconds
    if devices[0].platform == "cpu":
        # host devices share the host's cores: the host's peak, not one per fake device
        peak, which = device_peak_flops(devices[0], dtype)
    else:
        peak, which = device_peak_flops(devices[0], dtype)
        peak = peak * len(devices) if peak else None
    report.update(achieved_flops_per_s=achieved, peak_flops_per_s=peak, peak_source=which,
                  fraction_of_peak=(achieved / peak) if peak else None)
    return report
