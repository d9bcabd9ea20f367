"""`starsctl compare`: depth curves read back from MLflow, as tables and one overlay PNG.

Where the curves are (docs/architecture.md): each evaluated checkpoint is a run `eval@step=N`
(tag `stars.kind = eval`) nested under its trial run, with `<task>/acc` logged at step = depth.
A reference on the command line may be an experiment name (every trial in it), a run id or a run
name (an eval run itself, a trial run, or a job run whose trials are compared). Per trial the
latest evaluated checkpoint is used unless `step` or `all_steps` says otherwise.

Two tables: `compare` gives one task's depth curves (runs x depths, peak, drops; `Comparison`), and
`main_results` the paper's main-results table (runs x math benchmarks at a few loop depths, their
average and its relative drop; `MainTable`). Both print as text, Markdown and CSV.

No torch, no Ray: MLflow, `stars.evaluation` for the summary and (matplotlib) the PNG, and
`stars.tasks.benchmarks` for the names of the math benchmarks.
"""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stars.errors import UserError
from stars.evaluation.reports import plot_depth_curves
from stars.evaluation.summary import DROP_DEPTHS, summary_metrics
from stars.tasks.benchmarks import BENCHMARKS
from stars.tracking import TAG_KIND, TAG_PARENT, TAG_STEP, resolve_tracking_uri

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_ACC = re.compile(r"^(?P<task>[^/]+)/acc$")


class CompareError(UserError):
    """What the user asked for does not exist; the message lists what does."""


@dataclass
class DepthCurve:
    label: str
    run_id: str  # the eval run
    trial_run_id: str | None
    step: int | None
    acc: dict[int, float]
    summary: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None  # the trial run's start to end in MLflow (a resumed trial: its first start)


@dataclass
class Comparison:
    task: str
    curves: list[DepthCurve]
    depths: list[int]
    skipped: list[str]  # labels of runs without this task
    png: Path | None = None

    def table(self) -> str:
        return format_table(self)

    def markdown(self) -> str:
        return format_markdown(self)

    def csv(self) -> str:
        return format_csv(self)

    def seed_groups(self) -> GroupTable:
        return group_rows(self)

    def grouped_by(self, names: Sequence[str]) -> GroupTable:
        return group_rows(self, by=names)


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _search(client: Any, experiment_ids: list[str], filt: str) -> list[Any]:
    from mlflow.entities import ViewType

    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                                  max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _experiments(client: Any) -> list[Any]:
    return list(client.search_experiments())


def _experiment_names(client: Any) -> list[str]:
    """Names worth listing: every experiment but MLflow's empty built-in `Default`."""
    names = []
    for e in _experiments(client):
        if e.experiment_id == "0" and not client.search_runs([e.experiment_id], max_results=1):
            continue
        names.append(e.name)
    return sorted(names)


def _eval_children(client: Any, run: Any) -> list[Any]:
    kids = _search(client, [run.info.experiment_id], f"tags.`{TAG_PARENT}` = '{run.info.run_id}'")
    evals = [r for r in kids if r.data.tags.get(TAG_KIND) == "eval"]
    for trial in (r for r in kids if r.data.tags.get(TAG_KIND) == "trial"):
        evals.extend(_eval_children(client, trial))
    return evals


def _runs_for(client: Any, ref: str) -> list[Any]:
    """Eval runs a command-line reference stands for."""
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            return [run] if run.data.tags.get(TAG_KIND) == "eval" else _eval_children(client, run)
    exp = client.get_experiment_by_name(ref)
    if exp is not None and exp.lifecycle_stage == "active":
        runs = _search(client, [exp.experiment_id], f"tags.`{TAG_KIND}` = 'eval'")
        if not runs:
            raise CompareError(f"experiment {ref!r} has no evaluated checkpoints (no eval@step=N runs)")
        return runs
    ids = [e.experiment_id for e in _experiments(client)]
    named = _search(client, ids, f"attributes.run_name = '{_quote(ref)}'") if ids else []
    if named:
        out = []
        for run in named:
            out.extend([run] if run.data.tags.get(TAG_KIND) == "eval" else _eval_children(client, run))
        if not out:
            raise CompareError(f"run {ref!r} has no evaluated checkpoints (no eval@step=N runs under it)")
        return out
    names = _experiment_names(client)
    listed = ", ".join(repr(n) for n in names) if names else "none"
    raise CompareError(f"no experiment, run id or run name {ref!r} in the tracking store; experiments that exist: {listed}")


