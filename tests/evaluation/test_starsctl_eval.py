"""`starsctl eval`: the depth table of one checkpoint, its artifacts, and user errors (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from stars.cli import app

runner = CliRunner()


def test_starsctl_eval_prints_the_depth_table_and_writes_artifacts(addition_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", str(addition_ckpt), "--task", "addition", "--depths", "1-16",
                              "--limit", "30", "--rho-depths", "4", "--rho-iters", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "addition (teacher_forced, 30 problems" in res.output and "summary: peak" in res.output
    assert sum(1 for line in res.output.splitlines() if line.strip()[:2].strip().isdigit()) == 16
    assert {p.name for p in out.iterdir()} == {"addition.csv", "addition.png", "eval.json"}
    data = json.loads((out / "eval.json").read_text())
    assert data["step"] == 20 and len(data["tasks"]["addition"]["acc"]) == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/nonexistent/step_1"], "does not exist"),
        (["eval", "{ckpt}", "--task", "sudoku"], "unknown task 'sudoku'; known tasks: addition"),
        (["eval", "{ckpt}", "--depths", "16-1"], "--depths: depth range '16-1' is empty"),
        (["eval", "{ckpt}", "--benchmark-path", "gsm8k"], "--benchmark-path expects TASK=PATH"),
        (["eval", "{not_a_checkpoint}"], "is not a checkpoint"),  # a CheckpointError: exit 2 too
    ],
)
def test_starsctl_eval_user_errors_exit_2_without_traceback(addition_ckpt, tmp_path, args, message):
    res = runner.invoke(app, [a.format(ckpt=addition_ckpt, not_a_checkpoint=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_eval_and_compare_help_import_nothing_heavy():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom stars.cli import app\n"
        "for cmd in ('eval', 'compare'):\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'])\n"
        "    assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_base_model_scored_into_mlflow_is_a_row_of_the_main_table(math_ckpt, gsm8k_file, tmp_path):
    """The paper's table has a row for the untrained base model, which no job scores: `starsctl eval
    --experiment` files its scores as a run that `starsctl compare --table main` reads by name."""
    import csv

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval", str(math_ckpt), "--task", "gsm8k", "--benchmark-path", f"gsm8k={gsm8k_file}",
                              "--depths", "4,8", "--rho-depths", "", "--limit", "4", "--batch-size", "2",
                              "--max-new-tokens", "6", "--out", str(out),
                              "--experiment", "ouro-base", "--run-name", "base", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert "compare it: starsctl compare base" in res.output
    acc = json.loads((out / "eval.json").read_text())["tasks"]["gsm8k"]["acc"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ouro-base").experiment_id],
                                filter_string="tags.`stars.kind` = 'checkpoint'")
    assert run.info.run_name == "base" and run.info.status == "FINISHED"

    table = tmp_path / "main.csv"
    main = runner.invoke(app, ["compare", "--table", "main", "base", "--tracking-uri", uri, "--csv", str(table)])
    assert main.exit_code == 0, main.output
    (row,) = list(csv.DictReader(table.open()))
    cells = {k: v for k, v in row.items() if k.lower().startswith("gsm8k")}
    assert sorted(float(v) for v in cells.values()) == sorted(round(100 * acc[d], 2) for d in ("4", "8"))
    assert "math500" in row["missing"]  # scored on gsm8k only: the others are '-' and left out of the average

    again = runner.invoke(app, ["eval", str(math_ckpt), "--run-name", "base"])
    assert again.exit_code == 2 and "--run-name and --tracking-uri go with --experiment" in again.output
