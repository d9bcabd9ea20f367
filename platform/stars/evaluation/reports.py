"""Reports of depth curves: the CSV depth table, PNG plots and the text table `starsctl eval` prints.

matplotlib is imported (Agg backend) only when a plot is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from stars.evaluation.scoring import DYN_KEYS, TaskEval
from stars.evaluation.summary import DROP_DEPTHS, SUMMARY_DEPTHS


def depth_table_csv(curves: Mapping[str, Mapping[int, float]]) -> str:
    """Depth curves as CSV: one row per depth, one column per metric (blank where a metric has no
    value at that depth)."""
    names = list(curves)
    depths = sorted({int(d) for c in curves.values() for d in c})
    rows = ["depth," + ",".join(names)]
    for d in depths:
        cells = []
        for n in names:
            v = curves[n].get(d)
            cells.append("" if v is None else repr(float(v)))
        rows.append(f"{d}," + ",".join(cells))
    return "\n".join(rows) + "\n"


def task_table_csv(ev: TaskEval) -> str:
    """One row per depth: depth, acc, hidden_norm, step_size, dist_from_start, rho (blank where not
    measured)."""
    cols: dict[str, Mapping[int, float]] = {"acc": ev.acc}
    cols.update({k: v for k, v in ev.dynamics.items()})
    return depth_table_csv(cols)


def plot_depth_curves(
    curves: Mapping[str, Mapping[int, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    ylabel: str = "accuracy",
    dynamics: Mapping[str, Mapping[int, float]] | None = None,
) -> Path:
    """Accuracy vs depth, one line per curve (label -> {depth: acc}); with `dynamics` a second panel
    shows hidden norm, step size, distance from start (and rho on its own axis). Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = 2 if dynamics else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 3.6 * panels), squeeze=False)
    ax = axes[0][0]
    for label, curve in curves.items():
        ds = sorted(curve)
        ax.plot(ds, [curve[d] for d in ds], marker="o", markersize=3, label=label)
    ax.set_xlabel("depth (loop steps)")
    ax.set_ylabel(ylabel)
    if ylabel == "accuracy":
        ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=8, loc="best")
    if dynamics:
        dax = axes[1][0]
        for name, curve in dynamics.items():
            if name == "rho" or not curve:
                continue
            ds = sorted(curve)
            dax.plot(ds, [curve[d] for d in ds], marker=".", label=name)
        dax.set_xlabel("depth (loop steps)")
        dax.set_ylabel("mean per-token L2")
        dax.grid(alpha=0.3)
        rho = dynamics.get("rho") or {}
        if rho:
            rax = dax.twinx()
            ds = sorted(rho)
            rax.plot(ds, [rho[d] for d in ds], "k--", marker="s", label="rho (spectral radius)")
            rax.set_ylabel("rho")
            lines = dax.get_legend_handles_labels()[0] + rax.get_legend_handles_labels()[0]
            dax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="best")
        else:
            dax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(path)
    if not out.suffix:  # matplotlib would add '.png' itself; return the path it really writes
        out = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_task_artifacts(ev: TaskEval, out_dir: str | os.PathLike[str], step: int | None = None) -> list[Path]:
    """`<task>.csv` (the depth table) and `<task>.png` (accuracy + dynamics vs depth) in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"{ev.task}.csv"
    csv.write_text(task_table_csv(ev))
    where = f" at step {step}" if step is not None else ""
    png = plot_depth_curves(
        {f"{ev.task} ({ev.mode}, n={ev.n})": ev.acc}, out / f"{ev.task}.png",
        title=f"{ev.task}{where}: peak {ev.summary.get(f'{ev.task}/peak_acc', math.nan):.3f}", dynamics=ev.dynamics,
    )
    return [csv, png]


def format_task_table(ev: TaskEval) -> str:
    """Human-readable depth table and summary of one task (what `starsctl eval` prints)."""
    lines = [f"{ev.task} ({ev.mode}, {ev.n} problems, {ev.seconds:.1f} s)"]
    lines.append(f"{'depth':>5} {'acc':>7} {'hidden':>9} {'step':>9} {'dist':>9} {'rho':>8}")
    for d in sorted(ev.acc):
        dyn = [ev.dynamics.get(k, {}).get(d) for k in (*DYN_KEYS, "rho")]
        cells = " ".join(f"{v:>9.4f}" if v is not None else f"{'':>9}" for v in dyn[:3])
        rho = f"{dyn[3]:>8.4f}" if dyn[3] is not None else f"{'':>8}"
        lines.append(f"{d:>5} {ev.acc[d]:>7.4f} {cells} {rho}")
    s = ev.summary
    t = ev.task
    parts = [f"peak {s[f'{t}/peak_acc']:.4f} at depth {int(s[f'{t}/best_depth'])}"]
    for d in SUMMARY_DEPTHS:
        if f"{t}/acc_at_{d}" in s:
            parts.append(f"acc@{d} {s[f'{t}/acc_at_{d}']:.4f}")
    for d in DROP_DEPTHS:
        if f"{t}/drop_at_{d}" in s:
            parts.append(f"drop@{d} {100 * s[f'{t}/drop_at_{d}']:.1f}%")
    lines.append("summary: " + ", ".join(parts))
    return "\n".join(lines)
