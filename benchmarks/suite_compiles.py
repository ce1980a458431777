"""Where the test suite's time goes: a pytest plugin counting XLA compiles per test.

    PYTHONPATH=benchmarks python -m pytest -p suite_compiles -n 2 tests
    python benchmarks/suite_compiles.py            # the summary of the last run's files

Each test process writes ``suite_compiles_<worker>.json`` (in ``$SUITE_COMPILES_DIR``, default the
system temp folder): one row per test's call phase ``[nodeid, compiles, compile_s, wall_s, cpu_s]``,
from jax.monitoring's ``/jax/core/compile/backend_compile_duration`` events (a compile that hits a
cache is not counted) and the process's CPU time. The summary lists the files and the tests with
the most compiles: many compiles in one test is usually a layer called op by op (eagerly) instead
of under ``jax.jit`` / ``nnx.jit``.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tempfile
import time

import pytest

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_count = {"compiles": 0, "seconds": 0.0}
_rows: list = []


def _folder() -> str:
    return os.environ.get("SUITE_COMPILES_DIR", tempfile.gettempdir())


def pytest_configure(config):
    from jax import monitoring

    def on_duration(event, seconds, **_):
        if event == COMPILE_EVENT:
            _count["compiles"] += 1
            _count["seconds"] += seconds

    monitoring.register_event_duration_secs_listener(on_duration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    compiles, seconds, t0, cpu0 = _count["compiles"], _count["seconds"], time.perf_counter(), os.times()
    yield
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) + (cpu1.children_user - cpu0.children_user)
    _rows.append([item.nodeid, _count["compiles"] - compiles, round(_count["seconds"] - seconds, 2),
                  round(time.perf_counter() - t0, 2), round(cpu, 2)])


def pytest_unconfigure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if _rows:
        with open(os.path.join(_folder(), f"suite_compiles_{worker}.json"), "w") as f:
            json.dump(_rows, f)


def summary(rows: list, most: int = 25) -> str:
    per_file = collections.defaultdict(lambda: [0, 0, 0.0, 0.0, 0.0])  # tests, compiles, compile s, wall s, cpu s
    for nodeid, compiles, compile_s, wall_s, cpu_s in rows:
        f = per_file[nodeid.split("::")[0]]
        f[0] += 1
        f[1] += compiles
        f[2] += compile_s
        f[3] += wall_s
        f[4] += cpu_s
    lines = [f"{len(rows)} tests, {sum(r[1] for r in rows)} compiles, {sum(r[2] for r in rows):.0f} s compiling "
             f"in {sum(r[3] for r in rows):.0f} s of test calls", "", "file: tests compiles compile_s wall_s cpu_s"]
    for name, (n, c, cs, ws, cpu) in sorted(per_file.items(), key=lambda kv: -kv[1][3])[:most]:
        lines.append(f"{name:40s} {n:5d} {c:7d} {cs:8.0f} {ws:7.0f} {cpu:7.0f}")
    lines += ["", "tests with the most compiles: compiles compile_s wall_s"]
    for nodeid, compiles, compile_s, wall_s, _ in sorted(rows, key=lambda r: -r[1])[:most]:
        lines.append(f"{compiles:6d} {compile_s:7.1f} {wall_s:7.1f}  {nodeid}")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = []
    for path in sorted(glob.glob(os.path.join(_folder(), "suite_compiles_*.json"))):
        with open(path) as f:
            rows += json.load(f)
    print(summary(rows) if rows else f"no suite_compiles_*.json in {_folder()}: run the suite with -p suite_compiles")
