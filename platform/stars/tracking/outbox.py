"""Training metrics off the hot path: a journal on disk, sent to MLflow in order by a background thread.

Rank 0 of a training run logs a handful of metrics every `train.log_every` steps. Sending them
synchronously would stall training while MLflow is slow and kill it when MLflow is down (the client
raises once its own retries run out). Instead `MetricOutbox.log` appends one JSON line to a journal
file and returns; a daemon thread sends the journal, oldest line first, with `log_batch`, retrying with
backoff while the server is unreachable, and records how far it got in a small offset file.

Files, in the outbox's directory (`<run directory>/tracking/` when storage is local, so the journal sits
next to the checkpoints; see `stars.ray_backend.training.journal_dir`):

    <run_id>.jsonl   one line per logged step: {"step": N, "ts": ms, "metrics": {...}}
    <run_id>.sent    byte offset of the journal up to which MLflow has acknowledged every line
    <run_id>.json    where to send it: {"run_id": ..., "tracking_uri": ...}

Sending twice is harmless: every line keeps the timestamp it was logged with, and MLflow's SQL store
ignores a metric row (key, value, timestamp, step) it already holds, so a line sent just before a crash
and again after it is stored once. That is what lets a restarted worker, a resumed job or
`starsctl sync` (`send_journal`) simply resend from the offset.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric

from stars.tracking.client import Tracker, error_line

__all__ = [
    "JournalStatus",
    "MetricOutbox",
    "SyncError",
    "SyncOutcome",
    "find_journals",
    "journal_status",
    "send_journal",
    "sync_journals",
]

#: MLflow's `log_batch` takes at most 1000 metrics per call.
MAX_METRICS_PER_BATCH = 1000
#: Backoff between failed sends: doubles from the first value up to the second.
RETRY_BACKOFF_S = (1.0, 30.0)


@dataclass(frozen=True)
class JournalStatus:
    journal: Path
    run_id: str
    tracking_uri: str | None
    unsent_lines: int
    last_step: int


def _paths(journal: Path) -> tuple[Path, Path]:
    return journal.with_suffix(".sent"), journal.with_suffix(".json")


def _read_offset(journal: Path) -> int:
    try:
        return int(_paths(journal)[0].read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _write_offset(journal: Path, offset: int) -> None:
    sent = _paths(journal)[0]
    tmp = sent.with_suffix(".sent.tmp")
    tmp.write_text(str(offset))
    os.replace(tmp, sent)  # atomic: a crash leaves the old offset or the new one, never half of one


def _lines_from(journal: Path, offset: int) -> Iterator[tuple[int, dict]]:
    """(offset after the line, record) for every complete line from `offset` on. A line cut short by a
    crash (no newline yet) is left for later."""
    try:
        with journal.open("rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n"):
                    return
                offset += len(raw)
                yield offset, json.loads(raw)
    except FileNotFoundError:
        return


def _batches(journal: Path, offset: int) -> Iterator[tuple[int, int, list[Metric]]]:
    """The unsent journal as `log_batch` payloads of whole lines: (offset reached, lines, metrics)."""
    batch: list[Metric] = []
    lines, end = 0, offset
    for after, record in _lines_from(journal, offset):
        points = [Metric(k, float(v), int(record["ts"]), int(record["step"])) for k, v in record["metrics"].items()]
        if batch and len(batch) + len(points) > MAX_METRICS_PER_BATCH:
            yield end, lines, batch
            batch, lines = [], 0
        batch.extend(points)
        lines, end = lines + 1, after
    if lines:
        yield end, lines, batch


def send_journal(journal: Path, tracker: Tracker, run_id: str) -> int:
    """Send what MLflow has not acknowledged yet, in order; returns the lines sent. Raises what the
    MLflow client raises when the server is unreachable (the offset keeps what got through)."""
    sent = 0
    for end, lines, batch in _batches(journal, _read_offset(journal)):
        if batch:  # a step whose metrics were all None has nothing to send
            tracker.client.log_batch(run_id, metrics=batch)
        _write_offset(journal, end)
        sent += lines
    return sent


def journal_status(journal: Path) -> JournalStatus:
    """What a journal holds and how much of it is unsent."""
    meta = json.loads(_paths(journal)[1].read_text())
    unsent = sum(1 for _ in _lines_from(journal, _read_offset(journal)))
    last = max((int(r["step"]) for _, r in _lines_from(journal, 0)), default=0)
    return JournalStatus(journal, meta["run_id"], meta.get("tracking_uri"), unsent, last)


def find_journals(root: Path) -> list[Path]:
    """Every outbox journal under `root` (a run directory, a job's storage, or a journal itself)."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.jsonl") if _paths(p)[1].exists() and p.parent.name == "tracking")


class MetricOutbox:
    """One MLflow run's training metrics: `log` appends to the journal and returns at once; a background
    thread sends them in order; `close` waits (bounded) for the rest and says what was left on disk.

    Creating an outbox over an existing journal (a restarted worker, a resumed job) sends what the
    earlier attempt could not, before anything new.
    """

    def __init__(self, tracker: Tracker, run_id: str, directory: str | Path, *,
                 console: Callable[[str], None] = print) -> None:
        self.tracker, self.run_id, self.console = tracker, run_id, console
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.journal = self.dir / f"{run_id}.jsonl"
        meta = _paths(self.journal)[1]
        if not meta.exists():
            meta.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracker.uri}))
        self._file = self.journal.open("ab")
        self._wake = threading.Event()
        self._drained = threading.Event()
        self._stop = False
        self._outage_since: float | None = None
        self._last_error = ""
        self._thread = threading.Thread(target=self._send_loop, name=f"stars-outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    # the training side --------------------------------------------------------------------
    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append one step's metrics (None values dropped) and return; never touches the network."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        record = {"step": int(step), "ts": int(time.time() * 1000), "metrics": values}
        self._file.write((json.dumps(record, separators=(",", ":")) + "\n").encode())
        self._file.flush()  # in the page cache: survives the process being killed
        self._drained.clear()
        self._wake.set()

    def last_step(self) -> int:
        """The highest step in the journal (sent or not): what a restarted worker must not log again."""
        return max((int(r["step"]) for _, r in _lines_from(self.journal, 0)), default=0)

    def close(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for MLflow to acknowledge everything; True when it did. Otherwise print
        where the unsent metrics are and how they get sent later, and return False."""
        self._wake.set()
        done = self._drained.wait(timeout_s)
        self._stop = True  # from here on the journal belongs to `starsctl sync` or the next attempt
        self._wake.set()
        self._file.close()
        if done:
            return True
        unsent = sum(1 for _ in _lines_from(self.journal, _read_offset(self.journal)))
        self.console(
            f"[stars] WARNING: MLflow at {self.tracker.uri} did not take the last {unsent} logged step(s) "
            f"within {timeout_s:.0f} s ({self._last_error}). They are kept in {self.journal}; resuming the "
            f"job sends them, or run: starsctl sync {self.dir}"
        )
        return False

    # the sending side ---------------------------------------------------------------------
    def _send_loop(self) -> None:
        backoff = RETRY_BACKOFF_S[0]
        while not self._stop:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._stop:
                return
            try:
                send_journal(self.journal, self.tracker, self.run_id)
            except Exception as exc:  # noqa: BLE001 - any failure to reach MLflow: keep the journal, retry
                self._on_failure(exc)
                self._wake.wait(backoff)  # close() cuts the wait short
                backoff = min(backoff * 2, RETRY_BACKOFF_S[1])
                self._wake.set()
                continue
            backoff = RETRY_BACKOFF_S[0]
            if self._outage_since is not None:
                self.console(f"[stars] MLflow reachable again after {time.monotonic() - self._outage_since:.0f} s; "
                             "buffered metrics sent")
                self._outage_since = None
            if _read_offset(self.journal) >= self.journal.stat().st_size:
                self._drained.set()

    def _on_failure(self, exc: Exception) -> None:
        self._last_error = error_line(exc)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self.console(f"[stars] MLflow at {self.tracker.uri} unreachable ({self._last_error}); training goes "
                         f"on, metrics are buffered in {self.journal} and sent when it is back")


class SyncError(ValueError):
    """`starsctl sync` was pointed at something that holds no journal."""


@dataclass(frozen=True)
class SyncOutcome:
    journal: Path
    run_id: str
    tracking_uri: str
    sent_lines: int
    error: str | None = None

    @property
    def line(self) -> str:
        where = f"run {self.run_id} at {self.tracking_uri}"
        if self.error:
            return f"{self.journal}: NOT sent to {where}: {self.error}"
        return f"{self.journal}: {self.sent_lines} step(s) sent to {where}" if self.sent_lines else \
            f"{self.journal}: nothing left to send ({where})"


def sync_journals(root: str | Path, uri: str | None = None) -> list[SyncOutcome]:
    """Send every unsent journal line under `root` to its run (at `uri`, else the URI the journal was
    written for). One outcome per journal; an unreachable server is an outcome, not an exception."""
    path = Path(root).expanduser()
    if not path.exists():
        raise SyncError(f"{path}: no such file or directory")
    journals = find_journals(path)
    if not journals:
        raise SyncError(f"{path}: no metric journal (tracking/<run id>.jsonl) under it")
    outcomes = []
    for journal in journals:
        status = journal_status(journal)
        target = uri or status.tracking_uri
        try:
            sent = send_journal(journal, Tracker(target), status.run_id)
            outcomes.append(SyncOutcome(journal, status.run_id, str(target), sent))
        except Exception as exc:  # noqa: BLE001 - reported per journal; the rest still go
            outcomes.append(SyncOutcome(journal, status.run_id, str(target), 0, error_line(exc)))
    return outcomes
