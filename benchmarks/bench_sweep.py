"""Sweep wall time on Ray Tune: 4 tiny trials at concurrency 2 vs 1, and Tune's per-trial overhead
against running the same trials' TorchTrainers directly, one after another. JSON out.

    python benchmarks/bench_sweep.py [--steps 60] [--trials 4]

Every variant runs the same trials from scratch (fresh storage) on one local Ray with 2 CPUs for
training workers, no evaluation and no MLflow, so what differs is only how the trials are driven:
- `direct_s`: `TrialRunner.run` for each trial in turn (no Tune);
- `tune_1_s`: the job's Tune sweep with `max_concurrent_trials: 1`;
- `tune_2_s`: the same with `max_concurrent_trials: 2`.
Targets: tune_2 / tune_1 <= 0.65 (two trials share the 2 cores); (tune_1 - direct) / trials <= 5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from stars.spec import JobSpec

TINY = {
    "name": "bench-sweep",
    "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_block": 1, "injection": "add",
              "max_position_embeddings": 24},
    "data": {"task": "addition", "digits": 2, "num_train": 2000, "num_test": 64},
    "stars": {"loop_sampling": {"kind": "lognormal", "mu": 1.0, "sigma": 0.5, "min": 1, "max": 4},
              "jsrr": {"weight": 0.1}},
    "train": {"global_batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "log_every": 20},
    "resources": {"num_workers": 1, "cpus_per_worker": 1},
    "eval": {"tasks": []},
    "tracking": {"enabled": False},
}


def spec(steps: int, trials: int, concurrency: int, storage: Path) -> JobSpec:
    data = json.loads(json.dumps(TINY))
    data["train"].update(max_steps=steps, checkpoint_every=steps)
    data["resources"]["storage_path"] = str(storage)
    data["sweep"] = {"seeds": list(range(trials)), "max_concurrent_trials": concurrency}
    return JobSpec.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    import ray

    from stars.ray_backend.job import run_job
    from stars.ray_backend.sweep import TrialRunner
    from stars.spec import resolve_spec, sweep_trials

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    quiet = {"console": lambda line: None}
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        base = Path(tmp)
        trials = sweep_trials(resolve_spec(spec(args.steps, args.trials, 1, base / "direct")))
        start = time.perf_counter()
        for trial in trials:
            TrialRunner(None, None).run(trial)
        times["direct_s"] = time.perf_counter() - start
        for concurrency in (1, 2):
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Ray Tune prints a table: keep stdout JSON only
                result = run_job(spec(args.steps, args.trials, concurrency, base / f"tune{concurrency}"), **quiet)
            times[f"tune_{concurrency}_s"] = time.perf_counter() - start
            assert [o.status for o in result.outcomes] == ["finished"] * args.trials, result.outcomes
    ray.shutdown()
    ratio = times["tune_2_s"] / times["tune_1_s"]
    overhead = (times["tune_1_s"] - times["direct_s"]) / args.trials
    print(json.dumps({
        "trials": args.trials, "steps": args.steps, **{k: round(v, 1) for k, v in times.items()},
        "concurrency_2_over_1": round(ratio, 3), "tune_overhead_per_trial_s": round(overhead, 1),
        "targets_met": {"concurrency_2_over_1<=0.65": ratio <= 0.65, "tune_overhead_per_trial_s<=5": overhead <= 5},
    }, indent=1))


if __name__ == "__main__":
    main()
