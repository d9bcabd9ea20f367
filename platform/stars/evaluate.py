"""Depth curves of one checkpoint: every task scored at every depth, plus the loop's dynamics.

Framework-free (no Ray, MLflow only inside the functions that write tracking summaries), so the same
code runs inside the `Evaluator` actors, in `starsctl eval`, in tests and in benchmarks.

Cost model, which is the reason for the two scoring paths:
- teacher-forced tasks (addition) read every depth out of ONE `LoopLM.forward_depths` pass per batch:
  a 1..16 curve costs about one depth-16 pass instead of 1+2+...+16 = 136 loop steps;
- generative tasks (math benchmarks) prefill each prompt batch ONCE to the deepest depth and decode
  every depth from its own prefix of that prefill (`LoopLM.generate_greedy_depths`): the prefill of
  depth k is exactly the first k steps of the deepest one, so the tokens equal per-depth decoding.

Dynamics per depth come from the same readout (mean per-token L2 of `h_t`, `h_t - h_{t-1}`,
`h_t - h_0`); the spectral radius of the block's Jacobian is estimated by power iteration at a few
depths on a small unpadded batch (it costs `rho_iters` Jacobian-vector products per depth).

Bookkeeping (`EvalLedger`): `<run dir>/eval/step_NNNNNNN/<task>.done.json` says a (checkpoint, task)
is scored; a restarted job reads it and scores only what is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from stars.model import LoopLM

MODEL_DIR = "model"  # = stars.train.MODEL_DIR (not imported: stars.train pulls the whole trainer)
TASK_FILE = "stars_task.json"  # = stars.train.TASK_FILE
ADDITION = "addition"
DYN_KEYS = ("hidden_norm", "step_size", "dist_from_start")
DEFAULT_MATH_MAX_NEW_TOKENS = 2048
RHO_SAMPLES = 16  # sequences in the spectral-radius batch
_STEP_DIR = re.compile(r"^step_(\d+)$")


class EvalInputError(ValueError):
    """A problem with what the user asked to evaluate (missing checkpoint, unknown task, ...).
    The CLI turns it into exit code 2 with the message and no traceback."""


def known_tasks() -> tuple[str, ...]:
    from stars.spec import EVAL_TASKS

    return EVAL_TASKS


def is_math_task(task: str) -> bool:
    from stars.spec import MATH_BENCHMARKS

    return task in MATH_BENCHMARKS


# ------------------------------------------------------------------------------------------ results
@dataclass
class TaskEval:
    """One task of one checkpoint: accuracy and dynamics per depth, and its summary."""

    task: str
    mode: str  # "teacher_forced" | "generate"
    n: int  # problems scored
    acc: dict[int, float]
    dynamics: dict[str, dict[int, float]]  # hidden_norm / step_size / dist_from_start / rho -> depth -> value
    summary: dict[str, float]  # tracking.summary_metrics(task, acc)
    seconds: float
    max_new_tokens: int | None = None

    def curves(self, with_dynamics: bool = True) -> dict[str, dict[int, float]]:
        """MLflow metric name -> {depth: value}: `<task>/acc` and (optionally) `dyn/<name>`."""
        out = {f"{self.task}/acc": dict(self.acc)}
        if with_dynamics:
            out.update({f"dyn/{k}": dict(v) for k, v in self.dynamics.items() if v})
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["acc"] = {str(k): v for k, v in self.acc.items()}
        data["dynamics"] = {k: {str(d): x for d, x in v.items()} for k, v in self.dynamics.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskEval:
        return cls(
            task=data["task"],
            mode=data["mode"],
            n=int(data["n"]),
            acc={int(k): float(v) for k, v in data["acc"].items()},
            dynamics={k: {int(d): float(x) for d, x in v.items()} for k, v in data["dynamics"].items()},
            summary={k: float(v) for k, v in data["summary"].items()},
            seconds=float(data["seconds"]),
            max_new_tokens=data.get("max_new_tokens"),
        )


@dataclass
class CheckpointEval:
    """Every task of one checkpoint."""

    checkpoint: str
    step: int | None
    depths: list[int]
    tasks: dict[str, TaskEval] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.tasks.values():
            out.update(t.summary)
        return out


def summarize(task: str, acc: Mapping[int, float]) -> dict[str, float]:
    """Peak accuracy, best depth, accuracy at 4/8/16 and the relative drop from the peak at 8/16
    (the paper's headline number): exactly `stars.tracking.summary_metrics`, so the summaries in
    MLflow, in `starsctl eval` and in `starsctl compare` are one definition."""
    from stars.tracking import summary_metrics

    return summary_metrics(task, acc)


# ------------------------------------------------------------------------------------ checkpoints
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
        p = Path(self.path)
        return p / MODEL_DIR if (p / MODEL_DIR).is_dir() else p

    def tokenizer(self) -> Any:
        """The text tokenizer saved beside the model (math checkpoints)."""
        if self._tokenizer is None:
            from stars.tasks.math_sft import load_tokenizer

            try:
                self._tokenizer = load_tokenizer(self.model_dir)
            except (OSError, ValueError) as exc:
                raise EvalInputError(
                    f"checkpoint {self.path!r} has no text tokenizer in {str(self.model_dir)!r}; math "
                    f"benchmarks need one (saved with math_sft checkpoints) ({exc})"
                ) from None
        return self._tokenizer


def step_of(path: str | os.PathLike[str]) -> int | None:
    """Training step of a checkpoint directory named `step_NNNNNNN`, else None."""
    m = _STEP_DIR.match(Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def load_checkpoint(path: str | os.PathLike[str], device: str | None = None) -> LoadedCheckpoint:
    """Load a platform checkpoint (`model/` + `stars_task.json`) or a bare model directory.

    The model is put in eval mode on `device` (default: CUDA when visible, else CPU) in the dtype it
    was saved in."""
    import torch
    from transformers.utils import logging as hf_logging

    from stars.model import LoopLM

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per checkpoint drowns the tables
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EvalInputError(f"checkpoint {str(path)!r} is not a directory")
    model_dir = p / MODEL_DIR if (p / MODEL_DIR).is_dir() else p
    if not (model_dir / "config.json").is_file():
        raise EvalInputError(
            f"{str(path)!r} is not a checkpoint: expected {MODEL_DIR}/config.json (a training checkpoint "
            f"step_NNNNNNN/) or config.json (a model directory); found {sorted(x.name for x in p.iterdir())}"
        )
    task: dict[str, Any] = {}
    if (p / TASK_FILE).is_file():
        task = json.loads((p / TASK_FILE).read_text())
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = LoopLM.from_pretrained(str(model_dir)).to(dev).eval()
    return LoadedCheckpoint(str(p), model, task, step_of(p))


def default_tasks(loaded: LoadedCheckpoint) -> list[str]:
    """The checkpoint's own training task when it is addition (math SFT has no single benchmark)."""
    return [ADDITION] if loaded.task.get("task") == ADDITION else []


# ---------------------------------------------------------------------------------------- addition
def addition_problems(task: Mapping[str, Any], limit: int | None = None) -> tuple[list, Any]:
    """(test problems, tokenizer) of the addition task described in `stars_task.json`: exactly the
    test set training held out (same digits/seed/num_test or test file), first `limit` of them."""
    from stars.tasks.addition import AdditionTokenizer, generate_problems, read_jsonl

    if task.get("task") != ADDITION:
        raise EvalInputError(
            f"task 'addition' needs an addition checkpoint (its stars_task.json says task="
            f"{task.get('task')!r}); addition uses its own 15-token vocabulary"
        )
    digits = int(task.get("digits", 4))
    tokenizer = AdditionTokenizer(digits)
    if task.get("test_file"):
        if not Path(task["test_file"]).is_file():
            raise EvalInputError(f"the checkpoint's addition test file {task['test_file']!r} does not exist here")
        problems = read_jsonl(task["test_file"], limit=limit)
    else:
        n = int(task.get("num_test", 1000))
        problems = generate_problems(n, digits, seed=int(task.get("seed", 0)))
        problems = problems[:limit] if limit else problems
    return problems, tokenizer


class _Dyn:
    """Token-weighted running means of the per-depth dynamics over batches."""

    def __init__(self, depths: Sequence[int]) -> None:
        self.depths = list(depths)
        self.sums = {k: [0.0] * len(depths) for k in DYN_KEYS}
        self.weight = 0.0

    def add(self, readout: Any, tokens: float) -> None:
        for k in DYN_KEYS:
            vals = getattr(readout, k).tolist()
            for i, v in enumerate(vals):
                self.sums[k][i] += float(v) * tokens
        self.weight += tokens

    def result(self) -> dict[str, dict[int, float]]:
        w = max(self.weight, 1e-12)
        return {k: {d: s / w for d, s in zip(self.depths, v)} for k, v in self.sums.items()}


def addition_teacher_forced(
    model: LoopLM, problems: Sequence[Any], tokenizer: Any, depths: Iterable[int], batch_size: int = 256
) -> tuple[dict[int, torch.Tensor], dict[str, dict[int, float]]]:
    """Per depth a bool tensor [len(problems)] (every supervised argmax right, EOS included), and the
    dynamics per depth: all from one `forward_depths` pass per batch.

    `stars.tasks.addition.teacher_forced_correct` (which greedy decoding reproduces problem by
    problem), with the readout's dynamics collected from the same pass."""
    from stars.tasks.addition import teacher_forced_correct

    depths = sorted({int(d) for d in depths})
    dyn = _Dyn(depths)
    correct = teacher_forced_correct(
        model, problems, tokenizer, depths, batch_size,
        on_readout=lambda readout, mask: dyn.add(readout, float(mask.sum())),
    )
    return correct, dyn.result()


def addition_rho_batch(problems: Sequence[Any], tokenizer: Any, device: Any) -> torch.Tensor:
    """Up to RHO_SAMPLES whole sequences of one length (the commonest), so no padding enters J."""
    import torch

    seqs = [tokenizer.encode_example(p.num1, p.num2, p.answer) for p in problems[: 8 * RHO_SAMPLES]]
    return torch.tensor(_commonest_length(seqs)[:RHO_SAMPLES], dtype=torch.long, device=device)


def _commonest_length(seqs: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    by_len: dict[int, list[Sequence[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    return max(by_len.values(), key=len)


# ------------------------------------------------------------------------------------ generation
def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned (LoopLM generation wants left padding)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def generate_depths(
    model: LoopLM,
    prompts: Sequence[Sequence[int]],
    depths: Iterable[int],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    shared_prefill: bool = True,
    dynamics: bool = False,
) -> tuple[dict[int, list[list[int]]], dict[str, dict[int, float]] | None]:
    """Greedy continuations of every prompt at every depth: {depth: [tokens of prompt i]} in prompt
    order, each cut after its EOS; and (with `dynamics`) the prompts' per-depth dynamics.

    Prompts are sorted by length and batched (left-padded) so a batch wastes little; the longest
    batch runs first, so a memory problem shows at once. With `shared_prefill` each batch is
    prefilled once for all depths (`generate_greedy_depths`), else once per depth
    (`generate_greedy`); both give the same tokens. With learned positions the budget is cut to what
    the position table holds (the cut is the returned tokens' length).
    """
    import torch

    depths = sorted({int(d) for d in depths})
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: dict[int, list[list[int]]] = {d: [[] for _ in prompts] for d in depths}
    dyn = _Dyn(depths) if dynamics else None
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad, device)
            budget = max_new_tokens
            if cfg.positions == "learned":
                budget = min(budget, cfg.max_position_embeddings - ids.shape[1])
                if budget < 1:
                    raise EvalInputError(
                        f"a prompt of {ids.shape[1]} tokens leaves no room to generate within "
                        f"max_position_embeddings={cfg.max_position_embeddings} (learned positions)"
                    )
            if shared_prefill:
                new = model.generate_greedy_depths(ids, depths, budget, attention_mask=mask, eos_token_id=eos)
            else:
                new = {
                    d: model.generate_greedy(ids, d, budget, attention_mask=mask, eos_token_id=eos) for d in depths
                }
            for d in depths:
                for row, i in zip(new[d].tolist(), idx):
                    out[d][i] = _until_eos(row, eos)
            if dyn is not None:
                dyn.add(model.forward_depths(ids, depths=depths, attention_mask=mask), float(mask.sum()))
    return out, (dyn.result() if dyn is not None else None)


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def score_benchmark(
    model: LoopLM,
    tokenizer: Any,
    items: Sequence[Any],
    depths: Iterable[int],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    shared_prefill: bool = True,
) -> tuple[dict[int, list[bool]], dict[str, dict[int, float]], list[list[int]]]:
    """Generate at every depth from the chat prompts of `items` and judge each answer with
    `stars.tasks.answers.is_correct` (the paper's protocol: 0-shot, greedy). Returns (correct per
    depth, dynamics per depth over the prompts, prompt token ids)."""
    from stars.tasks.answers import is_correct
    from stars.tasks.benchmarks import encode_prompts
    from stars.tasks.math_sft import SYSTEM_PROMPT

    prompts = encode_prompts(tokenizer, list(items), system_prompt or SYSTEM_PROMPT)
    eos = model.config.eos_token_id
    if eos is None:
        vocab = tokenizer.get_vocab()
        eos = vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    tokens, dyn = generate_depths(
        model, prompts, depths, max_new_tokens, batch_size=batch_size, eos_token_id=eos, pad_token_id=pad,
        shared_prefill=shared_prefill, dynamics=True,
    )
    judged: dict[tuple[str, str], bool] = {}  # many depths write the same text: judge it once
    correct: dict[int, list[bool]] = {}
    for d, rows in tokens.items():
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        marks = []
        for text, item in zip(texts, items):
            key = (text, item.gold)
            if key not in judged:
                judged[key] = is_correct(text, item.gold)
            marks.append(judged[key])
        correct[d] = marks
    assert dyn is not None
    return correct, dyn, prompts


# ---------------------------------------------------------------------------------- spectral radius
def rho_by_depth(
    model: LoopLM,
    input_ids: torch.Tensor,
    rho_depths: Iterable[int],
    iters: int = 20,
    seed: int = 0,
) -> dict[int, float]:
    """Spectral radius of J = dPhi/dh at h_k for each k in `rho_depths`, by power iteration
    (`stars.objective.spectral_radius`) on an unpadded batch; all states from one loop pass."""
    import torch

    from stars.model import LoopRun
    from stars.objective import spectral_radius

    rho_depths = sorted({int(d) for d in rho_depths})
    if not rho_depths or input_ids.numel() == 0:
        return {}
    ro = model.forward_depths(input_ids, depths=rho_depths, return_states=True)
    base = model.run_loop(input_ids, depth=1)  # e and the attention context, shared by every depth
    out = {}
    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    for i, k in enumerate(ro.depths):
        h = ro.states[i]
        run = LoopRun(h=h, e=base.e.detach(), ctx=base.ctx, depth=k)
        out[int(k)] = float(spectral_radius(model.block_fn(run), h, iters=iters, generator=gen))
    return out


# -------------------------------------------------------------------------------------------- tasks
def evaluate_task(
    loaded: LoadedCheckpoint,
    task: str,
    depths: Iterable[int] = range(1, 17),
    *,
    rho_depths: Iterable[int] = (1, 4, 8, 16),
    rho_iters: int = 20,
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    benchmark_path: str | None = None,
) -> TaskEval:
    """Score one task of a loaded checkpoint at every depth, with dynamics (and rho at `rho_depths`)."""
    import torch

    depths = sorted({int(d) for d in depths})
    if not depths:
        raise EvalInputError("depths is empty; give e.g. 1-16")
    if task not in known_tasks():
        raise EvalInputError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())}")
    model = loaded.model
    device = next(model.parameters()).device
    start = time.perf_counter()
    if task == ADDITION:
        problems, tok = addition_problems(loaded.task, limit)
        correct, dyn = addition_teacher_forced(model, problems, tok, depths, batch_size)
        acc = {d: float(c.float().mean()) for d, c in correct.items()}
        n, mode, budget = len(problems), "teacher_forced", None
        rho_ids = addition_rho_batch(problems, tok, device)
    else:
        from stars.tasks.benchmarks import load_benchmark
        from stars.tasks.loading import DatasetLoadError

        if loaded.task.get("task") == ADDITION:
            raise EvalInputError(
                f"{task!r} is a math benchmark; this checkpoint was trained on addition (15-token vocabulary)"
            )
        tokenizer = loaded.tokenizer()
        try:
            items = load_benchmark(task, benchmark_path, limit=limit)
        except DatasetLoadError as exc:
            raise EvalInputError(str(exc)) from None
        budget = max_new_tokens or DEFAULT_MATH_MAX_NEW_TOKENS
        correct_lists, dyn, prompts = score_benchmark(
            model, tokenizer, items, depths, budget, batch_size=batch_size,
            system_prompt=loaded.task.get("system_prompt"),
        )
        acc = {d: sum(c) / len(c) for d, c in correct_lists.items()}
        n, mode = len(items), "generate"
        rho_ids = torch.tensor(_commonest_length(prompts)[:RHO_SAMPLES], dtype=torch.long, device=device)
    rho = rho_by_depth(model, rho_ids, rho_depths, rho_iters) if rho_depths else {}
    dynamics = {**dyn, "rho": rho}
    return TaskEval(
        task=task, mode=mode, n=n, acc=acc, dynamics=dynamics, summary=summarize(task, acc),
        seconds=time.perf_counter() - start, max_new_tokens=budget,
    )


def evaluate_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    depths: Iterable[int] = range(1, 17),
    rho_depths: Iterable[int] = (1, 4, 8, 16),
    rho_iters: int = 20,
    limit: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    *,
    benchmark_paths: Mapping[str, str] | None = None,
    device: str | None = None,
    rho_tasks: int = 1,
) -> CheckpointEval:
    """Load a checkpoint once and score every task at every depth.

    `tasks` defaults to the checkpoint's training task when that is addition. The spectral radius is
    estimated for the first `rho_tasks` tasks only (it is the expensive part and a property of the
    block, not of the task). `benchmark_paths` maps a math benchmark to a local copy."""
    loaded = load_checkpoint(ckpt_dir, device)
    tasks = list(tasks) if tasks else default_tasks(loaded)
    if not tasks:
        raise EvalInputError(
            f"no task to score for {str(ckpt_dir)!r} (trained on {loaded.task.get('task', 'an unknown task')!r}); "
            f"name one: {', '.join(known_tasks())}"
        )
    unknown = [t for t in tasks if t not in known_tasks()]
    if unknown:
        raise EvalInputError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(known_tasks())}")
    rho_depths = list(rho_depths)
    depths = sorted({int(d) for d in depths})
    result = CheckpointEval(str(ckpt_dir), loaded.step, depths)
    for i, task in enumerate(tasks):
        result.tasks[task] = evaluate_task(
            loaded, task, depths, rho_depths=rho_depths if i < rho_tasks else (), rho_iters=rho_iters,
            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
            benchmark_path=(benchmark_paths or {}).get(task),
        )
    return result


