"""`python -m stars.run JOB.yaml [--set k=v ...] [--temporary-cwd]`: the entry point of a job, on a laptop
(embedded local Ray) and as the Ray Jobs entrypoint on a cluster. Thin on purpose: the driver is
`stars.ray_backend.job.run_job`.

The spec is resolved here, where the job runs (relative paths against the working directory, the
tracking URI from the spec, else $MLFLOW_TRACKING_URI, else ./mlflow.db). `--temporary-cwd` says the
working directory is a Ray job's temporary working_dir (what `starsctl submit --address` runs): a spec
whose checkpoints or MLflow runs would land in it is refused (exit 2) instead of losing them.

`starsctl stop` has Ray send SIGTERM (SIGKILL 3 s later), which `ray.init` turns into an exit: the job's
MLflow run is marked KILLED, committed checkpoints stay, and starting the job again resumes from the latest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stars.errors import EXIT_USER_ERROR, UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stars.run", description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--address", default=None)
    parser.add_argument("--temporary-cwd", action="store_true",
                        help="the working directory is a Ray job's temporary working_dir: refuse outputs in it")
    args = parser.parse_args(argv)
    try:
        from stars.ray_backend.job import run_job
        from stars.spec import load_spec

        if args.temporary_cwd:
            from stars.ray_backend.cluster_spec import temporary_cwd_problems

            problems = temporary_cwd_problems(load_spec(args.spec, args.overrides, resolve=False))
            if problems:
                raise UserError("\n".join(f"{args.spec}: {problem}" for problem in problems))
        result = run_job(load_spec(args.spec, args.overrides), address=args.address)
    except UserError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