def _step(run: Any) -> int | None:
    raw = run.data.tags.get(TAG_STEP)
    if raw is None:
        m = re.match(r"^eval@step=(\d+)$", run.info.run_name or "")
        raw = m.group(1) if m else None
    return int(raw) if raw is not None else None


def _select_per_ref(
    client: Any, refs: Sequence[str], *, step: int | None = None, all_steps: bool = False
) -> list[tuple[str, list[Any]]]:
    """Per reference, in the order given, the eval runs it stands for: per trial its latest evaluated
    checkpoint (or the one at `step`, or all of them); a run an earlier reference chose is left out."""
    out: list[tuple[str, list[Any]]] = []
    seen: set[str] = set()
    for ref in refs:
        runs = _runs_for(client, ref)
        by_trial: dict[str, list[Any]] = {}
        for r in runs:
            by_trial.setdefault(r.data.tags.get(TAG_PARENT, r.info.run_id), []).append(r)
        chosen: list[Any] = []
        for group in by_trial.values():
            group.sort(key=lambda r: (_step(r) is None, _step(r) or 0))
            if step is not None:
                pick = [r for r in group if _step(r) == step]
                if not pick:
                    have = sorted(s for s in (_step(r) for r in group) if s is not None)
                    raise CompareError(f"{ref!r} has no checkpoint evaluated at step {step}; steps: {have}")
            elif all_steps:
                pick = group
            else:
                pick = [group[-1]]
            for r in pick:
                if r.info.run_id not in seen:
                    seen.add(r.info.run_id)
                    chosen.append(r)
        out.append((ref, chosen))
    return out


def select_eval_runs(
    client: Any, refs: Sequence[str], *, step: int | None = None, all_steps: bool = False
) -> list[Any]:
    """The eval runs to compare: per trial its latest evaluated checkpoint (or the one at `step`,
    or all of them), in the order the references were given, without duplicates."""
    return [r for _, runs in _select_per_ref(client, refs, step=step, all_steps=all_steps) for r in runs]


def tasks_of(runs: Iterable[Any]) -> list[str]:
    """Tasks with a depth curve (`<task>/acc`) in any of the runs."""
    found = set()
    for r in runs:
        for key in r.data.metrics:
            m = _ACC.match(key)
            if m:
                found.add(m.group("task"))
    return sorted(found)


def _parent_info(client: Any, run_id: str, parents: dict[str, Any]) -> Any:
    """The `RunInfo` of a parent (trial) run, read once per comparison; None when it was deleted."""
    if run_id not in parents:
        try:
            parents[run_id] = client.get_run(run_id).info
        except Exception:  # noqa: BLE001 - a deleted parent: no name, no wall time
            parents[run_id] = None
    return parents[run_id]


def _label(client: Any, run: Any, parents: dict[str, Any]) -> str:
    parent = run.data.tags.get(TAG_PARENT)
    info = _parent_info(client, parent, parents) if parent else None
    base = ((info.run_name if info else None) or parent[:8]) if parent else ""
    s = _step(run)
    return f"{base}@{s}" if base and s is not None else (run.info.run_name or run.info.run_id[:8])


def read_curve(client: Any, run_id: str, task: str) -> dict[int, float]:
    """{depth: acc} of one eval run (the latest value where a depth was logged twice)."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, f"{task}/acc"):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return {d: v for d, (_, v) in sorted(latest.items())}


def _open_store(refs: Sequence[str], tracking_uri: str | None) -> Any:
    """An MlflowClient on an existing store, once there is something to look up in it."""
    from mlflow.tracking import MlflowClient

    if not refs:
        raise CompareError("name at least one experiment, run id or run name to compare")
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # MLflow would create an empty store there; reading from one that is not there is a mistake
        raise CompareError(f"no MLflow store at {uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return MlflowClient(tracking_uri=uri)


def compare(
    refs: Sequence[str],
    task: str | None = None,
    *,
    tracking_uri: str | None = None,
    png: str | Path | None = None,
    step: int | None = None,
    all_steps: bool = False,
    depths: Sequence[int] | None = None,
) -> Comparison:
    """Read the `task` depth curves of the referenced runs/experiments; write the overlay PNG to
    `png` when given. `task=None` works when the runs hold exactly one task. `depths` chooses the
    table's depth columns (default: every depth evaluated); peak and drops use the whole curve."""
    client = _open_store(refs, tracking_uri)
    runs = select_eval_runs(client, refs, step=step, all_steps=all_steps)
    available = tasks_of(runs)
    if task is None:
        if len(available) != 1:
            raise CompareError(f"say which task to compare with --task; tasks in these runs: {', '.join(available) or 'none'}")
        task = available[0]
    if task not in available:
        raise CompareError(
            f"no selected run has task {task!r} (no metric {task}/acc); tasks that exist: {', '.join(available) or 'none'}"
        )
    parents: dict[str, Any] = {}  # trial run id -> RunInfo: one read for its label and its wall time
    curves, skipped = [], []
    for r in runs:
        label = _label(client, r, parents)
        if f"{task}/acc" not in r.data.metrics:
            skipped.append(label)
            continue
        acc = read_curve(client, r.info.run_id, task)
        trial = r.data.tags.get(TAG_PARENT)
        curves.append(DepthCurve(label, r.info.run_id, trial, _step(r), acc, summary_metrics(task, acc),
                                 _wall_seconds(client, trial, parents) if trial else None))
    shown = list(depths) if depths else sorted({d for c in curves for d in c.acc})
    result = Comparison(task, curves, shown, skipped)
    if png is not None:
        plot_comparison(result, png)
    return result


