"""`starsctl compare`: depth curves read back from a real MLflow store (sqlite), table and PNG."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from stars.cli import app
from stars.compare import CompareError, compare, format_table
from stars.evaluation import TaskEval, summary_metrics
from stars.spec import JobSpec, resolve_spec, sweep_trials
from stars.tracking import Tracker, log_task_eval

runner = CliRunner()
GIT = ("0123abc", False)
DEPTHS = range(1, 17)
# trial 0 collapses after depth 4 (the SFT shape), trial 1 holds (the STARS shape)
CURVES = {
    0: {10: {d: 0.2 for d in DEPTHS}, 20: {d: (0.9 if d <= 4 else 0.45) for d in DEPTHS}},
    1: {10: {d: 0.3 for d in DEPTHS}, 20: {d: (0.5 if d == 1 else 0.8) for d in DEPTHS}},
}


def task_eval(task: str, acc: dict[int, float]) -> TaskEval:
    dyn = {"hidden_norm": {d: 5.0 + d for d in acc}, "step_size": {d: 1.0 / d for d in acc},
           "dist_from_start": {d: float(d) for d in acc}, "rho": {4: 0.9}}
    return TaskEval(task, "teacher_forced", 50, dict(acc), dyn, summary_metrics(task, acc), 0.1)


def log_eval(tracker: Tracker, eval_run: str, trial_run: str, step: int, ev: TaskEval) -> None:
    """What an Evaluator logs for the task it measures the dynamics on."""
    log_task_eval(tracker, eval_run, trial_run, step=step, curves=ev.curves(), summary=ev.summary)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One experiment `cmp` with a 2-trial sweep, each trial evaluated at steps 10 and 20."""
    root = tmp_path_factory.mktemp("cmp")
    uri = f"sqlite:///{root}/mlflow.db"
    spec = resolve_spec(JobSpec.model_validate({
        "name": "cmp", "data": {"task": "addition"}, "train": {"max_steps": 20},
        "sweep": {"grid": {"stars.jsrr.weight": [0.0, 0.1]}}, "tracking": {"uri": uri},
    }), cwd=root)
    tracker = Tracker(uri, artifact_root=str(root / "mlruns"))
    job = tracker.start_job(spec, git=GIT)
    trials = []
    for trial in sweep_trials(spec):
        run = tracker.start_trial(job, trial)
        trials.append(run)
        for step, acc in CURVES[trial.index].items():
            ev = tracker.start_eval(run, step)
            log_eval(tracker, ev, run, step, task_eval("addition", acc))
            tracker.end(ev)
    return {"uri": uri, "job": job, "trials": trials, "root": root, "tracker": tracker}


def test_compare_an_experiment_uses_each_trials_latest_checkpoint(store, tmp_path):
    comp = compare(["cmp"], "addition", tracking_uri=store["uri"], png=tmp_path / "c.png")
    assert [c.step for c in comp.curves] == [20, 20]
    assert sorted(c.trial_run_id for c in comp.curves) == sorted(store["trials"])
    by_trial = {c.trial_run_id: c for c in comp.curves}
    sft, stars = (by_trial[t] for t in store["trials"])
    assert sft.acc == CURVES[0][20] and stars.acc == CURVES[1][20]
    assert sft.summary["addition/drop_at_8"] == pytest.approx(0.5)
    assert stars.summary["addition/drop_at_16"] == 0.0
    assert comp.depths == list(DEPTHS)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table(comp).splitlines()
    assert table[1].split()[:3] == ["run", "1", "2"] and table[1].split()[-3:] == ["peak", "drop@8", "drop@16"]
    sft_row = next(line for line in table if line.startswith(sft.label))
    assert sft_row.split()[-3:] == ["0.900@1", "50.0%", "50.0%"]
    assert len(sft_row.split()) == 1 + 16 + 3
    assert sft.label.endswith("@20") and "t000" in sft.label


