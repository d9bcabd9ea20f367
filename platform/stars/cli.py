"""`starsctl`: validate, inspect and submit STARS job specs.

Thin on purpose: at import time only typer and the standard library load; each command imports
what it needs inside its body. `starsctl --help` and `starsctl validate` never import torch, ray or
mlflow, so validation is instant.

Exit codes: 0 ok; 2 a user error (bad spec, bad `--set`, missing file; every problem printed, no
traceback); 1 anything else that failed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperGroup

from stars.errors import EXIT_USER_ERROR, UserError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C'd command


class _StarsGroup(TyperGroup):
    """The one place where a user error becomes exit code 2 (its lines on stderr, no traceback) and
    Ctrl-C exit code 130 with one line."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except UserError as exc:
            for line in exc.lines():
                typer.echo(line, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:  # Ctrl-C: what happened and what to do, instead of click's "Aborted!"
            typer.echo("\nstarsctl: interrupted. A job's MLflow run is marked KILLED; submitting the same spec "
                       "again resumes it from its last committed checkpoints (finished trials are kept).", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


app = typer.Typer(
    name="starsctl",
    cls=_StarsGroup,
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
    from stars.spec import SpecError, load_spec, resolved_yaml, spec_warnings

    bad = 0
    for path in files:
        try:
            spec = load_spec(path, overrides)
        except SpecError as exc:  # report it and go on with the next file
            bad += 1
            for line in exc.lines():
                typer.echo(line, err=True)
            continue
        for warning in spec_warnings(spec):
            typer.echo(f"{path}: warning: {warning}", err=True)
        trials = f", {spec.sweep.num_trials} trials" if spec.sweep.enabled else ""
        typer.echo(f"OK {path} ({spec.name}{trials})")
        if show:
            typer.echo(resolved_yaml(spec, redact=True))  # printed: never show secret values
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
            help="Ray cluster to submit to: its Jobs API, the head's dashboard URL, e.g. http://head:8265 "
            "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS when one is an http(s) URL, else an embedded "
            "local Ray).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and print the spec as it would run; run nothing.")
    ] = False,
    ship_code: Annotated[
        bool,
        typer.Option("--ship-code", help="Send this machine's `stars` package with the job (Ray py_modules); "
                     "default: the cluster's image has stars installed."),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="With a cluster: follow the job's logs to its end; exit 0 when it "
                     "SUCCEEDED, 1 when it FAILED or was STOPPED."),
    ] = False,
) -> None:
    """Validate a job spec and run it on Ray: embedded here, or on the cluster at --address.

    The spec is resolved where the job runs: here for an embedded run or a head on this machine
    (127.0.0.1), on the cluster for a remote one, which refuses relative paths and local MLflow
    stores before anything is sent (exit 2)."""
    from stars.ray_backend.jobs_api import is_loopback_address, jobs_address
    from stars.spec import load_spec, resolved_yaml, spec_warnings

    target = jobs_address(address, required=False)
    remote = target is not None and not is_loopback_address(target)
    spec = load_spec(file, overrides, resolve=not remote)  # a SpecError is a UserError: exit 2
    if remote:
        from stars.ray_backend.cluster_spec import check_remote_spec

        check_remote_spec(spec, target)
    for warning in spec_warnings(spec, target if remote else None):
        typer.echo(f"{file}: warning: {warning}", err=True)
    if dry_run:
        if target is None:
            typer.echo(resolved_yaml(spec, redact=True), nl=False)  # printed: never show secret values
            return
        from stars.ray_backend.submit import ENTRYPOINT, spec_for_upload

        typer.echo(resolved_yaml(spec_for_upload(spec), redact=True), nl=False)
        typer.echo(f"(dry run: would submit `{ENTRYPOINT}` with this spec to {target})", err=True)
        return
    try:
        from stars.ray_backend.submit import submit as ray_submit
    except ModuleNotFoundError as exc:
        if exc.name not in ("stars.ray_backend", "stars.ray_backend.submit"):
            raise
        _fail("starsctl submit: the Ray backend (stars.ray_backend.submit) is not installed", code=1)
    with _cluster_failures():
        result = ray_submit(spec, spec_path=file, address=target, ship_code=ship_code, wait=wait)
    if isinstance(result, str):  # submitted to a cluster: how to follow it
        typer.echo(result)
    elif result:  # a trial failed here, or the followed cluster job did not succeed
        raise typer.Exit(result)


# `starsctl status | logs | stop | list`: a cluster's jobs through the Ray Jobs API (stars.ray_backend.jobs_api).
AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="The cluster's Jobs API (the head's dashboard URL, e.g. http://head:8265); "
                 "default $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS."),
]
JobIdArgument = Annotated[str, typer.Argument(help="The job's submission id (starsctl list).", show_default=False)]


@contextmanager
def _cluster_failures() -> Iterator[None]:
    """A failure the cluster answered with (`ClusterError`): one line, exit code 1. Problems the user can
    fix (address, token, job id) are `UserError`s: exit 2."""
    from stars.ray_backend.jobs_api import ClusterError

    try:
        yield
    except ClusterError as exc:
        _fail(f"starsctl: {exc}", code=1)


def _jobs_api(address: str | None):  # noqa: ANN202 - JobsApi, imported lazily
    from stars.ray_backend.jobs_api import JobsApi, jobs_address

    return JobsApi(jobs_address(address, required=True))


def _write_raw(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


@app.command("status")
def job_status(job_id: JobIdArgument, address: AddressOption = None) -> None:
    """A cluster job's status, spec name and hash, git sha, times and dashboard URL."""
    from stars.ray_backend.jobs_api import status_table

    with _cluster_failures():
        api = _jobs_api(address)
        typer.echo(status_table(api.job(job_id), api.address))


@app.command()
def logs(
    job_id: JobIdArgument,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends; exit 0 "
                                          "when it SUCCEEDED, 1 otherwise (as `submit --wait`).")] = False,
    address: AddressOption = None,
) -> None:
    """A cluster job's logs (driver and workers), or with --follow the logs as they come."""
    with _cluster_failures():
        api = _jobs_api(address)
        if follow:
            final = api.follow(job_id, write=_write_raw)
            typer.echo(f"job {job_id} {final.status}", err=True)
            if final.status != "SUCCEEDED":  # scripts chain on it: `starsctl logs -f ID && ...`
                raise typer.Exit(1)
        else:
            _write_raw(api.logs(job_id))


@app.command()
def stop(
    job_id: JobIdArgument,
    address: AddressOption = None,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for the job to end.")] = 60.0,
) -> None:
    """Stop a cluster job (SIGTERM, then SIGKILL); its committed checkpoints stay and a resubmit resumes."""
    with _cluster_failures():
        api = _jobs_api(address)
        if not api.stop(job_id):
            typer.echo(f"job {job_id} had already ended: {api.job(job_id).status}")
            return
        view = api.wait(job_id, timeout_s=timeout)
        if not view.terminal:
            _fail(f"starsctl stop: asked {job_id} to stop; still {view.status} after {timeout:g} s", code=1)
        typer.echo(f"job {job_id} {view.status}")


@app.command("list")
def list_jobs(address: AddressOption = None) -> None:
    """The cluster's jobs: id, status, spec name and hash, start time, duration."""
    from stars.ray_backend.jobs_api import jobs_table

    with _cluster_failures():
        api = _jobs_api(address)
        typer.echo(jobs_table(api.jobs(), api.address))


