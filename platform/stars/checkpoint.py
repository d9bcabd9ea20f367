"""The checkpoint layout, one definition shared by training (writes) and evaluation (reads).

A training checkpoint is a directory `step_NNNNNNN/` (the optimizer step, 7 digits) holding

    model/               the model (`stars.model.save_model`: a LoopLM's `save_pretrained`, or Ouro's own
                         layout for a model fine-tuned from Ouro), plus the text tokenizer for math tasks
    stars_task.json      what the model was trained on, so the checkpoint can be scored on its own
    trainer_state.pt     optimizer + LR-scheduler state dicts, step, (step, depth) history, resumes

Evaluation also accepts a bare model directory (a `config.json` directly inside), LoopLM or Ouro.

`trainer_state.pt` is read with `torch.load(weights_only=True)`: tensors and plain containers
(dict, list, tuple, str, int, float, bool, None) only, so loading a checkpoint from shared storage
never runs code that a pickle carries. Everything the trainer saves is of that kind.

torch, transformers and `stars.model` are imported inside the functions: the layout names
(`MODEL_DIR`, `step_of`, ...) are also used by light modules (the evaluation package's import, the
Ray ledger) that must not pull torch in at import time.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stars.errors import UserError

if TYPE_CHECKING:
    from stars.model import LoopLM

MODEL_DIR = "model"
TASK_FILE = "stars_task.json"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError):
    """A path that is not a usable checkpoint (not a directory, no model, no tokenizer, unsafe state)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (the disk is full, the storage unreachable). Nothing of
    it was committed, so it is never resumed from nor scored; the checkpoints before it stay. Its
    message is one line naming the checkpoint, where it was written and why: what a failed trial
    reports (`stars.ray_backend.sweep.failure_reason`)."""


#: errno values that mean "no room", worded for the user.
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def checkpoint_write_error(exc: OSError, checkpoint: str, where: str) -> CheckpointWriteError:
    """The error to raise when writing the checkpoint named `checkpoint` into `where` failed with `exc`."""
    cause = _NO_ROOM.get(exc.errno) or next(iter(str(exc).strip().splitlines()), type(exc).__name__)[:300]
    return CheckpointWriteError(
        f"checkpoint {checkpoint} could not be written to {where}: {cause}; the checkpoints committed "
        "before it are kept, and submitting the job again resumes from the last one"
    )


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint at optimizer step `step`: `step_0000120`."""
    return f"step_{int(step):07d}"


def step_of(path: str | os.PathLike[str]) -> int | None:
    """Training step of a checkpoint directory named `step_NNNNNNN`, else None."""
    m = _STEP_DIR.match(Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def model_dir_of(path: str | os.PathLike[str]) -> Path:
    """The model directory of a checkpoint: `<path>/model` for a training checkpoint, else `path`."""
    p = Path(path)
    return p / MODEL_DIR if (p / MODEL_DIR).is_dir() else p


# ------------------------------------------------------------------------------------------ training
def save_checkpoint(
    path: str | os.PathLike[str],
    model: LoopLM,
    optimizer: Any,
    scheduler: Any,
    state: Mapping[str, Any],
    task_description: Mapping[str, Any],
    tokenizer: Any = None,
) -> Path:
    """Write a training checkpoint at `path`: the model (and `tokenizer`, when the task has a text
    one), `task_description` as `stars_task.json`, and the optimizer/scheduler state dicts with
    `state` (step, history, ...: plain values, see the module docstring) as `trainer_state.pt`."""
    import torch
    from transformers.utils import logging as hf_logging

    from stars.model import save_model

    hf_logging.disable_progress_bar()  # one bar per checkpoint drowns the progress lines
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        save_model(model, path / MODEL_DIR)  # an Ouro-derived model in Ouro's own layout
        if tokenizer is not None:
            tokenizer.save_pretrained(path / MODEL_DIR)
        (path / TASK_FILE).write_text(json.dumps(dict(task_description), indent=2))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
                   path / TRAINER_STATE)
    except OSError as exc:  # a full or failing local disk (torch.save reports its own as RuntimeError)
        raise checkpoint_write_error(exc, path.name, str(path.parent)) from exc
    return path


def load_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `trainer_state.pt` of the checkpoint at `path`, on the CPU. Refuses (CheckpointError) a
    file holding anything but tensors and plain containers rather than unpickling arbitrary objects."""
    import torch

    file = Path(path) / TRAINER_STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{str(file)!r} holds objects other than tensors and plain containers; not loading it "
            f"(torch.load weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded once and scored for several tasks."""

    path: str
    model: LoopLM
    task: dict[str, Any]  # stars_task.json ({} for a bare model directory)
    step: int | None
    _tokenizer: Any = None

    @property
    def model_dir(self) -> Path:
        return model_dir_of(self.path)

    def tokenizer(self) -> Any:
        """The text tokenizer saved beside the model (math checkpoints)."""
        if self._tokenizer is None:
            from stars.tasks.math_sft import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.model_dir)
            except (OSError, ValueError) as exc:
                raise CheckpointError(
                    f"checkpoint {self.path!r} has no text tokenizer in {str(self.model_dir)!r}; math "
                    f"benchmarks need one (saved with math_sft checkpoints) ({exc})"
                ) from None
        return self._tokenizer


def load_checkpoint(path: str | os.PathLike[str], device: str | None = None) -> LoadedCheckpoint:
    """Load a platform checkpoint (`model/` + `stars_task.json`) or a bare model directory.

    The model is put in eval mode on `device` (default: CUDA when visible, else CPU), in bfloat16 on
    CUDA and in the dtype it was saved in on the CPU."""
    import torch
    from transformers.utils import logging as hf_logging

    from stars.model import load_pretrained

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per checkpoint drowns the tables
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    model_dir = model_dir_of(p)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: expected {MODEL_DIR}/config.json (a training checkpoint "
            f"step_NNNNNNN/) or config.json (a model directory); found {sorted(x.name for x in p.iterdir())}"
        )
    task: dict[str, Any] = {}
    if (p / TASK_FILE).is_file():
        task = json.loads((p / TASK_FILE).read_text())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 on GPU halves the weights and the KV cache of 16-depth generation; on CPU, as saved.
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    model = load_pretrained(model_dir, dtype=dtype).to(dev).eval()
    return LoadedCheckpoint(str(p), model, task, step_of(p))
