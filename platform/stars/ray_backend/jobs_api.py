"""A cluster's Ray Jobs API as `starsctl` uses it: where the cluster is, its auth token, and a job's
lifecycle (status, logs, stop, list), every failure as one line.

Failures come in two kinds:

- `ClusterAccessError` (a `UserError`, exit 2): what the user can fix here: no or a wrong address,
  an unreachable dashboard, a missing or refused auth token, an unknown job id.
- `ClusterError` (exit 1): the cluster answered, with a failure of its own.

The address of the Jobs API is the head's dashboard URL (`http://HEAD:8265`), found the way Ray's own
`ray job` commands find it: `--address`, else `$RAY_API_SERVER_ADDRESS`, else `$RAY_ADDRESS`. Only
`http(s)://` values of the environment variables count here: a bare `host:port` in `$RAY_ADDRESS` is
what `ray.init` joins as a driver (it is what Ray sets inside a job).

Token auth (on by default for `ray start --head` in Ray 2.60): Ray's client sends the token only when
`RAY_AUTH_MODE=token` is exported, and reads it from `$RAY_AUTH_TOKEN`, else the file named by
`$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` (`token_source` follows the same order to say which
one was used or is missing). `ray get-auth-token`, run on the head, prints the cluster's token.

Ray is imported inside the functions that talk to the cluster, so this module is light to import.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stars.errors import UserError

__all__ = [
    "ADDRESS_ENV_VARS",
    "TERMINAL_STATUSES",
    "ClusterAccessError",
    "ClusterError",
    "JobView",
    "JobsApi",
    "dashboard_lines",
    "dashboard_url",
    "exit_code_of",
    "is_loopback_address",
    "jobs_address",
    "jobs_table",
    "status_table",
    "token_auth_requested",
    "token_problem",
    "token_source",
]

#: Where the Jobs API address is read from when `--address` is not given, in Ray's order.
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_FILE = "~/.ray/auth_token"
#: Tag of a job's metadata (`stars.ray_backend.submit` writes them) and its column in the tables.
METADATA_COLUMNS = (("stars.name", "name"), ("stars.spec_hash", "spec hash"), ("stars.git_sha", "git sha"))


class ClusterAccessError(UserError):
    """The cluster cannot be used as asked: no or a bad address, unreachable, a missing or refused auth
    token, an unknown job id. One line; exit code 2."""


class ClusterError(RuntimeError):
    """The cluster answered with a failure of its own (exit code 1)."""


# ----------------------------------------------------------------------------------------- address
def jobs_address(address: str | None, *, required: bool) -> str | None:
    """The Jobs API URL to use: `address` (http assumed without a scheme), else the first of
    `ADDRESS_ENV_VARS` holding an http(s) URL; None when neither and not `required`."""
    if address is None:
        for var in ADDRESS_ENV_VARS:
            value = os.environ.get(var, "").strip()
            if value.startswith(("http://", "https://")):
                return value.rstrip("/")
        if required:
            raise ClusterAccessError(
                "no Ray cluster address: pass --address http://HEAD:8265 or export RAY_ADDRESS=http://HEAD:8265 "
                "(the head's dashboard; `starsctl cluster up` starts one on this machine)"
            )
        return None
    address = address.strip().rstrip("/")
    scheme = address.split("://", 1)[0] if "://" in address else None
    if scheme is None and address not in ("auto", "local", ""):
        return f"http://{address}"
    if scheme in ("http", "https") and urlsplit(address).hostname:
        return address
    raise ClusterAccessError(
        f"--address {address!r} is not a Ray Jobs API address: give the head's dashboard URL, "
        "e.g. http://HEAD:8265 (ray:// is Ray Client; auto/local mean a Ray on this machine)"
    )


def is_loopback_address(address: str) -> bool:
    """Whether the Jobs API at `address` runs on this machine (localhost, 127.0.0.0/8, ::1): then a
    job's local paths and stores mean the same on both sides. Any other host counts as remote, even
    one that happens to be this machine."""
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_url(address: str, job_id: str | None = None) -> str:
    """The dashboard page of one job (or of the job list)."""
    return f"{address}/#/jobs/{job_id}" if job_id else f"{address}/#/jobs"


def dashboard_lines(address: str, *, token_auth: bool, job_id: str | None = None) -> list[str]:
    """How to open the Ray dashboard at `address` (its job page with `job_id`), and with `token_auth`
    how to log in: what every run prints (`starsctl submit` here or with --address, `starsctl cluster up`).
    The dashboard asks a browser for the token once and keeps it in a cookie."""
    lines = [f"Ray dashboard: {dashboard_url(address, job_id) if job_id else address}"]
    if token_auth:
        source = token_source()
        where = f"`ray get-auth-token` prints it (it is in {source})" if source else (
            "`ray get-auth-token` on the head prints it")
        lines.append(f"Ray dashboard token: the dashboard asks for the cluster's auth token once per browser; {where}")
    return lines


# ------------------------------------------------------------------------------------------- token
def _readable(path: str | Path) -> bool:
    try:
        return bool(Path(path).expanduser().read_text().strip())
    except OSError:
        return False


def token_source() -> str | None:
    """Where Ray's client takes the auth token from, in Ray's order ($RAY_AUTH_TOKEN, the file
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); None when there is none to take."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:  # Ray reads only this file when the variable is set
        return f"the file $RAY_AUTH_TOKEN_PATH ({path})" if _readable(path) else None
    return TOKEN_FILE if _readable(TOKEN_FILE) else None


