"""launch.py in a child process, and reading what its runs left on disk (shared by the resume,
run-safety and multi-host tests)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def launch(config_path, workdir, *overrides: str, cache_dir=None,
           stdout=subprocess.DEVNULL, cpu_devices: int | None = None) -> subprocess.Popen:
    """`python launch.py --config=... --workdir=... overrides...` with stderr piped.

    cache_dir: a shared persistent compilation cache, so later launches skip compiling the same
    steps. cpu_devices: force that many host devices (default: the launcher's one per core).
    """
    env = dict(os.environ)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    flags = env.get("XLA_FLAGS", "")
    if cpu_devices is not None and DEVICE_COUNT_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={cpu_devices}".strip()
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "launch.py"), f"--config={config_path}",
         f"--workdir={workdir}", *overrides],
        cwd=REPO, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True,
    )


def saved_steps(workdir) -> list[int]:
    """Steps of the complete periodic checkpoints in a workdir (orbax renames a save into place
    only once it is complete)."""
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def run_on_host_devices(script_text: str, tmp_path, devices: int, *args: str,
                        timeout: float = 900) -> str:
    """Runs `script_text` as a child Python process on `devices` forced host CPU devices (the
    flag must be set before jax starts, hence a child); asserts it exits cleanly and returns
    its stdout, where the child prints one "... ok" line per check that passed."""
    script = tmp_path / "child.py"
    script.write_text(script_text)
    flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={devices}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout
