"""The depth-curve summary: the one definition behind MLflow, `starsctl eval` and `starsctl compare`."""

from __future__ import annotations

import pytest

from stars.evaluation import summary_metrics


def test_summary_metrics():
    acc = {1: 0.4, 2: 0.9, 4: 1.0, 8: 0.8, 12: 1.0, 16: 0.25}
    s = summary_metrics("addition", acc)
    assert s == {
        "addition/peak_acc": 1.0,
        "addition/best_depth": 4.0,
        "addition/acc_at_4": 1.0,
        "addition/acc_at_8": 0.8,
        "addition/acc_at_16": 0.25,
        "addition/drop_at_8": pytest.approx(0.2),
        "addition/drop_at_16": pytest.approx(0.75),
    }
    assert summary_metrics("gsm8k", {1: 0.0, 8: 0.0})["gsm8k/drop_at_8"] == 0.0
    assert "gsm8k/acc_at_16" not in summary_metrics("gsm8k", {4: 0.5})
    assert summary_metrics("x", {}) == {}


def test_summary_is_the_papers_headline_number():
    acc = {d: v for d, v in zip(range(1, 17), [0.1, 0.5, 0.7, 0.8] + [0.6] * 4 + [0.4] * 8)}
    s = summary_metrics("gsm8k", acc)
    assert s["gsm8k/peak_acc"] == 0.8 and s["gsm8k/best_depth"] == 4.0
    assert s["gsm8k/acc_at_8"] == 0.6 and s["gsm8k/drop_at_8"] == pytest.approx(0.25)
    assert s["gsm8k/drop_at_16"] == pytest.approx(0.5)
