"""A real MLflow tracking server for tests: PostgreSQL 15 as the backend store, artifacts proxied by
the server (`--serve-artifacts`), the same shape as the team's server in cluster/mlflow/.

`postgres_cluster` starts a throw-away PostgreSQL cluster (`initdb` in a temp dir, 127.0.0.1 on a free
port, its unix socket in the temp dir); `mlflow_postgres_server` starts `mlflow server` on it. Both are
module-scoped: started once for the module that asks, stopped after it, by the pids they started.
`mlflow_server_runner` starts a server of a test's own configuration (tests/tracking/test_team_server.py).
Tests skip only when the PostgreSQL binaries are not installed (`apt-get install -y postgresql-15`).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Where Debian's postgresql-15 package puts its server binaries (not on PATH).
DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: A bound, not a goal: on the idle 2-core machine a server is up in a few seconds, but with Ray jobs
#: beside it creating the SQLite tables alone took ~60 s.
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The directory holding `initdb` and `postgres` (Debian's, else the one on PATH), or None."""
    on_path = shutil.which("initdb")
    for candidate in (DEBIAN_PG_BIN, Path(on_path).resolve().parent if on_path else None):
        if candidate is not None and (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    return None


def _service_user() -> pwd.struct_passwd | None:
    """The account the PostgreSQL processes run as: None (this one) unless we are root, whom
    `initdb` and `postgres` refuse; then the `postgres` account of the Debian package, else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root, and neither a 'postgres' nor a 'nobody' account exists to run PostgreSQL as")


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """Popen arguments that drop root to `user` (all groups included) for the child only."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _stop(proc: subprocess.Popen, sig: int, *, group: bool = False, timeout: float = 20.0) -> None:
    """Stop a process this fixture started (and its process group when it leads one), then reap it."""
    if proc.poll() is not None:
        return
    send = (lambda s: os.killpg(proc.pid, s)) if group else proc.send_signal
    send(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass(frozen=True)
class PostgresCluster:
    host: str
    port: int
    user: str
    password: str
    root: Path

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=5)

    def execute(self, sql: str, dbname: str = "postgres", params: dict | None = None) -> list[tuple]:
        """Run one statement (`%(name)s` placeholders filled from `params`) outside a transaction
        (CREATE DATABASE refuses to run inside one); returns its rows, if any."""
        conn = self.connect(dbname)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def sqlalchemy_uri(self, dbname: str) -> str:
        """The backend-store URI without the password: libpq takes it from $PGPASSWORD, so it stays
        out of the server's command line (cluster/mlflow/docker-compose.yaml does the same)."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{dbname}"


@pytest.fixture(scope="module")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of its own: `initdb` in a temp dir, password auth (scram-sha-256), on
    127.0.0.1 at a free port with its unix socket in the temp dir; durability off (a test store)."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL server binaries not found (neither {DEBIAN_PG_BIN} nor initdb on PATH); "
                    "install them with: apt-get install -y postgresql-15")
    user = _service_user()
    # Not under pytest's tmp dir: that one is private to root, and the server may run as 'postgres'.
    root = Path(tempfile.mkdtemp(prefix="stars-pg-"))
    proc: subprocess.Popen | None = None
    try:
        socket_dir, data_dir, pwfile = root / "socket", root / "data", root / "pwfile"
        socket_dir.mkdir()
        password = secrets.token_urlsafe(16)
        pwfile.write_text(password)
        if user is not None:
            for path in (root, socket_dir, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C"}
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data_dir), "--username", "stars", "--pwfile", str(pwfile),
             "--auth", "scram-sha-256", "--encoding", "UTF8", "--locale", "C", "--no-sync"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, **_as_user(user),
        )
        pwfile.unlink()
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        port = free_port()
        log_path = root / "postgres.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
                 "-k", str(socket_dir), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **_as_user(user),
            )
        cluster = PostgresCluster("127.0.0.1", port, "stars", password, root)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"postgres exited with {proc.returncode}:\n{_log_tail(log_path)}"
            try:
                cluster.connect().close()
                break
            except Exception:  # noqa: BLE001 - psycopg2.OperationalError until it accepts connections
                assert time.monotonic() < deadline, f"postgres not ready in {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}"
                time.sleep(0.2)
        yield cluster
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT)  # SIGINT = PostgreSQL's "fast" shutdown
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    url: str
    backend_store_uri: str
    artifacts_destination: Path


@contextmanager
def running_mlflow_server(
    args_for_port: Callable[[int], list[str]], env: dict[str, str], log_path: Path, port: int | None = None
) -> Iterator[str]:
    """`mlflow server ARGS` in its own process group, where `args_for_port(port)` names the stores and
    serves on 127.0.0.1 at `port` (default: a free one; a restarted server passes its old one); yields
    its URL once /health answers, and stops that group on exit."""
    port = port or free_port()
    env = {**os.environ, **env,
           # no background job runner: it would only take CPU from the 2-core test machine
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args_for_port(port)], cwd=log_path.parent, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"mlflow server exited with {proc.returncode}:\n{_log_tail(log_path)}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not healthy in {START_TIMEOUT_S:.0f} s:\n{_log_tail(log_path)}"
            time.sleep(0.3)
        yield url
    finally:
        _stop(proc, signal.SIGTERM, group=True)  # the server and its uvicorn workers: the group we started


@pytest.fixture(scope="module")
def mlflow_postgres_server(postgres_cluster: PostgresCluster, tmp_path_factory) -> Iterator[MlflowServer]:
    """`mlflow server` on the PostgreSQL cluster (database `mlflow`), proxying artifacts
    (`--serve-artifacts`) to a temp directory, on 127.0.0.1 at a free port; ready when /health says so."""
    postgres_cluster.execute("CREATE DATABASE mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    backend = postgres_cluster.sqlalchemy_uri("mlflow")

    def args(port: int) -> list[str]:
        return ["--backend-store-uri", backend, "--artifacts-destination", str(artifacts), "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]

    with running_mlflow_server(args, {"PGPASSWORD": postgres_cluster.password}, root / "server.log") as url:
        yield MlflowServer(url, backend, artifacts)


class RestartableMlflowServer:
    """A SQLite-backed `mlflow server` under `root` on one fixed port, stopped and started again at will
    (same store, same URL): what a tracking outage looks like to a client."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ctx: AbstractContextManager[str] | None = None

    def _args(self, port: int) -> list[str]:
        return ["--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{self.root}/server.db",
                "--artifacts-destination", str(self.root / "art")]

    def start(self) -> None:
        self._ctx = running_mlflow_server(self._args, {}, self.root / "server.log", port=self.port)
        assert self._ctx.__enter__() == self.url

    def stop(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None


@pytest.fixture
def mlflow_server_runner() -> Callable[..., AbstractContextManager[str]]:
    """`running_mlflow_server`, for a test that starts a server of its own configuration."""
    return running_mlflow_server