def _wall_seconds(client: Any, run_id: str, parents: dict[str, Any]) -> float | None:
    """Seconds from a trial run's start to its end in MLflow (None while it runs)."""
    info = _parent_info(client, run_id, parents)
    return (info.end_time - info.start_time) / 1000 if info and info.end_time and info.start_time else None


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def plot_comparison(comp: Comparison, path: str | Path) -> Path:
    """One PNG overlaying every compared depth curve."""
    comp.png = plot_depth_curves({c.label: c.acc for c in comp.curves}, path, title=f"{comp.task}: accuracy vs depth")
    return comp.png


def _drop_cell(summary: dict[str, float], task: str, depth: int) -> str:
    key = f"{task}/drop_at_{depth}"
    return f"{100 * summary[key]:.1f}%" if key in summary else "-"


def format_table(comp: Comparison) -> str:
    """Rows = runs, columns = depths, then peak (at depth) and the relative drop from it at each of
    `DROP_DEPTHS` (drop@8, drop@16, in %)."""
    t = comp.task
    width = max([len("run"), *(len(c.label) for c in comp.curves)])
    head = f"{'run':<{width}} " + " ".join(f"{d:>5}" for d in comp.depths)
    head += f" {'peak':>10} " + " ".join(f"{f'drop@{d}':>7}" for d in DROP_DEPTHS)
    wall = _has_wall(comp)
    head += f" {'wall':>9}" if wall else ""
    lines = [f"{t}/acc by depth", head]
    for c in comp.curves:
        cells = " ".join(f"{c.acc[d]:>5.3f}" if d in c.acc else f"{'-':>5}" for d in comp.depths)
        s = c.summary
        peak = f"{s[f'{t}/peak_acc']:.3f}@{int(s[f'{t}/best_depth'])}" if f"{t}/peak_acc" in s else "-"
        drops = " ".join(f"{_drop_cell(s, t, d):>7}" for d in DROP_DEPTHS)
        lines.append(f"{c.label:<{width}} {cells} {peak:>10} {drops}" + (f" {_minutes(c.wall_s):>9}" if wall else ""))
    for label in comp.skipped:
        lines.append(f"(skipped {label}: no {t}/acc)")
    return "\n".join(lines)


def format_markdown(comp: Comparison) -> str:
    """The same table as `format_table` as a Markdown table (for docs: `starsctl compare ... --markdown`)."""
    t = comp.task
    wall = _has_wall(comp)
    head = ["run", *(str(d) for d in comp.depths), "peak", *(f"drop@{d}" for d in DROP_DEPTHS), *(["wall"] * wall)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c in comp.curves:
        s = c.summary
        peak = f"{s[f'{t}/peak_acc']:.3f}@{int(s[f'{t}/best_depth'])}" if f"{t}/peak_acc" in s else "-"
        cells = [f"`{c.label}`", *(f"{c.acc[d]:.3f}" if d in c.acc else "-" for d in comp.depths), peak,
                 *(_drop_cell(s, t, d) for d in DROP_DEPTHS), *([_minutes(c.wall_s)] * wall)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _has_wall(comp: Comparison) -> bool:
    return any(c.wall_s is not None for c in comp.curves)


def format_csv(comp: Comparison) -> str:
    """The depth table as CSV, values as logged (fractions, not rounded): run, eval run id, training
    step, acc at each depth, peak acc and its depth, and the drop from the peak at `DROP_DEPTHS`."""
    t = comp.task
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run", "eval_run_id", "step", *(f"acc@{d}" for d in comp.depths), "peak_acc", "best_depth",
                     *(f"drop@{d}" for d in DROP_DEPTHS), "wall_s"])
    for c in comp.curves:
        s = c.summary
        best = s.get(f"{t}/best_depth")
        writer.writerow([c.label, c.run_id, "" if c.step is None else c.step,
                         *(c.acc.get(d, "") for d in comp.depths), s.get(f"{t}/peak_acc", ""),
                         "" if best is None else int(best), *(s.get(f"{t}/drop_at_{d}", "") for d in DROP_DEPTHS),
                         "" if c.wall_s is None else round(c.wall_s, 1)])
    return buf.getvalue()


