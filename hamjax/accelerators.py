"""Which accelerators a process can see, which of them jax uses, and a refusal when some sit idle.

Under SLURM and Open MPI, `jax.distributed.initialize()` gives each process the one GPU of its
local rank: a one-task-per-node launch then trains on one GPU of eight and looks healthy. The
launcher therefore counts the accelerators of the machine without asking jax (the driver's device
list, narrowed by CUDA_VISIBLE_DEVICES or TPU_VISIBLE_CHIPS), compares them with the devices the
processes of this host put into the mesh, and stops unless they match. Pure functions of the
environment and the file system, so that they are tested without the hardware.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence

NVIDIA_GPUS = "/proc/driver/nvidia/gpus/*"  # one folder per GPU the driver knows
TPU_CHIPS = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # v2-v4 chips; v5e/v6e chips (vfio)


def _count_listed(value: str) -> int:
    """Entries of a comma-separated device list ('' or '-1' hides every device)."""
    items = [v for v in (x.strip() for x in value.split(",")) if v]
    return 0 if items in ([], ["-1"]) else len(items)


def visible_gpus(environ: Mapping[str, str], pattern: str = NVIDIA_GPUS) -> int:
    """NVIDIA GPUs this process may use: CUDA_VISIBLE_DEVICES when it is set (SLURM sets it to
    the job's GPUs), else every GPU the driver lists."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return _count_listed(environ["CUDA_VISIBLE_DEVICES"])
    return len(glob.glob(pattern))


def visible_tpu_chips(environ: Mapping[str, str], patterns: Sequence[str] = TPU_CHIPS) -> int:
    """TPU chips of this VM (TPU_VISIBLE_CHIPS narrows them, as libtpu reads it)."""
    if environ.get("TPU_VISIBLE_CHIPS"):
        return _count_listed(environ["TPU_VISIBLE_CHIPS"])
    return max((len(glob.glob(p)) for p in patterns), default=0)


def visible_accelerators(platform: str, environ: Mapping[str, str] | None = None) -> int | None:
    """Accelerators of `platform` ('gpu', 'tpu') this process can see; None for a platform this
    does not know how to count (the check is then skipped)."""
    environ = os.environ if environ is None else environ
    if platform == "gpu":
        return visible_gpus(environ)
    if platform == "tpu":
        return visible_tpu_chips(environ)
    return None


GPU_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")
TPU_PLUGINS = ("libtpu",)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def runs_on_cpu(environ: Mapping[str, str] | None = None,
                installed: Callable[[str], bool] = _installed) -> bool:
    """Whether jax will pick its CPU backend: JAX_PLATFORMS says so, or it names none and the
    machine shows no GPU or TPU that an installed jax plugin could drive (a GPU machine with the
    CPU-only jax trains on the CPU). --cpu_devices acts only then."""
    environ = os.environ if environ is None else environ
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    gpu = visible_gpus(environ) > 0 and any(installed(m) for m in GPU_PLUGINS)
    tpu = visible_tpu_chips(environ) > 0 and any(installed(m) for m in TPU_PLUGINS)
    return not (gpu or tpu)


def parse_local_device_ids(setting: str | None) -> list[int] | str | None:
    """--local_device_ids: None or 'auto' (jax's choice: under SLURM/Open MPI one GPU per
    process, its local rank), 'all' (every GPU this process sees: one process per node), or
    comma-separated ids. Raises ValueError naming the flag."""
    if setting is None or setting.strip() in ("", "auto"):
        return None
    if setting.strip() == "all":
        return "all"
    try:
        ids = [int(x) for x in setting.split(",")]
    except ValueError:
        ids = []
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"--local_device_ids={setting!r}: give 'auto', 'all' or distinct "
                         "device numbers such as 0,1,2,3")
    return ids


def resolve_local_device_ids(choice: list[int] | str | None, gpus: int) -> list[int] | None:
    """The `local_device_ids` argument of jax.distributed.initialize for a parsed choice:
    'all' becomes 0..gpus-1 (None where no GPU is visible: jax then uses every device)."""
    if choice == "all":
        return list(range(gpus)) if gpus > 0 else None
    return choice  # None or explicit ids


def mesh_devices(devices: Sequence, per_process: int | None) -> list:
    """The first `per_process` devices of every process, in jax.devices() order (all of them
    for None): the same list on every process, as a multi-process mesh needs."""
    if per_process is None:
        return list(devices)
    taken: dict[int, int] = {}
    chosen = []
    for device in devices:
        owner = device.process_index
        if taken.get(owner, 0) < per_process:
            taken[owner] = taken.get(owner, 0) + 1
            chosen.append(device)
    return chosen


def first_idle_host(rows: Sequence[tuple[int, int, int]]) -> tuple[int, int] | None:
    """(devices used, accelerators visible) of the first machine whose processes leave some of
    its accelerators idle, else None. rows: one (machine key, devices this process puts into the
    mesh, accelerators it sees or -1 when unknown) per process; processes of one machine share
    its accelerators (one process per GPU), so their used devices add up."""
    used: dict[int, int] = {}
    visible: dict[int, int] = {}
    for key, n_used, n_visible in rows:
        used[key] = used.get(key, 0) + n_used
        visible[key] = max(visible.get(key, -1), n_visible)
    for key in used:
        if visible[key] >= 0 and used[key] < visible[key]:
            return used[key], visible[key]
    return None


def layout_line(processes: int, local: int, total: int, platform: str, kind: str) -> str:
    """The start-up line saying what the run trains on."""
    plural = "es" if processes != 1 else ""
    return (f"devices: {processes} process{plural} x {local} local {platform} device(s) = "
            f"{total} global ({kind})")


def idle_devices_message(used: int, visible: int, platform: str) -> str:
    """The refusal when a machine's processes use fewer accelerators than it has."""
    idle = f"{visible - used} would sit idle"
    if platform == "cpu":
        return (f"this process has {visible} CPU devices but puts {used} into the mesh: {idle}. "
                "Fix: drop --mesh_devices (or use --cpu_devices to choose the device count); or "
                "pass --allow_idle_devices to run anyway")
    return (f"a host has {visible} {platform.upper()} device(s) but the run's processes there "
            f"put {used} into the mesh: {idle}. Fix: one process per node with "
            "--local_device_ids=all, or one process per device (srun --ntasks-per-node=<devices "
            "per node>), and no --mesh_devices below the device count; or pass "
            "--allow_idle_devices to run anyway")