# `starsctl cluster up | down | status`: a Ray head on this machine (stars.ray_backend.local_cluster).
cluster_app = typer.Typer(
    help="A Ray head on this machine (dashboard on 127.0.0.1, token auth on) to submit jobs to.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cluster_app, name="cluster")
TempDirOption = Annotated[
    Path | None,
    typer.Option("--temp-dir", help="The head's Ray temp dir, which also holds its state file "
                 "(default: <tmp>/stars-ray-<uid>)."),
]


@cluster_app.command("up")
def cluster_up(
    num_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs the head offers (default: all).")] = None,
    dashboard_port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the dashboard / Jobs API.")] = 8265,
    temp_dir: TempDirOption = None,
) -> None:
    """Start a Ray head here and print the commands to use it."""
    from stars.ray_backend.local_cluster import next_steps, start_head

    typer.echo(next_steps(start_head(temp_dir, num_cpus=num_cpus, dashboard_port=dashboard_port)))


@cluster_app.command("down")
def cluster_down(
    temp_dir: TempDirOption = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
) -> None:
    """End the head `cluster up` started: its recorded processes and their children, nothing else."""
    from stars.ray_backend.local_cluster import default_temp_dir, stop_head

    head, pids = stop_head(temp_dir, grace_s=grace)
    if head is None:
        typer.echo(f"no head started by starsctl is recorded in {temp_dir or default_temp_dir()}")
    elif pids:
        typer.echo(f"stopped the head at {head.dashboard_url}: {len(pids)} processes ended")
    else:
        typer.echo(f"the head at {head.dashboard_url} had already ended; forgot it")


@cluster_app.command("status")
def cluster_status(temp_dir: TempDirOption = None) -> None:
    """Whether the head `cluster up` started is up (exit 0) or not (exit 1)."""
    import time

    from stars.ray_backend.local_cluster import default_temp_dir, head_status

    head, alive, answers = head_status(temp_dir)
    if head is None:
        _fail(f"no head started by starsctl is recorded in {temp_dir or default_temp_dir()} "
              "(`starsctl cluster up` starts one)", code=1)
    state = f"up ({alive} processes)" if alive else "down (no process left)"
    rows = [("head", state if answers or not alive else f"{state}, dashboard not answering"),
            ("dashboard", head.dashboard_url), ("temp dir", f"{head.temp_dir} (logs: session_latest/logs)"),
            ("cpus", str(head.num_cpus or "all")),
            ("started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(head.started)))]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key.ljust(width)}  {value}")
    if not (alive and answers):
        raise typer.Exit(1)


# `starsctl eval` and `starsctl compare`: heavy imports (torch, mlflow) inside the command bodies.
def _depths_option(value: str, option: str) -> list[int]:
    from stars.spec import parse_depths

    try:
        return parse_depths(value)
    except ValueError as exc:
        _fail(f"{option}: {exc}")


@app.command("eval")
def eval_checkpoint(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint directory (step_NNNNNNN/ with model/ and stars_task.json) "
                            "or a model directory.", show_default=False)
    ],
    tasks: Annotated[
        list[str],
        typer.Option("--task", "-t", help="Task to score (repeatable): addition, gsm8k, math500, asdiv, svamp, "
                     "amc23. Default: the checkpoint's training task when it is addition."),
    ] = [],  # noqa: B006 - typer reads the default
    depths: Annotated[str, typer.Option(help="Depths to score, e.g. 1-16 or 1,2,4,8.")] = "1-16",
    rho_depths: Annotated[
        str, typer.Option(help="Depths at which to estimate the spectral radius ('' for none).")
    ] = "1,4,8,16",
    rho_iters: Annotated[int, typer.Option(min=1, help="Power iterations per spectral radius.")] = 20,
    limit: Annotated[int | None, typer.Option(min=1, help="Score only the first N problems of each task.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per batch.")] = 64,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Generation budget of math benchmarks (default 2048).")
    ] = None,
    benchmark_path: Annotated[
        list[str],
        typer.Option("--benchmark-path", metavar="TASK=PATH",
                     help="A local copy of a math benchmark, e.g. gsm8k=data/gsm8k (repeatable)."),
    ] = [],  # noqa: B006 - typer reads the default
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write <task>.csv, <task>.png and eval.json here.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when visible, else cpu).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    experiment: Annotated[
        str | None, typer.Option(help="Also log the result to MLflow, in this experiment, as a run that "
                                 "`starsctl compare` reads (e.g. the base model's row of --table main).")
    ] = None,
    run_name: Annotated[
        str | None, typer.Option(help="--experiment: the run's name (default: the checkpoint directory's name).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="--experiment: MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                                 "else ./mlflow.db).")
    ] = None,
) -> None:
    """Score one checkpoint at every depth, outside a job: accuracy, dynamics, summary; with
    --experiment also into MLflow."""
    depth_list = _depths_option(depths, "--depths")
    rho_list = _depths_option(rho_depths, "--rho-depths") if rho_depths.strip() else []
    paths: dict[str, str] = {}
    for item in benchmark_path:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            _fail(f"--benchmark-path expects TASK=PATH, got {item!r}")
        paths[name.strip()] = path.strip()
    if not checkpoint.exists():
        _fail(f"checkpoint {str(checkpoint)!r} does not exist")
    if (run_name or tracking_uri) and not experiment:
        _fail("starsctl eval: --run-name and --tracking-uri go with --experiment (where to log the result)")
    import json

    from stars.evaluation import evaluate_checkpoint, format_task_table, write_task_artifacts

    # EvalInputError and CheckpointError are UserErrors: `_StarsGroup` turns them into exit code 2.
    # Generation's progress: a bar on a terminal, else a line now and then (both on stderr, so --json
    # output stays clean).
    result = evaluate_checkpoint(
        checkpoint, tasks or None, depth_list, rho_list, rho_iters, limit, batch_size, max_new_tokens,
        benchmark_paths=paths, device=device, console=lambda line: typer.echo(line, err=True),
        progress_stream=sys.stderr if sys.stderr.isatty() else None,
    )
    if out is not None:
        for ev in result.tasks.values():
            write_task_artifacts(ev, out, result.step)
        (out / "eval.json").write_text(
            json.dumps({"checkpoint": result.checkpoint, "step": result.step,
                        "tasks": {t: ev.to_json() for t, ev in result.tasks.items()}}, indent=1)
        )
    if experiment:
        from stars.tracking import Tracker, log_checkpoint_run, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        name = run_name or checkpoint.resolve().name
        run_id, _ = log_checkpoint_run(Tracker(uri), experiment, name, step=result.step or 0,
                                       checkpoint=str(result.checkpoint),
                                       tasks={t: (ev.curves(), ev.summary) for t, ev in result.tasks.items()})
        typer.echo(f"logged as MLflow run {run_id} ({name!r}, experiment {experiment!r}) at {uri}; "
                   f"compare it: starsctl compare {name} ...", err=True)
    if as_json:
        typer.echo(json.dumps({"checkpoint": result.checkpoint, "step": result.step,
                               "tasks": {t: ev.to_json() for t, ev in result.tasks.items()}}, indent=1))
        return
    where = f" (step {result.step})" if result.step is not None else ""
    typer.echo(f"{result.checkpoint}{where}")
    for ev in result.tasks.values():
        typer.echo(format_task_table(ev))
    if out is not None:
        typer.echo(f"wrote {out}/")