# Groups of trials as one row (mean and spread over the group): the seeds of one setting (`--seeds`), or
# every trial with the same value of some trial-key names (`--by position`: the norm study's 4 positions,
# each over its 3 types).
_TRIAL_INDEX = re.compile(r"(^|/)t\d+-")
_SEED = re.compile(r",?\bseed=\d+")
_KEY_PART = re.compile(r",(?=[A-Za-z_][\w.]*=)")  # a comma that starts the next `name=`; values may hold commas


def seed_group(label: str) -> str:
    """A curve's label less what differs between seeds of one setting: the trial index, `seed=N` and
    the checkpoint step (`job/t004-v=stars,seed=1@1500` -> `job/v=stars`)."""
    base = label.rsplit("@", 1)[0]
    base = _SEED.sub("", _TRIAL_INDEX.sub(r"\1", base))
    return base.replace("-,", "-").rstrip("/,-") or base


def key_parts(label: str) -> dict[str, str]:
    """The `name=value` parts of a curve's trial key (`job/t003-position=pre,type=rmsnorm@1200` ->
    {position: pre, type: rmsnorm}); names as `stars.spec.sweep.trial_key` shortens them."""
    trial = label.rsplit("@", 1)[0].rsplit("/", 1)[-1]
    if not _TRIAL_INDEX.match(trial):
        return {}
    parts = [p.partition("=") for p in _KEY_PART.split(_TRIAL_INDEX.sub("", trial, count=1)) if "=" in p]
    return {name: value for name, _, value in parts}


def by_group(label: str, names: Sequence[str]) -> str:
    """The row a curve joins under `--by names`: its job prefix and just those key parts
    (`job/t003-position=pre,type=rmsnorm@1200`, by position -> `job/position=pre`)."""
    base = label.rsplit("@", 1)[0]
    prefix = base.rsplit("/", 1)[0] + "/" if "/" in base else ""
    parts = key_parts(label)
    return prefix + ",".join(f"{n}={parts[n]}" for n in names if n in parts)


@dataclass
class GroupRow:
    label: str
    n: int
    acc: dict[int, tuple[float, float]]  # depth -> (mean, sd) over the group
    peak: tuple[float, float]
    drop: dict[int, tuple[float, float]]  # DROP_DEPTHS -> (mean, sd)
    wall_s: float | None  # mean


@dataclass
class GroupTable:
    """One row per group of trials: each depth's accuracy as mean and sample standard deviation over
    the group (`over`: "seeds" for `--seeds`, "trials" for `--by`)."""

    task: str
    depths: list[int]
    rows: list[GroupRow]
    over: str = "seeds"

    def _cells(self, row: GroupRow) -> list[str]:
        return [*(_mean_sd(row.acc.get(d)) for d in self.depths), _mean_sd(row.peak),
                *(_mean_sd(row.drop.get(d), pct=True) for d in DROP_DEPTHS), _minutes(row.wall_s)]

    def _head(self) -> list[str]:
        return ["setting", self.over, *(str(d) for d in self.depths), "peak", *(f"drop@{d}" for d in DROP_DEPTHS),
                "wall"]

    def table(self) -> str:
        rows = [self._head()] + [[r.label, str(r.n), *self._cells(r)] for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"{self.task}/acc by depth, mean ± sd over {self.over}"]
        for row in rows:
            lines.append(" ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        return "\n".join(lines)

    def markdown(self) -> str:
        head = self._head()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join([f"`{r.label}`", str(r.n), *self._cells(r)]) + " |" for r in self.rows]
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["setting", self.over, *(f"{k}@{d}" for d in self.depths for k in ("mean", "sd")),
                         "peak_mean", "peak_sd", *(f"drop@{d}_{k}" for d in DROP_DEPTHS for k in ("mean", "sd")),
                         "wall_s"])
        for r in self.rows:
            writer.writerow([r.label, r.n, *(v for d in self.depths for v in r.acc.get(d, ("", ""))), *r.peak,
                             *(v for d in DROP_DEPTHS for v in r.drop.get(d, ("", ""))),
                             "" if r.wall_s is None else round(r.wall_s, 1)])
        return buf.getvalue()


