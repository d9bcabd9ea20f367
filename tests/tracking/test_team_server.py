"""cluster/mlflow/ as the team runs it: the compose file keeps secrets out and binds to 127.0.0.1, and
its own `mlflow server` command, basic-auth config and auth-database script work against a local
PostgreSQL 15 (no Docker here: the postgres service is replaced by `postgres_cluster`)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stars.spec import JobSpec, resolve_spec
from stars.tracking import Tracker

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "cluster" / "mlflow"
# ${VAR}, ${VAR:-default}, ${VAR:?error}: the forms of compose interpolation the file uses
PLACEHOLDER = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")


def compose_text() -> str:
    return (COMPOSE_DIR / "docker-compose.yaml").read_text()


def interpolate(text: str, env: dict[str, str]) -> str:
    """What `docker compose` makes of the ${...} placeholders in `text` given the variables `env`."""

    def value(m: re.Match) -> str:
        name, kind, rest = m.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name} is required: {rest}")
        return rest if kind == "-" else ""

    return PLACEHOLDER.sub(value, text)


def test_the_compose_file_takes_secrets_from_env_and_binds_to_localhost():
    data = yaml.safe_load(compose_text())
    services = data["services"]
    assert set(services) == {"postgres", "mlflow"} and services["postgres"]["image"] == "postgres:15"
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):  # a required placeholder, never a literal
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", value), (name, key)
        assert all(interpolate(port, {}).startswith("127.0.0.1:") for port in service.get("ports", [])), name
    assert "ports" not in services["postgres"]  # the database is reached only over the compose network
    command = services["mlflow"]["command"]
    assert {"--serve-artifacts", "--app-name=basic-auth"} <= set(command)
    assert any(a.startswith("--artifacts-destination=") for a in command)
    (backend,) = [a for a in command if a.startswith("--backend-store-uri=postgresql")]
    assert "@" in backend and ":" not in backend.split("//", 1)[1].split("@")[0]  # a user, no password
    # every variable the file reads is explained in env.example, which holds no secret values
    example = (COMPOSE_DIR / "env.example").read_text()
    documented = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", example, re.M))
    assert {m.group(1) for m in PLACEHOLDER.finditer(yaml.safe_dump(data))} <= set(documented)
    assert all(not value for name, value in documented.items() if SECRET_NAME.search(name))
    assert ".env" in (COMPOSE_DIR / ".gitignore").read_text().split()


def composed_server_args(cluster, artifacts: Path, port: int) -> list[str]:
    """The compose file's `mlflow server` arguments, pointed at the local cluster, directory and port."""
    command = [interpolate(a, {"MLFLOW_WORKERS": "1"}) for a in yaml.safe_load(compose_text())["services"]["mlflow"]["command"]]
    assert command[:2] == ["mlflow", "server"]
    local = {"--host": "127.0.0.1", "--port": str(port), "--artifacts-destination": str(artifacts)}
    args = []
    for arg in command[2:]:
        flag, _, value = arg.partition("=")
        value = local.get(flag, value).replace("mlflow@postgres:5432", f"{cluster.user}@{cluster.host}:{cluster.port}")
        args.append(f"{flag}={value}" if value else flag)
    return args


def as_user(monkeypatch, name: str, password: str) -> None:
    """MLflow clients of this process sign in as `name` (what a job's environment carries)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def test_the_composed_server_runs_on_postgres_with_basic_auth(postgres_cluster, mlflow_server_runner, tmp_path,
                                                              monkeypatch):
    # what the postgres service sets up: POSTGRES_DB, then the scripts in initdb/
    postgres_cluster.execute("CREATE DATABASE mlflow")
    for script in sorted((COMPOSE_DIR / "initdb").glob("*.sql")):
        postgres_cluster.execute(script.read_text())
    ini = (COMPOSE_DIR / "basic_auth.ini").read_text()
    (tmp_path / "basic_auth.ini").write_text(
        ini.replace("mlflow@postgres:5432", f"{postgres_cluster.user}@{postgres_cluster.host}:{postgres_cluster.port}"))
    admin_password = secrets.token_urlsafe(16)
    env = {"PGPASSWORD": postgres_cluster.password, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    assert set(env) == set(yaml.safe_load(compose_text())["services"]["mlflow"]["environment"])
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    artifacts = tmp_path / "artifacts"
    args = lambda port: composed_server_args(postgres_cluster, artifacts, port)  # noqa: E731
    with mlflow_server_runner(args, env, tmp_path / "server.log") as url:
        with pytest.raises(MlflowException, match="401|[Uu]nauthori"):
            MlflowClient(url).search_experiments()  # anonymous: refused

        from mlflow.server import get_app_client

        as_user(monkeypatch, "admin", admin_password)
        users = get_app_client("basic-auth", tracking_uri=url)
        job_password, colleague_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
        users.create_user("jobs", job_password)
        users.create_user("colleague", colleague_password)

        as_user(monkeypatch, "jobs", job_password)
        spec = resolve_spec(JobSpec.model_validate(
            {"name": "team-job", "data": {"task": "addition"}, "train": {"max_steps": 10}, "tracking": {"uri": url}}), cwd=tmp_path)
        tracker = Tracker.from_spec(spec)
        job = tracker.start_job(spec, git=("0123abc", False))
        tracker.log_train_step(job, 1, {"loss": 2.0})
        experiment_id = tracker.client.get_run(job).info.experiment_id
        assert (artifacts / experiment_id / job / "artifacts" / "spec" / "resolved.yaml").is_file()

        # default_permission EDIT: a colleague logs to the run, but only its owner may delete it
        as_user(monkeypatch, "colleague", colleague_password)
        colleague = Tracker(url)
        colleague.log_train_step(job, 2, {"loss": 1.0})
        assert colleague.metric_history(job, "train/loss") == [(1, 2.0), (2, 1.0)]
        with pytest.raises(MlflowException, match="403"):
            colleague.client.delete_run(job)

    # the users live in the auth database next to the tracking data (one backup holds both)
    rows = postgres_cluster.execute("SELECT username FROM users", "mlflow_auth")
    assert {name for (name,) in rows} == {"admin", "jobs", "colleague"}