class CompareTable(str, Enum):
    """What `starsctl compare` prints (`--table`)."""

    depth = "depth"  # one task's depth curves, with the overlay PNG
    main = "main"  # the paper's main-results table over the math benchmarks


@app.command()
def compare(
    refs: Annotated[
        list[str],
        typer.Argument(help="Experiment names, run ids or run names (eval, trial or job runs).", show_default=False),
    ],
    task: Annotated[
        str | None, typer.Option("--task", "-t", help="Task whose depth curves to compare (default: the only one).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG overlaying the curves (default compare-<task>.png).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="Compare the checkpoints at this training step.")] = None,
    all_steps: Annotated[bool, typer.Option("--all-steps", help="Every evaluated checkpoint, not the latest.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as Markdown (for docs).")] = False,
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Also write the table as CSV to this file (either --table).")
    ] = None,
    table: Annotated[
        CompareTable, typer.Option(help="depth: one task's depth curves and the PNG; main: the paper's main "
                                   "results (math benchmarks at --depths, their average, its relative drop).")
    ] = CompareTable.depth,
    depths: Annotated[
        str | None, typer.Option(help="Loop depths shown as columns, e.g. 1,2,4,8,16 (depth table: default every "
                                 "depth evaluated; --table main: default 4,8, drop = first -> last).")
    ] = None,
    labels: Annotated[
        list[str], typer.Option("--label", help="--table main: row name per reference, in order (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default
    seeds: Annotated[
        bool, typer.Option("--seeds", help="Depth table: one row per setting, mean ± sd over the trials that "
                           "differ only in their seed (sweep.seeds).")
    ] = False,
    by: Annotated[
        list[str], typer.Option("--by", help="Depth table: one row per value of this trial-key name (e.g. "
                                "position), mean ± sd over every trial that shares it; repeatable.")
    ] = [],  # noqa: B006 - typer reads the default
) -> None:
    """Depth curves from MLflow: a table (runs x depths, peak, drop@8, drop@16, the trial's wall time) and
    one overlay PNG, or with --table main the paper's main-results table (text, --markdown, and --csv
    FILE for either)."""
    from stars.compare import CompareError, main_results, plot_comparison
    from stars.compare import compare as run_compare

    main = table is CompareTable.main
    options = (("--task", task), ("--out", out), ("--seeds", seeds), ("--by", by)) if main else (("--label", labels),)
    misplaced = [name for name, value in options if value]
    if misplaced:
        _fail(f"starsctl compare: {', '.join(misplaced)}: not an option of --table {table.value}")
    if seeds and by:
        _fail("starsctl compare: --seeds and --by: give one (--by already folds the seeds into its groups)")
    shown = _depths_option(depths, "--depths") if depths else None
    try:
        if main:
            result = main_results(refs, shown, labels=labels or None, tracking_uri=tracking_uri, step=step,
                                  all_steps=all_steps)
        else:
            result = run_compare(refs, task, tracking_uri=tracking_uri, step=step, all_steps=all_steps, depths=shown)
        shown_table = result.grouped_by(by) if by else result.seed_groups() if seeds else result
    except CompareError as exc:
        _fail(f"starsctl compare: {exc}")
    typer.echo(shown_table.markdown() if markdown else shown_table.table())
    if csv_path is not None:
        csv_path.write_text(shown_table.csv())
        typer.echo(f"wrote {csv_path}")
    if not main:
        png = plot_comparison(result, out if out is not None else Path(f"compare-{result.task}.png"))
        typer.echo(f"wrote {png}")


@app.command()
def sync(
    path: Annotated[Path, typer.Argument(help="A run directory (or a job's storage) holding tracking/ journals.",
                                         show_default=False)],
    tracking_uri: Annotated[
        str | None, typer.Option(help="Send to this MLflow instead of the URI each journal was written for.")
    ] = None,
) -> None:
    """Send training metrics that MLflow did not take while it was down (kept on disk in the run's
    tracking/ journal) to their runs. Safe to repeat: a step already in MLflow is not stored twice.
    Exit 1 when a server is still unreachable."""
    from stars.tracking.outbox import SyncError, sync_journals

    try:
        outcomes = sync_journals(path, tracking_uri)
    except SyncError as exc:
        _fail(f"starsctl sync: {exc}")
    for outcome in outcomes:
        typer.echo(outcome.line)
    if any(o.error for o in outcomes):
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
