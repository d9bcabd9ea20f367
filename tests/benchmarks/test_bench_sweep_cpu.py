"""benchmarks/bench_sweep_cpu.py's CPU accounting, on a process of known cost: what it reports per
process is what that process burned, and the machine's busy CPU covers it."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

BURN = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\ntime.sleep(0.5)"


def test_process_cpu_counts_a_burning_process_by_pid_and_title(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling bench_sweep
    bench = importlib.import_module("bench_sweep_cpu")
    busy_before = bench.busy_cpu_s()
    with bench.ProcessCpu() as processes:
        time.sleep(0.3)
        before = dict(processes.cpu)
        child = subprocess.Popen([sys.executable, "-c", BURN])
        child.wait(timeout=30)
    burned = processes.cpu[child.pid] - before.get(child.pid, 0.0)
    # 1 s of CPU by its own clock, sampled every 0.1 s while it sleeps 0.5 s afterwards: the last sample
    # sees it all, plus interpreter start-up.
    assert 0.95 <= burned <= 3.0, burned
    assert processes.title[child.pid] == Path(sys.executable).name
    assert processes.since(before)[Path(sys.executable).name] >= 0.95
    assert bench.busy_cpu_s() - busy_before >= 0.95
