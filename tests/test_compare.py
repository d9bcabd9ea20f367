"""`starsctl compare`: depth curves read back from a real MLflow store (sqlite), table and PNG."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from statistics import mean

import pytest
from typer.testing import CliRunner

from stars.cli import app
from stars.compare import MATH_BENCHMARKS, CompareError, compare, format_table, main_results
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


# --- the paper's main-results table -------------------------------------------------------------
# Three jobs (no sweep: each evaluates under its job run), every benchmark with its own level and a
# slope over depth, so each table cell is a different logged value. The base model has no amc23.
LEVEL = {"paper-base": (0.30, 0.005), "paper-sft": (0.55, 0.02), "paper-stars": (0.60, 0.001)}
MATH_ACC = {
    job: {b: {d: round(level + 0.05 * j - slope * d, 4) for d in DEPTHS}
          for j, b in enumerate(MATH_BENCHMARKS) if not (job == "paper-base" and b == "amc23")}
    for job, (level, slope) in LEVEL.items()
}
SFT_EARLY = {b: {d: 0.1 for d in DEPTHS} for b in MATH_BENCHMARKS}  # paper-sft at step 10


@pytest.fixture(scope="module")
def paper(store) -> dict:
    """The three paper jobs in `store`, evaluated at step 30 (SFT also at 10); `paper-short` has
    gsm8k at depths 1-4 only."""
    tracker, root, uri = store["tracker"], store["root"], store["uri"]
    jobs = {}
    plan = {**{job: {30: accs} for job, accs in MATH_ACC.items()},
            "paper-short": {30: {"gsm8k": {d: 0.5 for d in range(1, 5)}}}}
    plan["paper-sft"] = {10: SFT_EARLY, **plan["paper-sft"]}
    for job, evals in plan.items():
        spec = resolve_spec(JobSpec.model_validate({
            "name": job, "data": {"task": "addition"}, "train": {"max_steps": 30}, "tracking": {"uri": uri},
        }), cwd=root)
        job_run = tracker.start_job(spec, git=GIT)
        trial_run = tracker.start_trial(job_run, sweep_trials(spec)[0])
        for step, by_bench in evals.items():
            ev = tracker.start_eval(trial_run, step)
            for bench, acc in by_bench.items():
                log_eval(tracker, ev, trial_run, step, task_eval(bench, acc))
            tracker.end(ev)
        jobs[job] = job_run
    return {"uri": uri, "jobs": jobs}


PAPER = ["paper-base", "paper-sft", "paper-stars"]


def expected_row(job: str, depths: tuple[int, int] = (4, 8)) -> dict[str, float]:
    """The table's numbers (%) computed here from what was logged."""
    accs = MATH_ACC[job]
    out = {f"{b.upper() if b != 'asdiv' else 'ASDiv'}@{d}": 100 * a[d] for b, a in accs.items() for d in depths}
    avg = {d: mean(a[d] for a in accs.values()) for d in depths}
    out.update({f"Avg@{d}": 100 * avg[d] for d in depths})
    out[f"Drop {depths[0]}->{depths[1]} (%)"] = 100 * (avg[depths[0]] - avg[depths[1]]) / avg[depths[0]]
    return out


def assert_cells(header: list[str], cells: list[str], job: str, depths: tuple[int, int] = (4, 8)) -> None:
    want = expected_row(job, depths)
    got = dict(zip(header, cells))
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(value, abs=0.005), (job, name)  # printed with 2 decimals
    blank = {name for name, cell in got.items() if cell in ("-", "")} - {"missing"}
    assert blank == ({f"AMC23@{d}" for d in depths} if job == "paper-base" else set())


