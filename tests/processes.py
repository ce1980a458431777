"""Local multi-process runs for the multi-host tests: bounded waits, no stray children."""

import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the jax.distributed coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(devices_per_process: int) -> dict[str, str]:
    """This environment, with CPU only, N emulated devices and the repo on PYTHONPATH."""
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_all(commands: list[list[str]], env: dict[str, str], timeout_s: float) -> list[tuple[int, str]]:
    """Start every command, wait for each at most ``timeout_s``, kill what still runs.

    Returns (return code, combined stdout/stderr) per command. Raises
    ``subprocess.TimeoutExpired`` on a hang, after killing only our own children.
    """
    procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:  # only our own children, by handle
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return [(p.returncode, log) for p, log in zip(procs, logs)]