def token_auth_requested() -> bool:
    """Whether this process uses Ray's token auth (`RAY_AUTH_MODE=token`, which `ray.init` also sets
    when the local Ray it starts has token auth on, the default in Ray 2.60)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def token_problem(address: str, *, refused: bool) -> str:
    """One line saying why the cluster at `address` turned the request down and what to set:
    `refused` = a token was sent and is not the cluster's, else none was sent."""
    where = "`ray get-auth-token` on the head prints the cluster's token"
    source = token_source()
    if refused:
        return f"{address} refused the Ray auth token from {source or 'this environment'}: it is not this " \
               f"cluster's token ({where})"
    if not token_auth_requested():
        found = f"the token will be read from {source}" if source else (
            "and give the token in $RAY_AUTH_TOKEN, a file named by $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token")
        return f"{address} requires a Ray auth token: export RAY_AUTH_MODE=token ({found}; {where})"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path and not os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return f"{address} requires a Ray auth token and $RAY_AUTH_TOKEN_PATH={path} cannot be read or is empty " \
               f"({where})"
    return f"{address} requires a Ray auth token and none was found: set $RAY_AUTH_TOKEN, or $RAY_AUTH_TOKEN_PATH " \
           f"to a file holding it, or write it to ~/.ray/auth_token ({where})"


# ----------------------------------------------------------------------------------------- errors
@contextmanager
def _translated(address: str, job_id: str | None = None) -> Iterator[None]:
    """Ray's and requests' exceptions as `ClusterAccessError` / `ClusterError`, one line each."""
    import requests
    from ray.exceptions import AuthenticationError

    unreachable = f"cannot reach the Ray Jobs API at {address}"
    hint = "is the cluster up? (`starsctl cluster status` for one started here; check --address / $RAY_ADDRESS)"
    try:
        yield
    except AuthenticationError as exc:
        raise ClusterAccessError(token_problem(address, refused="Authentication failed" in exc.message)) from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ClusterAccessError(f"{unreachable} ({type(exc).__name__}): {hint}") from None
    except requests.exceptions.HTTPError as exc:  # the head answered with an error status (e.g. 500)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"the Ray Jobs API at {address} failed: {first}") from None
    except RuntimeError as exc:
        text = str(exc).strip()
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise ClusterAccessError(f"no job {job_id!r} on {address} (`starsctl list` shows its jobs)") from None
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ClusterError(f"the Ray Jobs API at {address} failed: {first}") from None