def test_compare_runs_by_id_and_name_steps_and_all_steps(store):
    sft_trial = store["trials"][0]
    one = compare([sft_trial], "addition", tracking_uri=store["uri"])
    assert [c.step for c in one.curves] == [20]
    early = compare([sft_trial], "addition", tracking_uri=store["uri"], step=10)
    assert early.curves[0].acc == CURVES[0][10]
    both = compare([sft_trial], "addition", tracking_uri=store["uri"], all_steps=True)
    assert [c.step for c in both.curves] == [10, 20]
    via_job = compare([store["job"]], "addition", tracking_uri=store["uri"])  # job run -> its trials
    assert len(via_job.curves) == 2
    eval_run = one.curves[0].run_id
    assert compare([eval_run, sft_trial], "addition", tracking_uri=store["uri"]).curves[0].run_id == eval_run
    trial_name = store["tracker"].client.get_run(sft_trial).info.run_name
    assert compare([trial_name], None, tracking_uri=store["uri"]).task == "addition"  # the only task
    with pytest.raises(CompareError, match=r"no checkpoint evaluated at step 15; steps: \[10, 20\]"):
        compare([sft_trial], "addition", tracking_uri=store["uri"], step=15)


def test_compare_says_what_exists_when_the_experiment_or_task_does_not(store):
    with pytest.raises(CompareError) as err:
        compare(["no-such-experiment"], "addition", tracking_uri=store["uri"])
    assert "no experiment, run id or run name 'no-such-experiment'" in str(err.value)
    assert "'cmp'" in str(err.value)  # lists the experiments that exist
    with pytest.raises(CompareError, match="no selected run has task 'gsm8k'.*tasks that exist: addition"):
        compare(["cmp"], "gsm8k", tracking_uri=store["uri"])
    missing = store["root"] / "elsewhere" / "mlflow.db"
    with pytest.raises(CompareError, match="no MLflow store at sqlite:///.*elsewhere/mlflow.db"):
        compare(["cmp"], "addition", tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # not created by asking


def test_starsctl_compare_prints_table_and_writes_png(store, tmp_path):
    png = tmp_path / "overlay.png"
    res = runner.invoke(app, ["compare", "cmp", "--task", "addition", "--tracking-uri", store["uri"],
                              "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert "addition/acc by depth" in res.output and "drop@16" in res.output
    assert png.is_file() and f"wrote {png}" in res.output
    md = runner.invoke(app, ["compare", "cmp", "--task", "addition", "--tracking-uri", store["uri"],
                             "--out", str(png), "--markdown"])
    assert md.exit_code == 0, md.output
    rows = [line for line in md.output.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| run | 1 | 2 |") and rows[0].endswith("| peak | drop@8 | drop@16 |")
    assert set(rows[1].replace("|", "")) <= {"-", ":"} and len(rows) >= 3
    assert all(r.count("|") == rows[0].count("|") for r in rows)


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        (["compare", "nope"], ["no experiment, run id or run name 'nope'", "experiments that exist: 'cmp'"]),
        (["compare", "cmp", "--task", "math500"], ["no selected run has task 'math500'", "tasks that exist: addition"]),
    ],
)
def test_starsctl_compare_user_errors_exit_2(store, args, messages, tmp_path):
    res = runner.invoke(app, [*args, "--tracking-uri", store["uri"], "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 2, res.output
    for message in messages:
        assert message in res.output
    assert "Traceback" not in res.output
    assert not Path(tmp_path / "x.png").exists()


def test_log_task_eval_is_idempotent(store):
    tracker, trial = store["tracker"], store["trials"][1]
    ev = tracker.start_eval(trial, 20)  # the existing eval run
    log_eval(tracker, ev, trial, 20, task_eval("addition", CURVES[1][20]))  # a retried unit
    assert len(tracker.metric_history(ev, "addition/acc")) == 16
    assert tracker.metric_history(ev, "dyn/rho") == [(4, 0.9)]
    assert [s for s, _ in tracker.metric_history(trial, "addition/peak_acc")] == [10, 20]
