"""`python -m stars.run JOB.yaml [--set k=v ...]`: the entry point of a job, on a laptop (embedded local
Ray) and as the Ray Jobs entrypoint on a cluster. Thin on purpose: the driver is
`stars.ray_backend.job.run_job`."""

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
    args = parser.parse_args(argv)
    try:
        from stars.ray_backend.job import run_job
        from stars.spec import load_spec

        result = run_job(load_spec(args.spec, args.overrides), address=args.address)
    except UserError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
