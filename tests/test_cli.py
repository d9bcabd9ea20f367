"""`starsctl`: exit codes, output, and that validation imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stars.cli import app

REPO = Path(__file__).resolve().parents[1]
ADDITION = REPO / "jobs" / "addition.yaml"
HEAVY = ("torch", "ray", "mlflow", "transformers", "datasets")

FIVE_ERRORS = """\
name: five
data: {task: addition, digits: 0}
model: {norm: {type: batchnorm}}
train: {max_steps: 100, lr: fast}
stars: {jsrr: {mode: vjpp}}
resorces: {num_workers: 1}
"""

runner = CliRunner()


def run_cli_subprocess(*args: str, cwd: Path = REPO) -> tuple[int, str, str, list[str]]:
    """Run starsctl in a fresh interpreter; returns (exit code, stdout, stderr, heavy modules
    imported by the end of the command)."""
    code = (
        "import sys, runpy, json\n"
        f"sys.argv = ['starsctl', *{list(args)!r}]\n"
        "rc = 0\n"
        "try:\n"
        "    runpy.run_module('stars.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "sys.stdout.flush()\n"
        "print('@@' + json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    out, _, tail = proc.stdout.rpartition("@@")
    info = json.loads(tail)
    return info["rc"], out, proc.stderr, info["heavy"]


def test_help_imports_nothing_heavy():
    rc, out, err, heavy = run_cli_subprocess("--help")
    assert rc == 0, err
    for command in ("validate", "schema", "submit"):
        assert command in out
    assert heavy == []


def test_validate_the_main_job_imports_nothing_heavy():
    rc, out, err, heavy = run_cli_subprocess("validate", "jobs/addition.yaml")
    assert rc == 0, err
    assert out.startswith("OK jobs/addition.yaml")
    assert heavy == []


def test_bad_submit_exits_2_with_every_problem_and_starts_no_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FIVE_ERRORS)
    rc, out, err, heavy = run_cli_subprocess("submit", str(bad), cwd=tmp_path)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith(f"{bad}:")]
    assert len(lines) == 6 and lines[-1] == f"{bad}: 5 problems", err
    assert "Traceback" not in err
    assert "ray" not in heavy and "torch" not in heavy


def test_validate_many_files_reports_each(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(FIVE_ERRORS)
    result = runner.invoke(app, ["validate", str(ADDITION), str(bad), str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert f"OK {ADDITION}" in result.stdout
    assert f"{bad}:5: stars.jsrr.mode: expected one of 'vjp', 'jvp', 'fd', got 'vjpp'; did you mean 'vjp'?" in result.stderr
    assert f"{tmp_path / 'missing.yaml'}: file not found" in result.stderr
    assert "Traceback" not in result.output


def test_validate_with_overrides(tmp_path):
    ok = runner.invoke(app, ["validate", str(ADDITION), "--set", "train.lr=1e-3", "-s", "seed=3", "--show"])
    assert ok.exit_code == 0, ok.output
    shown = yaml.safe_load(ok.stdout.split("\n", 1)[1])
    assert shown["train"]["lr"] == 1e-3 and shown["seed"] == 3
    bad = runner.invoke(app, ["validate", str(ADDITION), "--set", "train.lrr=1e-3"])
    assert bad.exit_code == 2
    assert f"{ADDITION}: --set train.lrr=1e-3: train.lrr: unknown key; did you mean 'lr'?" in bad.stderr


def test_schema_prints_the_json_schema(tmp_path):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert set(schema["properties"]) >= {"name", "model", "data", "stars", "train", "resources", "eval", "sweep"}
    out = tmp_path / "schema.json"
    assert runner.invoke(app, ["schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == schema


def test_submit_dry_run_prints_the_resolved_spec_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, ["submit", str(ADDITION), "--dry-run", "--set", "train.max_steps=200"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 200
    assert resolved["resources"]["storage_path"] == str(tmp_path.resolve() / "stars_runs")
    assert resolved["tracking"]["uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert not (tmp_path / "stars_runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_submit_calls_the_ray_backend_with_the_resolved_spec(monkeypatch):
    calls = []
    fake = types.ModuleType("stars.ray_backend.submit")

    def fake_submit(spec, *, spec_path, address, ship_code, wait):
        calls.append((spec, spec_path, address))
        return "job-123"

    fake.submit = fake_submit
    monkeypatch.setitem(sys.modules, "stars.ray_backend.submit", fake)
    # a remote cluster refuses relative paths (tests/ray_backend/test_cluster_jobs.py): a shared one
    result = runner.invoke(app, ["submit", str(ADDITION), "--address", "http://head:8265", "--set", "seed=5",
                                 "--set", "resources.storage_path=/mnt/shared/stars"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "job-123"
    ((spec, spec_path, address),) = calls
    assert spec.seed == 5 and spec.name == "addition"
    assert Path(spec_path) == ADDITION and address == "http://head:8265"
    assert "storage_path" in result.stderr  # a local storage path with a remote cluster is warned about


def test_submit_bad_spec_never_reaches_the_backend(monkeypatch, tmp_path):
    fake = types.ModuleType("stars.ray_backend.submit")
    fake.submit = lambda *a, **k: pytest.fail("submit was called with an invalid spec")
    monkeypatch.setitem(sys.modules, "stars.ray_backend.submit", fake)
    bad = tmp_path / "bad.yaml"
    bad.write_text(FIVE_ERRORS)
    result = runner.invoke(app, ["submit", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith("5 problems")


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("starsctl ")


def test_submit_of_a_checkpoint_that_is_not_here_is_a_user_error_before_ray(tmp_path):
    spec = tmp_path / "ouro.yaml"
    spec.write_text(
        "name: o\nmodel: {source: ouro, pretrained: /nowhere}\n"
        "data: {task: addition}\ntrain: {max_steps: 10}\n"
    )
    rc, out, err, heavy = run_cli_subprocess("submit", str(spec), cwd=tmp_path)
    assert rc == 2, err
    assert "model.pretrained '/nowhere': no such directory, and not a Hugging Face hub id" in err
    assert "Traceback" not in err and "ray" not in heavy
