"""Evaluation bookkeeping on a Ray Train run's storage: what is scored (`EvalLedger`) and which
checkpoints Ray still keeps (`committed_checkpoints`).

Both read the run directory through pyarrow filesystems, so a run on local disk and one on object
storage (`s3://...`) are handled alike.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

from stars.checkpoint import TASK_FILE, TRAINER_STATE, step_dir_name, step_of

# Ray Train V2's run snapshot (`ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME`).
# Only its presence is checked here; its content is read by Ray itself (`ray.train.Result.from_path`).
RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"
SNAPSHOT_READ_ATTEMPTS = 5  # while training runs, Ray rewrites the snapshot in place; a read can catch it torn
# Loading a snapshot logs, at INFO, a notice meant for a run that resumes from it (three lines per read).
_RAY_SNAPSHOT_LOGGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"


def storage_filesystem(run_dir: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) of a local directory or storage URI."""
    if "://" not in run_dir:
        run_dir = os.path.abspath(os.path.expanduser(run_dir))
    return pafs.FileSystem.from_uri(run_dir)


def storage_problem(storage_path: str) -> str | None:
    """Why the job's storage cannot take its checkpoints, found before any trial starts: the directory cannot
    be created or written (permissions, a read-only or full disk, a missing mount) or a remote store
    does not answer (endpoint, credentials, bucket). None once a probe file was written and removed.

    Checked up front because Ray Train meets the same error only when the first checkpoint is saved,
    after the cluster has started and trained up to it, and reports it in a paragraph."""
    try:
        fs, root = storage_filesystem(storage_path)
        fs.create_dir(root, recursive=True)
        probe = f"{root}/.stars-write-probe-{os.getpid()}-{time.time_ns()}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError for I/O and network, ValueError for a URI
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return (f"resources.storage_path {storage_path!r} cannot be written: "
                f"{lines[0] if lines else type(exc).__name__}")
    return None


class EvalLedger:
    """Which (checkpoint, task) are scored, on the run's shared storage (local path or URI):

        <run dir>/eval/step_NNNNNNN/<task>.queued.json    handed to an Evaluator: actor name, when, by whom
        <run dir>/eval/step_NNNNNNN/<task>.running.json   claimed: actor, pid, host, start time, attempt
        <run dir>/eval/step_NNNNNNN/<task>.killed.json    the last attempt killed for a timeout, and why
        <run dir>/eval/step_NNNNNNN/<task>.done.json      scored: TaskEval + eval run id + attempts
        <run dir>/eval/step_NNNNNNN/<task>.failed.json    given up after `eval.max_attempts`: reason, attempts
        <run dir>/eval/step_NNNNNNN/<task>.csv, .png      the depth table and plot
        <run dir>/eval/step_NNNNNNN/eval_run.json         the checkpoint's MLflow eval run and its status

    A done marker is written last (atomically on local storage) and only after MLflow holds the
    results, so "done" never claims more than is stored; a restart scores exactly what has none. A
    queued marker is written before the unit is handed to its actor, so whoever dispatches the unit
    next sends it to the same actor (where it queues behind the first call) instead of scoring it
    again elsewhere; a unit is in flight while it has a queued marker and no done marker. A failed
    marker settles a unit as a done marker does (it is never scored again, so never twice), but
    holds no results: `done` stays None and `done_steps` leaves it out.
    """

    def __init__(self, run_dir: str) -> None:
        self.fs, self.root = storage_filesystem(run_dir)
        self.run_dir = run_dir

    def dir_of(self, step: int) -> str:
        return f"{self.root}/eval/{step_dir_name(step)}"

    def _path(self, step: int, name: str) -> str:
        return f"{self.dir_of(step)}/{name}"

    def _read(self, path: str) -> dict[str, Any] | None:
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            try:
                return json.loads(f.read().decode())
            except ValueError:
                return None  # a torn write on a store without atomic rename: treat as not done

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)

    def done(self, step: int, task: str) -> dict[str, Any] | None:
        """The done record of (checkpoint at `step`, `task`), or None when it is not scored."""
        return self._read(self._path(step, f"{task}.done.json"))

    def missing(self, step: int, tasks: Iterable[str]) -> list[str]:
        """The tasks of `tasks` still to score at `step` (neither done nor recorded as failed), in order."""
        return [t for t in tasks if self.done(step, t) is None and self.failed(step, t) is None]

    def mark_failed(self, step: int, task: str, record: Mapping[str, Any]) -> None:
        """Record that (step, task) is given up (`record["reason"]`): no dispatcher sends it again."""
        self._write(self._path(step, f"{task}.failed.json"), json.dumps(dict(record), indent=1).encode())

    def failed(self, step: int, task: str) -> dict[str, Any] | None:
        """The failure record of (checkpoint at `step`, `task`), or None when it was not given up."""
        return self._read(self._path(step, f"{task}.failed.json"))

    def failures(self, step: int, tasks: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The tasks of `tasks` recorded as failed at `step` (and not done after all): task -> record."""
        out = {}
        for task in tasks:
            record = self.failed(step, task)
            if record is not None and self.done(step, task) is None:
                out[task] = record
        return out

    def mark_running(self, step: int, task: str, info: Mapping[str, Any]) -> None:
        self._write(self._path(step, f"{task}.running.json"), json.dumps(dict(info), indent=1).encode())

    def running(self, step: int, task: str) -> dict[str, Any] | None:
        return self._read(self._path(step, f"{task}.running.json"))

    def mark_killed(self, step: int, task: str, info: Mapping[str, Any]) -> None:
        """Record that attempt `info["attempt"]` of (step, task) was killed (`info["outcome"]`: why). A
        file of its own: the claim is written only by the attempts, so a retry's claim is never lost."""
        self._write(self._path(step, f"{task}.killed.json"), json.dumps(dict(info), indent=1).encode())

    def killed(self, step: int, task: str) -> dict[str, Any] | None:
        return self._read(self._path(step, f"{task}.killed.json"))

    def mark_queued(self, step: int, task: str, info: Mapping[str, Any]) -> None:
        """Record that (step, task) is being handed to an Evaluator (`info["actor"]`: its name)."""
        self._write(self._path(step, f"{task}.queued.json"), json.dumps(dict(info), indent=1).encode())

    def queued(self, step: int, task: str) -> dict[str, Any] | None:
        return self._read(self._path(step, f"{task}.queued.json"))

    def clear_queued(self, step: int, task: str) -> None:
        """Forget where (step, task) was handed (its call failed): the next dispatcher picks an actor afresh."""
        path = self._path(step, f"{task}.queued.json")
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)

    def in_flight(self, steps: Iterable[int], tasks: Sequence[str]) -> dict[tuple[int, str], dict[str, Any]]:
        """The units of `steps` x `tasks` handed to an Evaluator and not scored yet: (step, task) ->
        their queued marker."""
        out = {}
        for step in steps:
            for task in tasks:
                record = self.queued(step, task)
                if record is not None and self.done(step, task) is None:
                    out[(step, task)] = record
        return out

    def mark_eval_run(self, step: int, info: Mapping[str, Any]) -> None:
        """Record the checkpoint's MLflow eval run (`run_id`, `trial_run_id`, `status`)."""
        self._write(self._path(step, "eval_run.json"), json.dumps(dict(info), indent=1).encode())

    def eval_run(self, step: int) -> dict[str, Any] | None:
        return self._read(self._path(step, "eval_run.json"))

    def mark_done(self, step: int, task: str, record: Mapping[str, Any]) -> None:
        self._write(self._path(step, f"{task}.done.json"), json.dumps(dict(record), indent=1).encode())

    def put_files(self, step: int, files: Iterable[Path]) -> None:
        for f in files:
            self._write(self._path(step, f.name), f.read_bytes())

    def latest_summary(self, tasks: Sequence[str]) -> dict[str, float]:
        """The summary metrics (`<task>/peak_acc`, ...) of the latest checkpoint with every task of
        `tasks` scored, or {} when none is. What a sweep's workers report to Tune for early stopping."""
        steps = set.intersection(*(set(self.done_steps(t)) for t in tasks)) if tasks else set()
        if not steps:
            return {}
        step = max(steps)
        out: dict[str, float] = {"eval/step": float(step)}
        for task in tasks:
            out.update((self.done(step, task) or {}).get("summary", {}))
        return out

    def done_steps(self, task: str) -> list[int]:
        """Steps whose `task` is scored."""
        sel = pafs.FileSelector(f"{self.root}/eval", allow_not_found=True)
        steps = []
        for info in self.fs.get_file_info(sel):
            s = step_of(info.path)
            if info.type == pafs.FileType.Directory and s is not None and self.done(s, task) is not None:
                steps.append(s)
        return sorted(steps)


