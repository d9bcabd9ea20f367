"""The depth-curve summary of one task: the one definition behind MLflow, `starsctl eval` and `compare`.

Names follow docs/interfaces.md (MLflow rejects `@` in metric names, hence `acc_at_8`, not `acc@8`).
"""

from __future__ import annotations

from collections.abc import Mapping

SUMMARY_DEPTHS = (4, 8, 16)  # `<task>/acc_at_<d>`
DROP_DEPTHS = (8, 16)  # `<task>/drop_at_<d>`: the paper's headline number, the relative drop from the peak


def summary_metrics(task: str, acc_by_depth: Mapping[int, float]) -> dict[str, float]:
    """Depth-curve summary of one task: `<task>/peak_acc`, `<task>/best_depth` (smallest depth
    reaching the peak), `<task>/acc_at_{4,8,16}` and `<task>/drop_at_{8,16}` = relative drop from
    the peak, (peak - acc) / peak (0 when the peak is 0). Depths not scored are left out."""
    if not acc_by_depth:
        return {}
    accs = {int(d): float(a) for d, a in acc_by_depth.items()}
    peak = max(accs.values())
    best = min(d for d, a in accs.items() if a == peak)
    out = {f"{task}/peak_acc": peak, f"{task}/best_depth": float(best)}
    for d in SUMMARY_DEPTHS:
        if d in accs:
            out[f"{task}/acc_at_{d}"] = accs[d]
    for d in DROP_DEPTHS:
        if d in accs:
            out[f"{task}/drop_at_{d}"] = (peak - accs[d]) / peak if peak > 0 else 0.0
    return out
