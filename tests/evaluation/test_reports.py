"""Reports of depth curves: the CSV depth table, PNG plots, the text table of `starsctl eval`."""

from __future__ import annotations

import subprocess
import sys

from stars.evaluation import TaskEval, depth_table_csv, format_task_table, plot_depth_curves, summary_metrics

ACC = {d: (0.9 if d <= 4 else 0.45) for d in range(1, 17)}


def task_eval() -> TaskEval:
    dyn = {"hidden_norm": {d: 5.0 + d for d in ACC}, "step_size": {d: 1.0 / d for d in ACC},
           "dist_from_start": {d: float(d) for d in ACC}, "rho": {4: 0.9}}
    return TaskEval("addition", "teacher_forced", 50, dict(ACC), dyn, summary_metrics("addition", ACC), 0.1)


def test_depth_table_csv():
    assert depth_table_csv({"a/acc": {1: 0.5, 2: 1.0}, "dyn/rho": {2: 0.9}}) == "depth,a/acc,dyn/rho\n1,0.5,\n2,1.0,0.9\n"


def test_plot_path_without_suffix_reports_the_file_really_written(tmp_path):
    out = plot_depth_curves({"a": {1: 0.5, 2: 1.0}}, tmp_path / "curves")
    assert out == tmp_path / "curves.png" and out.is_file()


def test_task_table_has_a_row_per_depth_and_the_summary():
    lines = format_task_table(task_eval()).splitlines()
    assert lines[0].startswith("addition (teacher_forced, 50 problems")
    rows = [line.split() for line in lines[2:-1]]
    assert [int(r[0]) for r in rows] == list(range(1, 17))
    assert rows[3][-1] == "0.9000" and len(rows[0]) == 5  # rho only where measured
    assert lines[-1] == "summary: peak 0.9000 at depth 1, acc@4 0.9000, acc@8 0.4500, acc@16 0.4500, drop@8 50.0%, drop@16 50.0%"


def test_importing_the_package_loads_no_torch_mlflow_or_matplotlib():
    code = ("import sys, stars.evaluation\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