def committed_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directory names Ray Train has committed for a run and still keeps, oldest first.

    Read through Ray's public `ray.train.Result.from_path`, which restores the run's checkpoint
    manager from its snapshot: `best_checkpoints` is every checkpoint the manager keeps (from_path
    applies no `num_to_keep`), those still waiting for their validation included, since Ray prunes
    none of those; the latest checkpoint is always among them. Ray rewrites the snapshot before it
    deletes anything, so a listed checkpoint is on storage. A run directory without a snapshot (not
    written by Ray Train) falls back to the `step_*` directories holding a complete checkpoint.

    Safe to call while the run trains: Ray rewrites the snapshot in place and then deletes what it
    pruned, so a read can see it half written or name a checkpoint deleted a moment later; such a
    read is tried again (`SNAPSHOT_READ_ATTEMPTS`) before the error is raised."""
    fs, root = storage_filesystem(run_dir)
    if fs.get_file_info(f"{root}/{RAY_RUN_SNAPSHOT}").type == pafs.FileType.File:
        result = _read_run_snapshot(root, fs)
        kept = [checkpoint for checkpoint, _ in result.best_checkpoints or []]
        if result.checkpoint is not None:
            kept.append(result.checkpoint)
        names = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in kept}
    else:
        names = set()
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            # Both files: a write cut short (a full disk) can leave the task file without the trainer
            # state, which `stars.checkpoint.save_checkpoint` writes last.
            files = [fs.get_file_info(f"{info.path}/{f}").type for f in (TASK_FILE, TRAINER_STATE)]
            if step_of(name) is not None and all(t == pafs.FileType.File for t in files):
                names.add(name)
    return sorted(names, key=lambda n: step_of(n) or -1)


def _read_run_snapshot(root: str, fs: pafs.FileSystem) -> ray.train.Result:
    logger = logging.getLogger(_RAY_SNAPSHOT_LOGGER)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))  # a dispatcher reads it every few seconds
    try:
        for attempt in range(1, SNAPSHOT_READ_ATTEMPTS):
            try:
                return ray.train.Result.from_path(root, storage_filesystem=fs)
            except Exception:  # noqa: BLE001 - torn snapshot, pruned checkpoint: Ray raises several kinds
                time.sleep(0.2 * attempt)
        return ray.train.Result.from_path(root, storage_filesystem=fs)  # the last attempt raises
    finally:
        logger.setLevel(level)
