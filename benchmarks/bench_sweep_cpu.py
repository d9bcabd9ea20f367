"""Where a sweep's CPU goes: busy CPU and CPU per Ray process kind while 2 tiny trials run one after
another and then side by side, on one local Ray with 2 CPUs. JSON out.

    python benchmarks/bench_sweep_cpu.py [--steps 60] [--trials 2] [--rounds 2]

It explains `bench_sweep.py`'s concurrency ratio: a tiny trial trains for about a second, so its cost
is the Ray processes each trial starts (Tune trainable, Train controller, Train's helper actors,
the training worker). On 2 cores the side-by-side run cannot take less wall time than half the busy
CPU it needs, so `cpu_bound_ratio` (busy CPU at concurrency 2 / 2 / wall at concurrency 1) is the
best ratio any schedule could reach. CPU per process comes from `/proc/<pid>/stat`, sampled every
0.1 s and grouped by the title Ray gives the process (`ray::RayTrainWorker`, ...); the first round
also pays the cluster's one-time actors, so read the later ones.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_sweep import spec  # benchmarks/bench_sweep.py (this script's directory)

TICKS = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """The whole machine's user + nice + system time so far."""
    with open("/proc/stat") as f:
        return sum(map(int, f.readline().split()[1:4])) / TICKS


class ProcessCpu:
    """CPU seconds of every process seen, by pid, with the latest Ray title (`ray::Name`) it showed."""

    def __init__(self) -> None:
        self.cpu: dict[int, float] = {}
        self.title: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ProcessCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name in os.listdir("/proc"):
                if name.isdigit():
                    self._sample(int(name))
            time.sleep(0.1)

    def _sample(self, pid: int) -> None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline") as f:
                cmdline = f.read().replace("\0", " ").strip()
        except OSError:  # the process ended between listdir and open
            return
        # A Ray worker starts as `python .../default_worker.py` and retitles itself once it hosts an
        # actor: keep the actor's title, and the executable's name for anything else.
        first = cmdline.split()[0] if cmdline else ""
        title = first if first.startswith("ray::") else first.rsplit("/", 1)[-1]
        self.cpu[pid] = max(self.cpu.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / TICKS)
        if title.startswith("ray::") or pid not in self.title:
            self.title[pid] = title

    def since(self, before: dict[int, float]) -> dict[str, float]:
        by_title: collections.Counter[str] = collections.Counter()
        for pid, cpu in self.cpu.items():
            by_title[self.title[pid]] += cpu - before.get(pid, 0.0)
        return {title: round(cpu, 1) for title, cpu in by_title.most_common() if cpu >= 0.1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of (concurrency 1, concurrency 2) runs")
    args = parser.parse_args()

    import ray

    from stars.ray_backend.job import run_job

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-cpu-") as tmp, ProcessCpu() as processes:
        for round_ in range(args.rounds):
            runs = {}
            for concurrency in (1, 2):
                time.sleep(1.0)  # let the previous run's processes wind down
                before, busy, start = dict(processes.cpu), busy_cpu_s(), time.perf_counter()
                storage = Path(tmp) / f"round{round_}-c{concurrency}"
                with contextlib.redirect_stdout(sys.stderr):  # Ray Tune prints a table: keep stdout JSON only
                    run_job(spec(args.steps, args.trials, concurrency, storage), console=lambda line: None)
                wall = time.perf_counter() - start
                time.sleep(0.5)  # the last samples of the run's processes
                runs[f"concurrency_{concurrency}"] = {
                    "wall_s": round(wall, 1), "busy_cpu_s": round(busy_cpu_s() - busy, 1),
                    "cpu_s_by_process": processes.since(before)}
            one, two = runs["concurrency_1"], runs["concurrency_2"]
            rounds.append({**runs, "ratio": round(two["wall_s"] / one["wall_s"], 3),
                           "cpu_bound_ratio": round(two["busy_cpu_s"] / 2 / one["wall_s"], 3)})
    ray.shutdown()
    print(json.dumps({"trials": args.trials, "steps": args.steps, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
