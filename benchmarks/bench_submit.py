"""Latency of `starsctl submit`: from the command to the first training step reported, on an embedded
local Ray vs through the Jobs API of a Ray head already running on this machine. JSON out.

    python benchmarks/bench_submit.py [--repeats 1] [--steps 5]

Each run is `starsctl submit` in a subprocess (as a user types it) of the same tiny addition job, from
scratch (fresh storage and MLflow store, so nothing resumes), no evaluation; the clock stops at its first
`[stars] step` line (`log_every: 1`) and again when the command returns:
- `embedded`: `starsctl submit job.yaml` starts its own Ray, then the job;
- `cluster`: `starsctl submit job.yaml --address http://127.0.0.1:PORT --wait` against a head started
  once before (`stars.ray_backend.local_cluster`, its start time reported apart as `head_start_s`); the
  job's driver is a new process on the head (runtime env, `python -m stars.run`), which pays what the
  embedded run pays minus Ray's start.
Variants are interleaved; `min` is the least disturbed run. No target: reference numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = """\
name: bench-submit
model: {{d_model: 32, n_heads: 2, d_ff: 64, n_block: 1, injection: add, max_position_embeddings: 24}}
data: {{task: addition, digits: 2, num_train: 2000, num_test: 32}}
train: {{max_steps: {steps}, global_batch_size: 16, lr: 3.0e-3, warmup_steps: 1, log_every: 1, checkpoint_every: {steps}}}
resources: {{num_workers: 1, cpus_per_worker: 1, storage_path: {root}/runs}}
eval: {{tasks: []}}
tracking: {{uri: "sqlite:///{root}/mlflow.db"}}
"""
FIRST_STEP = "[stars] step "


def timed_submit(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Seconds from starting `starsctl submit ...` to its first step line, and to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stars.cli", "submit", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    first = None
    tail: list[str] = []
    for line in proc.stdout:
        if first is None and FIRST_STEP in line:
            first = time.perf_counter() - start
        tail = [*tail[-20:], line]
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"starsctl submit {' '.join(args)} failed (exit {proc.returncode}):\n{''.join(tail)}")
    return {"first_step_s": round(first, 2), "total_s": round(time.perf_counter() - start, 2)}


def summary(runs: list[dict[str, float]]) -> dict:
    return {key: {"min": min(r[key] for r in runs), "all": [r[key] for r in runs]} for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the head (the embedded Ray takes all)")
    args = parser.parse_args()

    from stars.ray_backend.local_cluster import start_head, stop_head

    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "MLFLOW_TRACKING_URI"}
    base["OMP_NUM_THREADS"] = "1"
    cluster_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp = Path(tempfile.mkdtemp(prefix="sb", dir="/tmp"))  # short: Ray's socket paths live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({k: cluster_env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # the head's token
    start = time.perf_counter()
    head = start_head(temp, num_cpus=args.num_cpus, dashboard_port=port)
    head_start = time.perf_counter() - start
    embedded, cluster = [], []
    try:
        for i in range(args.repeats):
            for name, runs, extra, env in (("embedded", embedded, [], base),
                                           ("cluster", cluster, ["--address", head.dashboard_url, "--wait"],
                                            cluster_env)):
                root = Path(tempfile.mkdtemp(prefix=f"bench-submit-{name}-{i}-"))
                (root / "job.yaml").write_text(JOB.format(steps=args.steps, root=root))
                try:
                    runs.append(timed_submit(["job.yaml", *extra], env, root))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        stop_head(temp, grace_s=5)
        shutil.rmtree(temp, ignore_errors=True)
    first_e, first_c = min(r["first_step_s"] for r in embedded), min(r["first_step_s"] for r in cluster)
    print(json.dumps({
        "steps": args.steps, "repeats": args.repeats, "head_cpus": args.num_cpus, "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "head_start_s": round(head_start, 2),
        "embedded": summary(embedded), "cluster": summary(cluster),
        "first_step_cluster_over_embedded": round(first_c / first_e, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
