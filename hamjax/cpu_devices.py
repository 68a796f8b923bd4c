"""One host device per CPU core: XLA:CPU keeps about one core busy per device, so splitting a
batch over several host devices is the CPU's data parallelism (docs/performance.md). Pure
functions of the setting and the environment: they must run before jax creates its CPU backend,
which reads XLA_FLAGS once."""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# XLA:CPU aborts the process when one host device reaches a collective 40 s before another (a
# guard against deadlock; the deadlock hamjax once hit is avoided in hamjax.train.dispatch). With
# more busy processes than cores a healthy device thread can lag that long, so wait 5 minutes:
# still a prompt failure (and a resumable run) if a real deadlock ever happens.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_TIMEOUT_SECONDS = 300


def cpu_device_count(setting: str, cores: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """Host devices for a CPU run: `setting` as a number, or for 'auto' the largest count up to
    `cores` that divides every batch size (each device gets whole rows)."""
    if setting != "auto":
        try:
            count = int(setting)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"--cpu_devices={setting!r}: give 'auto' or a count >= 1")
        return count
    sizes = [b for b in batch_sizes if b > 0]  # a bad size is reported by config validation
    return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in sizes))


def with_cpu_devices(xla_flags: str, count: int) -> str:
    """XLA_FLAGS asking for `count` host devices, unless the user already set a count, and for a
    patient collective timeout whenever there are several (unless the user set one)."""
    if DEVICE_COUNT_FLAG not in xla_flags and count > 1:
        xla_flags = f"{xla_flags} {DEVICE_COUNT_FLAG}={count}".strip()
    if DEVICE_COUNT_FLAG in xla_flags and COLLECTIVE_TIMEOUT_FLAG not in xla_flags:
        xla_flags = f"{xla_flags} {COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_SECONDS}"
    return xla_flags


def use_cpu_devices(setting: str, batch_sizes: tuple[int, ...] = ()) -> int:
    """Sets XLA_FLAGS for `setting` on this machine's cores; returns the count asked for. Call
    before anything touches a jax device, and only for a run on the CPU backend
    (hamjax.accelerators.runs_on_cpu): jax creates host devices on GPU/TPU machines too."""
    count = cpu_device_count(setting, len(os.sched_getaffinity(0)), batch_sizes)
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), count)
    return count


def setting_from_argv(argv: list[str], flag: str = "--cpu_devices") -> str | None:
    """`flag`'s value in argv (`--flag=V` or `--flag V`), for scripts that must set XLA_FLAGS
    before their argument parser runs (the parser may come after `import jax`)."""
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None
