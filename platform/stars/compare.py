"""`starsctl compare`: depth curves read back from MLflow, as one table and one overlay PNG.

Where the curves are (docs/architecture.md): each evaluated checkpoint is a run `eval@step=N`
(tag `stars.kind = eval`) nested under its trial run, with `<task>/acc` logged at step = depth.
A reference on the command line may be an experiment name (every trial in it), a run id or a run
name (an eval run itself, a trial run, or a job run whose trials are compared). Per trial the
latest evaluated checkpoint is used unless `step` or `all_steps` says otherwise.

No torch, no Ray: MLflow, and `stars.evaluation` for the summary and (matplotlib) the PNG.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stars.errors import UserError
from stars.evaluation.reports import plot_depth_curves
from stars.evaluation.summary import DROP_DEPTHS, summary_metrics
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


def select_eval_runs(
    client: Any, refs: Sequence[str], *, step: int | None = None, all_steps: bool = False
) -> list[Any]:
    """The eval runs to compare: per trial its latest evaluated checkpoint (or the one at `step`,
    or all of them), in the order the references were given, without duplicates."""
    chosen: list[Any] = []
    seen: set[str] = set()
    for ref in refs:
        runs = _runs_for(client, ref)
        by_trial: dict[str, list[Any]] = {}
        for r in runs:
            by_trial.setdefault(r.data.tags.get(TAG_PARENT, r.info.run_id), []).append(r)
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
    return chosen


def tasks_of(runs: Iterable[Any]) -> list[str]:
    """Tasks with a depth curve (`<task>/acc`) in any of the runs."""
    found = set()
    for r in runs:
        for key in r.data.metrics:
            m = _ACC.match(key)
            if m:
                found.add(m.group("task"))
    return sorted(found)


def _label(client: Any, run: Any, parents: dict[str, str]) -> str:
    parent = run.data.tags.get(TAG_PARENT)
    if parent and parent not in parents:
        try:
            parents[parent] = client.get_run(parent).info.run_name or parent[:8]
        except Exception:  # noqa: BLE001 - a deleted parent: fall back to its id
            parents[parent] = parent[:8]
    base = parents.get(parent, "") if parent else ""
    s = _step(run)
    return f"{base}@{s}" if base and s is not None else (run.info.run_name or run.info.run_id[:8])


def read_curve(client: Any, run_id: str, task: str) -> dict[int, float]:
    """{depth: acc} of one eval run (the latest value where a depth was logged twice)."""
    latest: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, f"{task}/acc"):
        if m.step not in latest or m.timestamp >= latest[m.step][0]:
            latest[m.step] = (m.timestamp, m.value)
    return {d: v for d, (_, v) in sorted(latest.items())}


def compare(
    refs: Sequence[str],
    task: str | None = None,
    *,
    tracking_uri: str | None = None,
    png: str | Path | None = None,
    step: int | None = None,
    all_steps: bool = False,
) -> Comparison:
    """Read the `task` depth curves of the referenced runs/experiments; write the overlay PNG to
    `png` when given. `task=None` works when the runs hold exactly one task."""
    from mlflow.tracking import MlflowClient

    if not refs:
        raise CompareError("name at least one experiment, run id or run name to compare")
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # MLflow would create an empty store there; reading from one that is not there is a mistake
        raise CompareError(f"no MLflow store at {uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri)
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
    parents: dict[str, str] = {}
    curves, skipped = [], []
    for r in runs:
        label = _label(client, r, parents)
        if f"{task}/acc" not in r.data.metrics:
            skipped.append(label)
            continue
        acc = read_curve(client, r.info.run_id, task)
        curves.append(DepthCurve(label, r.info.run_id, r.data.tags.get(TAG_PARENT), _step(r), acc,
                                 summary_metrics(task, acc)))
    depths = sorted({d for c in curves for d in c.acc})
    result = Comparison(task, curves, depths, skipped)
    if png is not None:
        plot_comparison(result, png)
    return result


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
    lines = [f"{t}/acc by depth", head]
    for c in comp.curves:
        cells = " ".join(f"{c.acc[d]:>5.3f}" if d in c.acc else f"{'-':>5}" for d in comp.depths)
        s = c.summary
        peak = f"{s[f'{t}/peak_acc']:.3f}@{int(s[f'{t}/best_depth'])}" if f"{t}/peak_acc" in s else "-"
        drops = " ".join(f"{_drop_cell(s, t, d):>7}" for d in DROP_DEPTHS)
        lines.append(f"{c.label:<{width}} {cells} {peak:>10} {drops}")
    for label in comp.skipped:
        lines.append(f"(skipped {label}: no {t}/acc)")
    return "\n".join(lines)


def format_markdown(comp: Comparison) -> str:
    """The same table as `format_table` as a Markdown table (for docs: `starsctl compare ... --markdown`)."""
    t = comp.task
    head = ["run", *(str(d) for d in comp.depths), "peak", *(f"drop@{d}" for d in DROP_DEPTHS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for c in comp.curves:
        s = c.summary
        peak = f"{s[f'{t}/peak_acc']:.3f}@{int(s[f'{t}/best_depth'])}" if f"{t}/peak_acc" in s else "-"
        cells = [f"`{c.label}`", *(f"{c.acc[d]:.3f}" if d in c.acc else "-" for d in comp.depths), peak,
                 *(_drop_cell(s, t, d) for d in DROP_DEPTHS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