def _mean_sd(value: tuple[float, float] | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    mean_, sd = value
    return f"{100 * mean_:.1f}% ± {100 * sd:.1f}" if pct else f"{mean_:.3f} ± {sd:.3f}"


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def group_rows(comp: Comparison, by: Sequence[str] | None = None) -> GroupTable:
    """`comp`'s curves as one row per group, in the order groups first appear: without `by` the seeds
    of each setting (`seed_group`), with `by` the trials that share the values of those key names
    (`by_group`; sorted by them). A name no trial key has is a CompareError listing those there are."""
    t, groups = comp.task, {}
    if by:
        known = {name for c in comp.curves for name in key_parts(c.label)}
        unknown = [n for n in by if n not in known]
        if unknown:
            raise CompareError(f"--by {', '.join(unknown)}: no trial key has it; the trial keys name "
                               f"{', '.join(sorted(known)) or 'nothing (the runs are not sweep trials)'}")
    for c in comp.curves:
        groups.setdefault(by_group(c.label, by) if by else seed_group(c.label), []).append(c)
    rows = []
    for label, curves in sorted(groups.items()) if by else groups.items():
        acc = {d: _stats([c.acc[d] for c in curves if d in c.acc]) for d in comp.depths
               if any(d in c.acc for c in curves)}
        peaks = [c.summary[f"{t}/peak_acc"] for c in curves if f"{t}/peak_acc" in c.summary]
        drops = {d: _stats(v) for d in DROP_DEPTHS
                 if (v := [c.summary[f"{t}/drop_at_{d}"] for c in curves if f"{t}/drop_at_{d}" in c.summary])}
        walls = [c.wall_s for c in curves if c.wall_s is not None]
        rows.append(GroupRow(label, len(curves), acc, _stats(peaks) if peaks else (float("nan"), 0.0), drops,
                             statistics.fmean(walls) if walls else None))
    return GroupTable(t, list(comp.depths), rows, over="trials" if by else "seeds")


# The paper's main-results table: math benchmarks x loop depths, their average and its relative drop.
MATH_BENCHMARKS: tuple[str, ...] = tuple(BENCHMARKS)  # gsm8k, math500, asdiv, svamp, amc23: the paper's order
MAIN_DEPTHS: tuple[int, ...] = (4, 8)
_PAPER_SPELLING = {"asdiv": "ASDiv"}  # column names are upper case but for these


@dataclass
class MainRow:
    """One run of the main-results table. Accuracies are fractions as logged; the table prints %."""

    label: str
    run_id: str  # the eval run
    step: int | None
    acc: dict[str, dict[int, float]]  # benchmark -> {depth: acc}, for the benchmarks the run has
    missing: list[str]  # math benchmarks without `<task>/acc` in this run: '-' and not averaged
    average: dict[int, float]  # depth -> mean over the benchmarks in `acc`
    drop: float | None  # (average[first] - average[last]) / average[first]; None when average[first] == 0


@dataclass
class MainTable:
    """Rows = runs in the order given; columns = each benchmark's accuracy at each depth, the average
    over benchmarks at each depth, and the relative drop of that average from the first depth to the last."""

    depths: list[int]
    benchmarks: list[str]
    rows: list[MainRow]

    def header(self) -> list[str]:
        names = [_PAPER_SPELLING.get(b, b.upper()) for b in self.benchmarks]
        first, last = self.depths[0], self.depths[-1]
        return ["run", *(f"{n}@{d}" for n in names for d in self.depths), *(f"Avg@{d}" for d in self.depths),
                f"Drop {first}->{last} (%)"]

    def cells(self, row: MainRow, absent: str = "-") -> list[str]:
        """The numbers of one row as printed: percentages with 2 decimals, `absent` where there is none."""
        accs = [_pct(row.acc[b][d]) if b in row.acc else absent for b in self.benchmarks for d in self.depths]
        drop = _pct(row.drop) if row.drop is not None else absent
        return [row.label, *accs, *(_pct(row.average[d]) for d in self.depths), drop]

    def notes(self) -> list[str]:
        """What a reader must know to read the averages: the rows that average fewer benchmarks."""
        n = len(self.benchmarks)
        return [f"{r.label}: Avg over {n - len(r.missing)} of {n} benchmarks (no {', '.join(r.missing)})"
                for r in self.rows if r.missing]

    def table(self) -> str:
        """Aligned text; columns are separated by two spaces (labels may hold one)."""
        grid = [self.header(), *(self.cells(r) for r in self.rows)]
        widths = [max(len(line[i]) for line in grid) for i in range(len(grid[0]))]
        first, last = self.depths[0], self.depths[-1]
        lines = [f"accuracy (%) at depth {', '.join(map(str, self.depths))}; Avg = mean over the benchmarks a run has; "
                 f"Drop = (Avg@{first} - Avg@{last}) / Avg@{first}"]
        for line in grid:
            lines.append("  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:], widths[1:]))]))
        return "\n".join(lines + [f"note: {n}" for n in self.notes()])

    def markdown(self) -> str:
        head = self.header()
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows]
        notes = self.notes()
        return "\n".join(lines + ([""] + [f"Note: {n}." for n in notes] if notes else []))

    def csv(self) -> str:
        """The same numbers as CSV: empty cells where a benchmark is missing, then the missing
        benchmarks (space-separated) and the eval run id."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([*self.header(), "missing", "eval_run_id"])
        for r in self.rows:
            writer.writerow([*self.cells(r, absent=""), " ".join(r.missing), r.run_id])
        return buf.getvalue()


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def _main_row(client: Any, run: Any, label: str, depths: list[int]) -> MainRow:
    have = [b for b in MATH_BENCHMARKS if f"{b}/acc" in run.data.metrics]
    if not have:
        tasks = ", ".join(tasks_of([run])) or "none"
        raise CompareError(f"{label!r} (eval run {run.info.run_id}) has no math benchmark "
                           f"({', '.join(MATH_BENCHMARKS)}); tasks it has: {tasks}")
    acc: dict[str, dict[int, float]] = {}
    for b in have:
        curve = read_curve(client, run.info.run_id, b)
        absent = [d for d in depths if d not in curve]
        if absent:
            raise CompareError(f"{label!r}: {b} was not evaluated at depth {', '.join(map(str, absent))}; "
                               f"depths logged: {list(curve)}")
        acc[b] = {d: curve[d] for d in depths}
    average = {d: sum(acc[b][d] for b in have) / len(have) for d in depths}
    first, last = average[depths[0]], average[depths[-1]]
    return MainRow(label, run.info.run_id, _step(run), acc, [b for b in MATH_BENCHMARKS if b not in acc],
                   average, (first - last) / first if first else None)


def main_results(
    refs: Sequence[str],
    depths: Sequence[int] | None = None,
    *,
    labels: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    step: int | None = None,
    all_steps: bool = False,
) -> MainTable:
    """The paper's main-results table of the referenced runs (one row per selected eval run, in the
    order of `refs`): math-benchmark accuracy at `depths` (default `MAIN_DEPTHS`), their average and
    its relative drop from the first depth to the last. `labels`, one per reference, name the rows;
    each labelled reference must then stand for one checkpoint. Without labels a row is named
    `<trial run name>@<step>` as in the depth table."""
    ds = sorted(set(depths if depths is not None else MAIN_DEPTHS))
    if len(ds) < 2 or ds[0] < 1:
        raise CompareError(f"the main table needs at least two depths >= 1 (the drop is first -> last), got {ds}")
    if labels is not None and len(labels) != len(refs):
        raise CompareError(f"give one label per reference: {len(refs)} references, {len(labels)} labels")
    client = _open_store(refs, tracking_uri)
    parents: dict[str, Any] = {}
    rows = []
    for i, (ref, runs) in enumerate(_select_per_ref(client, refs, step=step, all_steps=all_steps)):
        names = [_label(client, r, parents) for r in runs]
        if labels is not None:
            if len(runs) != 1:
                listed = f": {', '.join(names)}" if names else " (its checkpoint is already in an earlier row)"
                raise CompareError(f"a label names one row, but {ref!r} stands for {len(runs)} checkpoints{listed}; "
                                   "name one trial or eval run instead")
            names = [labels[i]]
        rows.extend(_main_row(client, r, name, ds) for r, name in zip(runs, names))
    return MainTable(ds, list(MATH_BENCHMARKS), rows)
