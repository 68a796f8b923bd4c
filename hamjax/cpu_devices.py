"""One host device per CPU core: XLA:CPU keeps about one core busy per device, so splitting a
batch over several host devices is the CPU's data parallelism (measured in the README). Pure
functions of the setting and the environment: they must run before jax creates its CPU backend,
which reads XLA_FLAGS once."""

from __future__ import annotations

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_count(setting: str, cores: int, batch_sizes: tuple[int, ...] = ()) -> int:
    """Host devices for a CPU run: `setting` as a number, or for 'auto' the largest count up to
    `cores` that divides every batch size (each device gets whole rows)."""
    if setting != "auto":
        count = int(setting)
        if count < 1:
            raise ValueError(f"--cpu_devices={setting!r}: give 'auto' or a count >= 1")
        return count
    sizes = [b for b in batch_sizes if b > 0]  # a bad size is reported by config validation
    return max(n for n in range(1, max(cores, 1) + 1) if all(b % n == 0 for b in sizes))


def with_cpu_devices(xla_flags: str, count: int) -> str:
    """XLA_FLAGS asking for `count` host devices, unless the user already set a count."""
    if DEVICE_COUNT_FLAG in xla_flags or count <= 1:
        return xla_flags
    return f"{xla_flags} {DEVICE_COUNT_FLAG}={count}".strip()


def use_cpu_devices(setting: str, batch_sizes: tuple[int, ...] = ()) -> int:
    """Sets XLA_FLAGS for `setting` on this machine's cores (no effect on GPU/TPU backends);
    returns the count asked for. Call before anything touches a jax device."""
    count = cpu_device_count(setting, len(os.sched_getaffinity(0)), batch_sizes)
    os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), count)
    return count