def test_main_results_numbers_come_from_the_logged_accuracies(paper):
    table = main_results(PAPER, tracking_uri=paper["uri"])
    assert [r.label for r in table.rows] == ["paper-base@30", "paper-sft@30", "paper-stars@30"]
    assert table.depths == [4, 8] and table.benchmarks == list(MATH_BENCHMARKS)
    base, sft, stars = table.rows
    assert sft.acc == {b: {4: a[4], 8: a[8]} for b, a in MATH_ACC["paper-sft"].items()}
    assert sft.average[8] == pytest.approx(mean(a[8] for a in MATH_ACC["paper-sft"].values()))
    assert base.missing == ["amc23"] and sft.missing == stars.missing == []
    assert base.average[4] == pytest.approx(mean(a[4] for a in MATH_ACC["paper-base"].values()))  # over 4
    assert sft.drop > stars.drop > 0  # the SFT shape collapses faster than the STARS shape
    header = table.header()
    assert header[:3] == ["run", "GSM8K@4", "GSM8K@8"] and header[-3:] == ["Avg@4", "Avg@8", "Drop 4->8 (%)"]
    assert "ASDiv@4" in header and len(header) == 1 + 2 * len(MATH_BENCHMARKS) + 2 + 1
    lines = table.table().splitlines()
    rows = [re.split(r" {2,}", line.strip()) for line in lines[1:4]]
    assert rows[0] == header
    for job, line in zip(PAPER[1:], rows[2:]):
        assert_cells(header, line, job)
    base_line = rows[1]
    assert base_line[0] == "paper-base@30" and base_line[header.index("AMC23@4")] == "-"
    assert_cells(header, base_line, "paper-base")
    assert "note: paper-base@30: Avg over 4 of 5 benchmarks (no amc23)" in lines
    assert not any("paper-sft" in line for line in lines if line.startswith("note"))


def test_main_results_markdown_and_csv_parse_back_to_the_same_numbers(paper):
    table = main_results(PAPER, [4, 16], labels=["Base", "SFT", "STARS"], tracking_uri=paper["uri"])
    md = [line for line in table.markdown().splitlines() if line.startswith("|")]
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head == table.header() and "Drop 4->16 (%)" in head
    assert set(md[1].replace("|", "")) <= {"-", ":"}
    for job, line in zip(PAPER, md[2:], strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == {"paper-base": "Base", "paper-sft": "SFT", "paper-stars": "STARS"}[job]
        assert_cells(head, cells, job, (4, 16))
    assert "Note: Base: Avg over 4 of 5 benchmarks (no amc23)." in table.markdown()
    records = list(csv.DictReader(io.StringIO(table.csv())))
    assert [r["run"] for r in records] == ["Base", "SFT", "STARS"]
    for job, record in zip(PAPER, records):
        assert_cells(list(record), list(record.values()), job, (4, 16))
    assert records[0]["missing"] == "amc23" and records[1]["missing"] == ""
    assert records[2]["eval_run_id"] == table.rows[2].run_id


def test_main_results_step_and_references_by_run_id(paper):
    sft_job = paper["jobs"]["paper-sft"]
    early = main_results([sft_job], tracking_uri=paper["uri"], step=10)
    assert early.rows[0].label == "paper-sft@10" and early.rows[0].average == {4: 0.1, 8: 0.1}
    assert early.rows[0].drop == 0.0
    assert main_results([sft_job], tracking_uri=paper["uri"]).rows[0].step == 30  # latest by default


@pytest.mark.parametrize(
    ("refs", "kwargs", "message"),
    [
        (["paper-sft", "nope"], {}, "no experiment, run id or run name 'nope'"),
        (["cmp"], {}, r"has no math benchmark \(gsm8k, math500, asdiv, svamp, amc23\); tasks it has: addition"),
        (["paper-short"], {}, r"gsm8k was not evaluated at depth 8; depths logged: \[1, 2, 3, 4\]"),
        (["paper-sft"], {"depths": [8]}, "at least two depths"),
        (["paper-sft", "paper-stars"], {"labels": ["SFT"]}, "2 references, 1 labels"),
        (["cmp"], {"labels": ["sweep"]}, "'cmp' stands for 2 checkpoints: cmp/t00"),
    ],
)
def test_main_results_user_errors(paper, refs, kwargs, message):
    with pytest.raises(CompareError, match=message):
        main_results(refs, tracking_uri=paper["uri"], **kwargs)


def test_starsctl_compare_main_table_text_markdown_and_csv(paper, tmp_path):
    out = tmp_path / "main.csv"
    args = ["compare", "--table", "main", *PAPER, "--tracking-uri", paper["uri"]]
    res = runner.invoke(app, [*args, "--csv", str(out), "--label", "Base", "--label", "SFT", "--label", "STARS"])
    assert res.exit_code == 0, res.output
    header = next(re.split(r" {2,}", line.strip()) for line in res.output.splitlines() if line.startswith("run"))
    stars_line = next(re.split(r" {2,}", line.strip()) for line in res.output.splitlines() if line.startswith("STARS"))
    assert_cells(header, stars_line, "paper-stars")
    assert f"wrote {out}" in res.output and not list(tmp_path.glob("*.png"))  # no PNG for this table
    records = list(csv.DictReader(out.open()))
    assert [r["run"] for r in records] == ["Base", "SFT", "STARS"]
    assert_cells(list(records[1]), list(records[1].values()), "paper-sft")
    md = runner.invoke(app, [*args, "--markdown", "--depths", "4,16"])
    assert md.exit_code == 0, md.output
    rows = [line for line in md.output.splitlines() if line.startswith("|")]
    assert "| Drop 4->16 (%) |" in rows[0] and len(rows) == 2 + 3
    assert all(r.count("|") == rows[0].count("|") for r in rows)


def test_starsctl_compare_depth_table_writes_csv(store, tmp_path):
    out = tmp_path / "depth.csv"
    res = runner.invoke(app, ["compare", "cmp", "--task", "addition", "--tracking-uri", store["uri"],
                              "--out", str(tmp_path / "c.png"), "--csv", str(out)])
    assert res.exit_code == 0, res.output
    records = list(csv.DictReader(out.open()))
    assert len(records) == 2 and {r["step"] for r in records} == {"20"}
    by_peak = sorted(records, key=lambda r: float(r["peak_acc"]))  # STARS shape peaks at 0.8, SFT at 0.9
    assert [float(by_peak[1][f"acc@{d}"]) for d in DEPTHS] == [CURVES[0][20][d] for d in DEPTHS]
    assert float(by_peak[1]["drop@8"]) == pytest.approx(0.5) and by_peak[1]["best_depth"] == "1"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["paper-sft", "no-such-run"], "no experiment, run id or run name 'no-such-run'"),
        (["paper-sft", "--task", "gsm8k"], "--task: not an option of --table main"),
        (["paper-sft", "--depths", "4"], "at least two depths"),
        (["paper-sft", "--depths", "4,x"], "--depths: expected depths like"),
    ],
)
def test_starsctl_compare_main_table_user_errors_exit_2(paper, args, message):
    res = runner.invoke(app, ["compare", "--table", "main", *args, "--tracking-uri", paper["uri"]])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_starsctl_compare_depth_table_rejects_main_table_options(store):
    res = runner.invoke(app, ["compare", "cmp", "--label", "x", "--tracking-uri", store["uri"]])
    assert res.exit_code == 2 and "--label: not an option of --table depth" in res.output


