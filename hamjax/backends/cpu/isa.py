"""This host's CPU as XLA:CPU sees it: vector ISA and clock, read from /proc/cpuinfo.

The CPU-specific choices (`hamjax.backends.cpu.choices`) are decided per ISA, and the benchmarks
record it beside every CPU number, because a choice measured on an AVX2 core need not hold on an
AVX-512 one.
"""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> tuple[frozenset[str], int | None, float | None]:
    """(ISA flags, AMD CPU family or None, clock in GHz or None) from /proc/cpuinfo."""
    flags: frozenset[str] = frozenset()
    family, mhz, vendor = None, None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "flags" and not flags:
                    flags = frozenset(value.split())
                elif key == "cpu family" and family is None:
                    family = int(value)
                elif key == "cpu MHz" and mhz is None:
                    mhz = float(value)
                elif key == "vendor_id" and not vendor:
                    vendor = value
    except (OSError, ValueError):
        pass
    return flags, (family if vendor == "AuthenticAMD" else None), (mhz / 1e3 if mhz else None)


def isa_of(flags: frozenset[str] | set[str], amd_family: int | None) -> str:
    """avx512, avx512_on_256bit_pipes (AMD Zen 4), avx2 or sse, for these cpuinfo flags."""
    if "avx512f" in flags:
        return "avx512_on_256bit_pipes" if amd_family == 25 else "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return "sse"


def cpu_isa() -> str:
    """The vector ISA XLA:CPU can use on this host (see `isa_of`)."""
    flags, amd_family, _ = cpu_flags()
    return isa_of(flags, amd_family)
