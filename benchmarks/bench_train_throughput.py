"""Training throughput through Ray Train (1 worker) vs the same loop in a plain Python process. JSON out.

    python benchmarks/bench_train_throughput.py [--steps 120] [--spec jobs/addition.yaml]

Both run `stars.train.train_loop` on the same spec with one torch thread; tokens/s is the median of
the per-`log_every` windows after the first (so Ray's start-up and the first window's warm-up are
excluded: "once Ray has started"). The plain process runs before and after Ray and is averaged, to
even out drift on a shared machine. Target: ray / plain >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stars.spec import load_spec
from stars.train import TrainHooks, train_loop


def spec_for(path: str, steps: int, workdir: Path):
    return load_spec(path, [
        f"train.max_steps={steps}", "train.warmup_steps=5", "train.checkpoint_every=null", "train.log_every=10",
        f"resources.storage_path={workdir / 'runs'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        "resources.num_workers=1", "resources.cpus_per_worker=1", "stars.jsrr.start_step=0",
    ])


def plain_tokens_per_s(spec, workdir: Path) -> float:
    torch.set_num_threads(1)  # what a 1-CPU Ray worker uses
    windows: list[float] = []
    hooks = TrainHooks(console=lambda line: None,
                       log_metrics=lambda m, step: windows.append(m["train/tokens_per_s"]))
    train_loop(spec, hooks=hooks, checkpoint_root=workdir / "plain")
    return statistics.median(windows[1:])


def ray_tokens_per_s(spec) -> tuple[float, float]:
    from stars.ray_backend.cluster import ensure_ray
    from stars.ray_backend.training import run_trial
    from stars.spec import resolve_spec
    from stars.tracking import Tracker

    start = time.perf_counter()
    ensure_ray(num_cpus=2)
    ray_start = time.perf_counter() - start
    spec = resolve_spec(spec)
    tracker = Tracker.from_spec(spec)
    run_id = tracker.start_job(spec)
    run_trial(spec, run_id=run_id)
    windows = [v for _, v in sorted(tracker.metric_history(run_id, "train/tokens_per_s"))]
    return statistics.median(windows[1:]), ray_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(Path(__file__).resolve().parents[1] / "jobs" / "addition.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        spec = spec_for(args.spec, args.steps, workdir)
        before = plain_tokens_per_s(spec, workdir)
        ray_tps, ray_start = ray_tokens_per_s(spec)
        after = plain_tokens_per_s(spec, workdir)
    plain = (before + after) / 2
    print(json.dumps({
        "spec": args.spec, "steps": args.steps, "threads_per_worker": 1,
        "plain_tokens_per_s": round(plain, 1), "plain_runs": [round(before, 1), round(after, 1)],
        "ray_tokens_per_s": round(ray_tps, 1), "ray_start_seconds": round(ray_start, 1),
        "ratio_ray_over_plain": round(ray_tps / plain, 3), "target_met(>=0.9)": ray_tps / plain >= 0.9,
    }, indent=2))


if __name__ == "__main__":
    main()
