"""`starsctl`: validate, inspect and submit STARS job specs.

Thin on purpose: at import time only typer and the standard library load; each command imports
what it needs inside its body. `starsctl --help` and `starsctl validate` never import torch, ray or
mlflow, so validation is instant.

Exit codes: 0 ok; 2 a user error (bad spec, bad `--set`, missing file; every problem printed, no
traceback); 1 anything else that failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from stars.spec import JobSpec

EXIT_USER_ERROR = 2

app = typer.Typer(
    name="starsctl",
    help="Train and evaluate looped LMs with STARS on Ray, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

SetOption = Annotated[
    list[str],
    typer.Option(
        "--set",
        "-s",
        metavar="PATH=VALUE",
        help="Override a spec field, e.g. --set train.lr=3e-4 --set 'eval.depths=1-8'. "
        "VALUE is read as YAML and typed by the schema. Repeatable.",
    ),
]


def _fail(lines: list[str] | str, code: int = EXIT_USER_ERROR) -> NoReturn:
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    raise typer.Exit(code)


def _load(path: Path, overrides: list[str]) -> JobSpec:
    from stars.spec_loader import SpecError, load_spec

    try:
        return load_spec(path, overrides)
    except SpecError as exc:
        n = len(exc.problems)
        _fail([str(p) for p in exc.problems] + [f"{path}: {n} problem{'s' if n != 1 else ''}"])


def _version(value: bool) -> None:
    if value:
        from stars import __version__

        typer.echo(f"starsctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train and evaluate looped LMs with STARS on Ray, tracked in MLflow.

    A job is one YAML spec (see jobs/). `starsctl schema` documents every field.
    """


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="Job spec YAML files.", show_default=False)],
    overrides: SetOption = [],  # noqa: B006 - typer reads the default
    show: Annotated[bool, typer.Option("--show", help="Print the resolved spec of each valid file.")] = False,
) -> None:
    """Check job specs: every problem of every file, with its line. Exit 2 if any is invalid."""
    from stars.spec import resolved_yaml, spec_warnings
    from stars.spec_loader import SpecError, load_spec

    bad = 0
    for path in files:
        try:
            spec = load_spec(path, overrides)
        except SpecError as exc:
            bad += 1
            for problem in exc.problems:
                typer.echo(str(problem), err=True)
            n = len(exc.problems)
            typer.echo(f"{path}: {n} problem{'s' if n != 1 else ''}", err=True)
            continue
        for warning in spec_warnings(spec):
            typer.echo(f"{path}: warning: {warning}", err=True)
        trials = f", {spec.sweep.num_trials} trials" if spec.sweep.grid else ""
        typer.echo(f"OK {path} ({spec.name}{trials})")
        if show:
            typer.echo(resolved_yaml(spec))
    if bad:
        raise typer.Exit(EXIT_USER_ERROR)


@app.command()
def schema(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON schema of job specs (field descriptions are the documentation)."""
    import json

    from stars.spec import JobSpec

    text = json.dumps(JobSpec.model_json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="Job spec YAML file.", show_default=False)],
    overrides: SetOption = [],  # noqa: B006 - typer reads the default
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster to submit to (Ray Jobs API, e.g. http://head:8265); "
            "default: run on a local Ray.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the resolved spec; run nothing.")
    ] = False,
) -> None:
    """Validate a job spec and run it on Ray (locally, or on the cluster at --address)."""
    spec = _load(file, overrides)
    from stars.spec import resolved_yaml, spec_warnings

    for warning in spec_warnings(spec, address):
        typer.echo(f"{file}: warning: {warning}", err=True)
    if dry_run:
        typer.echo(resolved_yaml(spec), nl=False)
        return
    try:
        from stars.ray_backend.submit import submit as ray_submit
    except ModuleNotFoundError as exc:
        if exc.name not in ("stars.ray_backend", "stars.ray_backend.submit"):
            raise
        _fail("starsctl submit: the Ray backend (stars.ray_backend.submit) is not installed", code=1)
    result = ray_submit(spec, spec_path=file, address=address)
    if result is not None:
        typer.echo(str(result))


# Room for issue 5: `starsctl eval CHECKPOINT --task T --depths 1-16` and `starsctl compare RUN...`
# are added here as further @app.command()s, with their heavy imports inside the command bodies.


if __name__ == "__main__":  # pragma: no cover
    app()
