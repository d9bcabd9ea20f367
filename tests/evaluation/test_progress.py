"""`stars.evaluation.progress.Progress`: what a terminal and a log see of a long generation."""

from __future__ import annotations

import io

from stars.evaluation.progress import BAR_WIDTH, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_logs_get_the_first_line_then_one_per_interval_and_always_the_last():
    clock, lines = Clock(), []
    progress = Progress("[stars] gsm8k step 5: generated", console=lines.append, every_s=30.0, clock=clock)
    for done in range(8, 81, 8):  # a batch of 8 every 10 s
        clock.now += 10.0
        progress.update(done, 80)
    # first batch (t=10), then t=40, t=70 (30 s apart), and the last batch (t=100)
    assert [line.split("generated ")[1].split(" ")[0] for line in lines] == ["8/80", "32/80", "56/80", "80/80"]
    assert lines[1].endswith("(0.80 prompts/s, ETA 60 s)")  # 32 prompts in 40 s; 48 left
    assert lines[-1].endswith("(0.80 prompts/s, ETA 0 s)")


def test_a_terminal_gets_one_bar_redrawn_in_place_and_ended_once():
    clock, stream = Clock(), io.StringIO()
    progress = Progress("gsm8k", stream=stream, clock=clock)
    for done in (0, 25, 50, 100):
        clock.now += 5.0
        progress.update(done, 100)
    frames = stream.getvalue().split("\r")[1:]
    assert len(frames) == 4 and stream.getvalue().count("\n") == 1 and stream.getvalue().endswith("\n")
    assert frames[0].startswith(f"gsm8k [{'-' * BAR_WIDTH}] 0/100 prompts (0.00 prompts/s, ETA unknown)")
    assert frames[2].startswith(f"gsm8k [{'#' * (BAR_WIDTH // 2)}{'-' * (BAR_WIDTH // 2)}] 50/100")
    assert "ETA 15 s" in frames[2]  # 50 prompts in 15 s; 50 left
    assert frames[3].startswith(f"gsm8k [{'#' * BAR_WIDTH}] 100/100")