# ----------------------------------------------------------------------------- seeds, depth columns, wall
SEED_ACC = {  # (weight index, seed) -> accuracy at every depth
    (0, 0): 0.5, (0, 1): 0.7, (0, 2): 0.6,
    (1, 0): 0.9, (1, 1): 1.0, (1, 2): 0.8,
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict:
    """Experiment `seeded`: 2 weights x 3 seeds, one checkpoint each; the trial runs are ended, so
    they have a wall time."""
    root = tmp_path_factory.mktemp("seeded")
    uri = f"sqlite:///{root}/mlflow.db"
    spec = resolve_spec(JobSpec.model_validate({
        "name": "seeded", "data": {"task": "addition"}, "train": {"max_steps": 20},
        "sweep": {"grid": {"stars.jsrr.weight": [0.0, 0.1]}, "seeds": [0, 1, 2]}, "tracking": {"uri": uri},
    }), cwd=root)
    tracker = Tracker(uri, artifact_root=str(root / "mlruns"))
    job = tracker.start_job(spec, git=GIT)
    keys = {}
    for trial in sweep_trials(spec):
        run = tracker.start_trial(job, trial)
        weight, seed = [0.0, 0.1].index(trial.spec.stars.jsrr.weight), trial.spec.seed
        keys[trial.key] = (weight, seed)
        ev = tracker.start_eval(run, 20)
        # accuracy falls by 0.1 per depth past 8 (a drop@16 that differs by seed)
        acc = {d: max(0.0, SEED_ACC[weight, seed] - 0.05 * max(0, d - 8)) for d in DEPTHS}
        log_eval(tracker, ev, run, 20, task_eval("addition", acc))
        tracker.end(ev)
        tracker.end(run)
    return {"uri": uri, "keys": keys, "root": root}


def test_seed_groups_are_the_mean_and_sd_over_seeds_of_one_setting(seeded):
    from statistics import stdev

    from stars.compare import seed_group

    assert seed_group("job/t004-v=stars,seed=1@1500") == "job/v=stars"
    assert seed_group("job/t002-seed=2@10") == "job"
    assert seed_group("job/t001-weight=0.1,seed=0@20") == seed_group("job/t003-weight=0.1,seed=2@20")
    comp = compare(["seeded"], "addition", tracking_uri=seeded["uri"], depths=[1, 8, 16])
    assert comp.depths == [1, 8, 16] and len(comp.curves) == 6
    assert all(c.wall_s is not None and c.wall_s >= 0 for c in comp.curves)
    table = comp.seed_groups()
    assert [r.n for r in table.rows] == [3, 3]
    for row in table.rows:
        weight = 0 if "weight=0.0" in row.label else 1
        values = [SEED_ACC[weight, s] for s in range(3)]
        assert row.acc[1] == pytest.approx((mean(values), stdev(values)))
        assert row.acc[16] == pytest.approx((mean(v - 0.4 for v in values), stdev(values)))
        drops = [0.4 / v for v in values]
        assert row.drop[16] == pytest.approx((mean(drops), stdev(drops)))
    md = table.markdown().splitlines()
    assert md[0] == "| setting | seeds | 1 | 8 | 16 | peak | drop@8 | drop@16 | wall |"
    assert len(md) == 4 and all(line.count("|") == md[0].count("|") for line in md)
    parsed = list(csv.DictReader(io.StringIO(table.csv())))
    assert float(parsed[0]["mean@16"]) == pytest.approx(table.rows[0].acc[16][0])


def test_starsctl_compare_depth_columns_seeds_and_wall(seeded, tmp_path):
    res = runner.invoke(app, ["compare", "seeded", "--tracking-uri", seeded["uri"], "--depths", "1,4,16",
                              "--markdown", "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("|")]
    assert rows[0] == "| run | 1 | 4 | 16 | peak | drop@8 | drop@16 | wall |" and len(rows) == 8
    assert all(re.search(r"\| \d+\.\d min \|$", r) for r in rows[2:])
    res = runner.invoke(app, ["compare", "seeded", "--tracking-uri", seeded["uri"], "--seeds",
                              "--out", str(tmp_path / "c.png"), "--csv", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert "mean ± sd over seeds" in res.output and " ± " in res.output
    assert len(list(csv.DictReader(open(tmp_path / "s.csv")))) == 2
    res = runner.invoke(app, ["compare", "seeded", "--tracking-uri", seeded["uri"], "--table", "main", "--seeds"])
    assert res.exit_code == 2 and "--seeds: not an option of --table main" in res.output


def test_by_folds_every_trial_that_shares_a_key_value(seeded, tmp_path):
    """`--by seed` on the 2 weights x 3 seeds: one row per seed, mean ± sd over the two weights; names
    read from the trial keys, values that hold commas kept whole; a name no key has is one line."""
    from statistics import stdev

    from stars.compare import by_group, key_parts

    assert key_parts("job/t003-position=pre,type=rmsnorm@1200") == {"position": "pre", "type": "rmsnorm"}
    assert key_parts("job/t001-depths=[1,2],v=stars@10") == {"depths": "[1,2]", "v": "stars"}
    assert key_parts("job/eval@step=5") == {}
    assert by_group("job/t003-position=pre,type=rmsnorm@1200", ["position"]) == "job/position=pre"
    comp = compare(["seeded"], "addition", tracking_uri=seeded["uri"], depths=[1, 16])
    table = comp.grouped_by(["seed"])
    assert table.over == "trials" and [r.label.rsplit("/", 1)[-1] for r in table.rows] == ["seed=0", "seed=1", "seed=2"]
    for seed, row in enumerate(table.rows):
        values = [SEED_ACC[w, seed] for w in (0, 1)]
        assert row.n == 2 and row.acc[1] == pytest.approx((mean(values), stdev(values)))
    assert [r.n for r in comp.grouped_by(["weight"]).rows] == [3, 3]
    assert len(comp.grouped_by(["weight", "seed"]).rows) == 6
    with pytest.raises(CompareError, match="--by position: no trial key has it; the trial keys name seed, weight"):
        comp.grouped_by(["position"])

    res = runner.invoke(app, ["compare", "seeded", "--tracking-uri", seeded["uri"], "--by", "seed", "--markdown",
                              "--depths", "1,16", "--out", str(tmp_path / "c.png")])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("|")]
    assert rows[0] == "| setting | trials | 1 | 16 | peak | drop@8 | drop@16 | wall |" and len(rows) == 5
    for args, problem in ((["--by", "seed", "--seeds"], "--seeds and --by: give one"),
                          (["--by", "nope"], "--by nope: no trial key has it")):
        res = runner.invoke(app, ["compare", "seeded", "--tracking-uri", seeded["uri"], *args,
                                  "--out", str(tmp_path / "c.png")])
        assert res.exit_code == 2 and problem in res.output, res.output