# ------------------------------------------------------------------------------------------ writers
def task_table_csv(ev: TaskEval) -> str:
    """One row per depth: depth, acc, hidden_norm, step_size, dist_from_start, rho (blank where not
    measured)."""
    from stars.tracking import depth_table_csv

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
    for d in (4, 8, 16):
        if f"{t}/acc_at_{d}" in s:
            parts.append(f"acc@{d} {s[f'{t}/acc_at_{d}']:.4f}")
    for d in (8, 16):
        if f"{t}/drop_at_{d}" in s:
            parts.append(f"drop@{d} {100 * s[f'{t}/drop_at_{d}']:.1f}%")
    lines.append("summary: " + ", ".join(parts))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- MLflow
def log_task_eval(
    tracker: Any,
    eval_run_id: str,
    trial_run_id: str | None,
    step: int,
    ev: TaskEval,
    files: Iterable[Path] = (),
    *,
    with_dynamics: bool = True,
) -> None:
    """One task of one checkpoint into MLflow (layout of docs/architecture.md):
    - on the eval run `eval@step=N`, metrics at step = depth: `<task>/acc` and, for the task the
      dynamics are measured on, `dyn/hidden_norm`, `dyn/step_size`, `dyn/dist_from_start`, `dyn/rho`;
      the depth table and plot as artifacts under `<task>/`;
    - on the trial run, the summary at step = training step.

    Idempotent: a metric the eval run already has, or a summary the trial run already holds at this
    step, is not logged again (a unit retried after its evaluator died between logging and marking
    done must not leave two points per depth)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    have = set(tracker.client.get_run(eval_run_id).data.metrics)
    items = [
        Metric(name, float(v), ts, int(d))
        for name, curve in ev.curves(with_dynamics).items()
        if name not in have
        for d, v in sorted(curve.items())
    ]
    for i in range(0, len(items), 1000):
        tracker.client.log_batch(eval_run_id, metrics=items[i : i + 1000])
    for f in files:
        tracker.log_artifact(eval_run_id, f, ev.task)
    if trial_run_id:
        first = next(iter(ev.summary), None)
        logged = {s for s, _ in tracker.metric_history(trial_run_id, first)} if first else set()
        if int(step) not in logged:
            tracker.log_metrics(trial_run_id, ev.summary, int(step))


# --------------------------------------------------------------------------------------- bookkeeping
class EvalLedger:
    """Which (checkpoint, task) are scored, on the run's shared storage (local path or URI):

        <run dir>/eval/step_NNNNNNN/<task>.running.json   claimed: pid, host, start time
        <run dir>/eval/step_NNNNNNN/<task>.done.json      scored: TaskEval + eval run id
        <run dir>/eval/step_NNNNNNN/<task>.csv, .png      the depth table and plot

    A done marker is written last (atomically on local storage) and only after MLflow holds the
    results, so "done" never claims more than is stored; a restart scores exactly what has none.
    """

    def __init__(self, run_dir: str) -> None:
        import pyarrow.fs as pafs

        if "://" not in run_dir:
            run_dir = os.path.abspath(os.path.expanduser(run_dir))
        self.fs, self.root = pafs.FileSystem.from_uri(run_dir)
        self.run_dir = run_dir
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def dir_of(self, step: int) -> str:
        return f"{self.root}/eval/step_{int(step):07d}"

    def _path(self, step: int, name: str) -> str:
        return f"{self.dir_of(step)}/{name}"

    def _read(self, path: str) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

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
        return [t for t in tasks if self.done(step, t) is None]

    def mark_running(self, step: int, task: str, info: Mapping[str, Any]) -> None:
        self._write(self._path(step, f"{task}.running.json"), json.dumps(dict(info), indent=1).encode())

    def running(self, step: int, task: str) -> dict[str, Any] | None:
        return self._read(self._path(step, f"{task}.running.json"))

    def mark_done(self, step: int, task: str, record: Mapping[str, Any]) -> None:
        self._write(self._path(step, f"{task}.done.json"), json.dumps(dict(record), indent=1).encode())

    def put_files(self, step: int, files: Iterable[Path]) -> None:
        for f in files:
            self._write(self._path(step, f.name), f.read_bytes())

    def done_steps(self, task: str) -> list[int]:
        """Steps whose `task` is scored."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(f"{self.root}/eval", allow_not_found=True)
        steps = []
        for info in self.fs.get_file_info(sel):
            s = step_of(info.path)
            if info.type == pafs.FileType.Directory and s is not None and self.done(s, task) is not None:
                steps.append(s)
        return sorted(steps)


def committed_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint directory names Ray Train has committed for a run and still keeps, oldest first:
    the run's `checkpoint_manager_snapshot.json` (written by Ray before it deletes anything). Falls
    back to the `step_*` directories holding a complete checkpoint when there is no snapshot."""
    import pyarrow.fs as pafs

    if "://" not in run_dir:
        run_dir = os.path.abspath(os.path.expanduser(run_dir))
    fs, root = pafs.FileSystem.from_uri(run_dir)
    snap = f"{root}/checkpoint_manager_snapshot.json"
    names: list[str] = []
    if fs.get_file_info(snap).type == pafs.FileType.File:
        with fs.open_input_stream(snap) as f:
            state = json.loads(f.read().decode())
        names = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
        latest = state.get("latest_checkpoint_result")
        if latest and latest["checkpoint_dir_name"] not in names:
            names.append(latest["checkpoint_dir_name"])
    else:
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.path.rsplit("/", 1)[-1]
            if step_of(name) is not None and fs.get_file_info(f"{info.path}/{TASK_FILE}").type == pafs.FileType.File:
                names.append(name)
    return sorted(set(names), key=lambda n: step_of(n) or -1)


def temp_artifact_dir() -> str:
    return tempfile.mkdtemp(prefix="stars-eval-")
