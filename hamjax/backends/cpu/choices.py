"""The CPU-specific choices hamjax makes, decided per vector ISA by a recorded A/B.

Two choices change how XLA:CPU runs the same maths (same values up to float rounding):

- `ynn_fusions`: whether XLA may hand convolutions and dots to YNNPACK fusions (its default in
  recent jaxlibs) or keeps them on its Eigen kernels (`compile_options`);
- `conv_vjp`: whose convolution derivatives `model.conv_vjp="auto"` takes on the CPU: the
  library's canonical-layout VJP (`conv.canonical_conv`) or XLA's own;
- `winograd`: whether the canonical conv's wide 3x3 stride-1 convolutions (forward and input
  gradient) run as Winograd F(2x2, 3x3) (`winograd`), i.e. "auto" means "canonical_winograd".

Each row of `MEASURED` names the interleaved A/B (`benchmarks/cpu_choices_ab.py`) it was decided
by. On an ISA without a row hamjax keeps the AVX2 decisions and says so once: the A/B is a
few minutes' run, and its row belongs here. A user's explicit choice always wins
(`model.conv_vjp="xla"`/`"canonical"`, or `--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from hamjax.backends.cpu.isa import cpu_isa

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CpuChoices:
    """What hamjax does on one CPU ISA, and the measurement that decided it."""

    isa: str
    ynn_fusions: bool  # False: compile with YNNPACK fusions off (convs and dots on Eigen)
    conv_vjp: str  # "canonical" or "xla": what model.conv_vjp="auto" means on this CPU
    evidence: str  # the A/B's JSON in the repository; "" where nothing was measured
    measured: bool = True
    winograd: bool = False  # with conv_vjp "canonical": auto means "canonical_winograd"
    winograd_evidence: str = ""  # the A/B (canonical against canonical_winograd) that decided it


MEASURED: dict[str, CpuChoices] = {
    # AMD EPYC (Zen 3), 2 cores, jaxlib 0.10.2: the shipped canonical VJP with YNNPACK off
    # against YNNPACK's fusions and against XLA's VJP, interleaved, per model.
    "avx2": CpuChoices("avx2", ynn_fusions=False, conv_vjp="canonical",
                       evidence="benchmarks/results/cpu_choices_ab_avx2.json"),
    # AMD EPYC (Zen 4: AVX-512 on 256-bit pipes), 2 cores, jaxlib 0.10.2, the same A/B: the
    # canonical VJP with YNNPACK off wins on every model again (YNNPACK 1.17-1.64x slower, XLA's
    # VJP 1.83-1.94x on the CNNs).
    # Winograd F(2x2, 3x3) for PreAct-ResNet-18's 128-512-channel 3x3 convs: its PGD-AT step
    # 0.88x the canonical conv's time (not measured on AVX2, so off there).
    "avx512_on_256bit_pipes": CpuChoices(
        "avx512_on_256bit_pipes", ynn_fusions=False, conv_vjp="canonical",
        evidence="benchmarks/results/cpu_choices_ab_avx512_on_256bit_pipes.json",
        winograd=True,
        winograd_evidence="benchmarks/results/cpu_choices_ab_winograd_avx512_on_256bit_pipes.json"),
}
FALLBACK_ISA = "avx2"


@functools.cache
def choices_for(isa: str) -> CpuChoices:
    """The decisions for `isa`: its measured row, or the AVX2 row marked unmeasured (logged
    once, with the command that measures it)."""
    if isa in MEASURED:
        return MEASURED[isa]
    log.warning(
        "hamjax's CPU choices (YNNPACK fusions off, the canonical conv VJP) were measured on "
        "%s, not on this host's %s: they may be slower here. Measure them with `python "
        "benchmarks/cpu_choices_ab.py --out benchmarks/results/cpu_choices_ab_%s.json` and add "
        "the row to hamjax/backends/cpu/choices.py MEASURED; meanwhile model.conv_vjp='xla' and "
        "--xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS override them.",
        FALLBACK_ISA, isa, isa)
    return dataclasses.replace(MEASURED[FALLBACK_ISA], isa=isa, evidence="", measured=False,
                               winograd_evidence="")


def cpu_choices() -> CpuChoices:
    """The decisions for this host's ISA."""
    return choices_for(cpu_isa())