# ------------------------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class JobView:
    """What `starsctl` shows of one Ray job."""

    id: str
    status: str
    entrypoint: str = ""
    message: str = ""
    start_time: float | None = None  # seconds since the epoch
    end_time: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, details: Any) -> JobView:
        """From Ray's `JobDetails` (or `JobInfo`; times in milliseconds)."""
        def seconds(ms: int | None) -> float | None:
            return ms / 1000 if ms else None

        return cls(
            id=getattr(details, "submission_id", None) or getattr(details, "job_id", None) or "?",
            status=str(details.status),
            entrypoint=details.entrypoint or "",
            # Ray appends the last logs to a failure's message; `starsctl logs` shows those.
            message=next(iter((details.message or "").strip().splitlines()), ""),
            start_time=seconds(details.start_time),
            end_time=seconds(details.end_time),
            metadata=dict(details.metadata or {}),
        )

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def duration(self) -> float | None:
        if self.start_time is None:
            return None
        return (self.end_time or time.time()) - self.start_time


def exit_code_of(status: str) -> int:
    """`starsctl submit --wait`'s exit code for a job's final status: 0 SUCCEEDED, else 1."""
    return 0 if status == "SUCCEEDED" else 1


class JobsApi:
    """One cluster's Jobs API (`ray.job_submission.JobSubmissionClient`), failures translated.

    `JobsApi(address)` already talks to the cluster (Ray checks its version), so an unreachable
    address or a refused token fails here."""

    def __init__(self, address: str):
        self.address = address
        with _translated(address):
            from ray.job_submission import JobSubmissionClient

            self.client = JobSubmissionClient(address)

    def submit(self, *, entrypoint: str, submission_id: str, runtime_env: dict[str, Any],
               metadata: dict[str, str]) -> str:
        with _translated(self.address):
            return self.client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                          runtime_env=runtime_env, metadata=metadata)

    def job(self, job_id: str) -> JobView:
        with _translated(self.address, job_id):
            return JobView.of(self.client.get_job_info(job_id))

    def jobs(self) -> list[JobView]:
        """Jobs submitted through the Jobs API, oldest first (plain `ray.init` drivers left out)."""
        with _translated(self.address):
            details = self.client.list_jobs()
        views = [JobView.of(d) for d in details if getattr(d, "submission_id", None)]
        return sorted(views, key=lambda v: v.start_time or 0.0)

    def logs(self, job_id: str) -> str:
        with _translated(self.address, job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], None], poll_s: float = 1.0) -> JobView:
        """Write the job's logs as they come until it ends; return its final view. Should the log
        stream break, the logs still to come are lost but the job is still waited for."""
        import aiohttp

        self.job(job_id)  # an unknown id fails here, as one line
        # Ray logs every normal close of the log stream at INFO; only problems are worth a line.
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        try:
            asyncio.run(tail())
        except (RuntimeError, OSError, aiohttp.ClientError) as exc:  # the stream broke
            write(f"[starsctl] log stream of {job_id} lost ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                  "waiting for the job to end\n")
        return self.wait(job_id, poll_s=poll_s)

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> JobView:
        """Poll until the job is in a final state (or `timeout_s` passed); return its last view."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        view = self.job(job_id)
        while not view.terminal and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll_s)
            view = self.job(job_id)
        return view

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop the job (SIGTERM to its entrypoint, SIGKILL 3 s later); False when
        it had ended already."""
        with _translated(self.address, job_id):
            return bool(self.client.stop_job(job_id))


# ----------------------------------------------------------------------------------------- tables
def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def status_table(view: JobView, address: str) -> str:
    """One job, one field a line."""
    status = f"{view.status} ({view.message})" if view.message else view.status
    rows = [("job", view.id), ("status", status)]
    rows += [(title, view.metadata[key]) for key, title in METADATA_COLUMNS if view.metadata.get(key)]
    rows += [("entrypoint", view.entrypoint), ("started", _when(view.start_time)),
             ("ended", _when(view.end_time)), ("duration", _duration(view.duration)),
             ("dashboard", dashboard_url(address, view.id))]
    return _columns(rows)


def jobs_table(views: Sequence[JobView], address: str) -> str:
    """Every job, one a line, with the dashboard URL below."""
    if not views:
        return f"no jobs on {address}\ndashboard: {dashboard_url(address)}"
    rows = [("job", "status", "name", "spec hash", "started", "duration")]
    for v in views:
        rows.append((v.id, v.status, v.metadata.get("stars.name", "-"), v.metadata.get("stars.spec_hash", "-")[:10],
                     _when(v.start_time), _duration(v.duration)))
    return f"{_columns(rows)}\n{len(views)} job(s); dashboard: {dashboard_url(address)}"
