"""Depth curves of one checkpoint: every task scored at every depth, plus the loop's dynamics.

No Ray, no MLflow, and no torch at import (it is imported inside the functions), so the same code runs
inside the `Evaluator` actors (`stars.ray_backend.evaluation`), in `starsctl eval`, in tests and in
benchmarks, and importing the package stays cheap.

Cost model, which is the reason for the two scoring paths:
- teacher-forced tasks (`stars.tasks.TeacherForcedTask`: addition) read every depth out of ONE
  `LoopLM.forward_depths` pass per batch: a 1..16 curve costs about one depth-16 pass instead of
  1+2+...+16 = 136 loop steps;
- generative tasks (`stars.tasks.GenerativeTask`: the math benchmarks) prefill each prompt batch ONCE to
  the deepest depth and decode every depth from its own prefix of that prefill
  (`LoopLM.generate_greedy_depths`): the prefill of depth k is exactly the first k steps of the deepest
  one, so the tokens equal per-depth decoding.
Which task is which comes from the task registry (`stars.tasks.registry`); this module has no
per-task code.

Dynamics per depth come from the same readout (mean per-token L2 of `h_t`, `h_t - h_{t-1}`,
`h_t - h_0`); the spectral radius of the block's Jacobian is estimated by power iteration at a few
depths on a small unpadded batch (it costs `rho_iters` Jacobian-vector products per depth).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from stars.checkpoint import LoadedCheckpoint, load_checkpoint
from stars.evaluation.progress import Progress
from stars.evaluation.summary import summary_metrics
from stars.tasks import EvalInputError, GenerativeTask, TeacherForcedTask, eval_task, eval_task_names

if TYPE_CHECKING:
    import torch

    from stars.model import LoopLM

DYN_KEYS = ("hidden_norm", "step_size", "dist_from_start")  # measured on every depth; "rho" on a few
RHO_SAMPLES = 16  # sequences in the spectral-radius batch


# ------------------------------------------------------------------------------------------ results
@dataclass
class TaskEval:
    """One task of one checkpoint: accuracy and dynamics per depth, and its summary."""

    task: str
    mode: str  # "teacher_forced" | "generate"
    n: int  # problems scored
    acc: dict[int, float]
    dynamics: dict[str, dict[int, float]]  # hidden_norm / step_size / dist_from_start / rho -> depth -> value
    summary: dict[str, float]  # summary_metrics(task, acc)
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


def _default_tasks(loaded: LoadedCheckpoint) -> list[str]:
    """The teacher-forced tasks of the checkpoint's own training task (addition scores addition
    checkpoints); a math checkpoint has no single benchmark, so none."""
    trained_on = loaded.task.get("task")
    return [n for n in eval_task_names() if isinstance(t := eval_task(n), TeacherForcedTask) and t.trained_on == trained_on]


# ------------------------------------------------------------------------------------ teacher forcing
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


def teacher_forced(
    task: TeacherForcedTask,
    model: LoopLM,
    problems: Sequence[Any],
    tokenizer: Any,
    depths: Iterable[int],
    batch_size: int = 256,
) -> tuple[dict[int, torch.Tensor], dict[str, dict[int, float]]]:
    """Per depth a bool tensor [len(problems)] (the task's `correct`: for addition, every supervised
    argmax right, EOS included, which greedy decoding reproduces problem by problem), and the
    dynamics per depth collected from the same `forward_depths` pass."""
    depths = sorted({int(d) for d in depths})
    dyn = _Dyn(depths)
    correct = task.correct(
        model, problems, tokenizer, depths, batch_size,
        on_readout=lambda readout, mask: dyn.add(readout, float(mask.sum())),
    )
    return dict(correct), dyn.result()


def _rho_batch(sequences: Sequence[Sequence[int]], device: Any) -> torch.Tensor:
    """Up to RHO_SAMPLES whole sequences of one length (the commonest), so no padding enters J."""
    import torch

    return torch.tensor(_commonest_length(sequences)[:RHO_SAMPLES], dtype=torch.long, device=device)


def _commonest_length(seqs: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    by_len: dict[int, list[Sequence[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    return max(by_len.values(), key=len)


# ------------------------------------------------------------------------------------ generation
def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, list[list[int]]], dict[str, dict[int, float]] | None]:
    """Greedy continuations of every prompt at every depth: {depth: [tokens of prompt i]} in prompt
    order, each cut after its EOS; and (with `dynamics`) the prompts' per-depth dynamics.

    Prompts are sorted by length and batched (left-padded) so a batch wastes little; the longest
    batch runs first, so a memory problem shows at once. With `shared_prefill` each batch is
    prefilled once for all depths (`generate_greedy_depths`), else once per depth
    (`generate_greedy`); both give the same tokens. With learned positions the budget is cut to what
    the position table holds (the cut is the returned tokens' length). On a GPU a batch is also cut
    to what fits in free memory (`fitting_batch_size`). `progress(done, total)` is called after each
    batch.
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
    start = 0
    with torch.no_grad():
        while start < len(order):
            longest = len(prompts[order[start]])
            size = fitting_batch_size(model, longest, max_new_tokens, depths[-1], batch_size, shared_prefill)
            idx = order[start : start + size]
            start += len(idx)
            ids, mask = _left_pad([prompts[i] for i in idx], pad, device)
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
            if progress is not None:
                progress(start, len(order))
    return out, (dyn.result() if dyn is not None else None)


# Share of the free GPU memory a generation batch may plan for (the rest: activations, fragmentation).
_MEMORY_SHARE = 0.7


def fitting_batch_size(
    model: LoopLM, prompt_len: int, max_new_tokens: int, max_depth: int, batch_size: int, shared_prefill: bool = True,
    free_bytes: int | None = None,
) -> int:
    """`batch_size`, or fewer sequences when their KV caches would not fit in the device's free memory.

    Per sequence: the shared prefill's cache (prompt tokens at `max_depth`) plus the cache of the depth
    being decoded (prompt + new tokens at up to `max_depth`), at `LoopLM.kv_cache_bytes_per_token`,
    plus one row of logits per token decoded. On the CPU (`free_bytes` None and no CUDA) nothing is cut.
    """
    import torch

    device = next(model.parameters()).device
    if free_bytes is None:
        if device.type != "cuda":
            return batch_size
        free_bytes = torch.cuda.mem_get_info(device)[0]
    per_token = model.kv_cache_bytes_per_token(max_depth)
    prefill = per_token * prompt_len if shared_prefill else 0
    decode = per_token * (prompt_len + max_new_tokens)
    logits = 4 * model.config.vocab_size * 2  # float32 logits of the prefill's last token and one step
    per_sequence = prefill + decode + logits
    return max(1, min(batch_size, int(free_bytes * _MEMORY_SHARE // per_sequence)))


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def generative(
    task: GenerativeTask,
    model: LoopLM,
    tokenizer: Any,
    items: Sequence[Any],
    depths: Iterable[int],
    max_new_tokens: int,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
    shared_prefill: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, list[bool]], dict[str, dict[int, float]], list[list[int]]]:
    """Generate at every depth from the task's prompts of `items` and judge each answer with the task's
    `judge` (math benchmarks: the paper's protocol, 0-shot chat prompt, greedy, math-verify). Returns
    (correct per depth, dynamics per depth over the prompts, prompt token ids)."""
    prompts = task.prompts(tokenizer, list(items), system_prompt)
    eos = model.config.eos_token_id
    if eos is None:
        vocab = tokenizer.get_vocab()
        eos = vocab["<|im_end|>"] if "<|im_end|>" in vocab else tokenizer.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (tokenizer.pad_token_id or 0)
    tokens, dyn = generate_depths(
        model, prompts, depths, max_new_tokens, batch_size=batch_size, eos_token_id=eos, pad_token_id=pad,
        shared_prefill=shared_prefill, dynamics=True, progress=progress,
    )
    judged: dict[tuple[str, int], bool] = {}  # many depths write the same text: judge it once
    correct: dict[int, list[bool]] = {}
    for d, rows in tokens.items():
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        marks = []
        for i, (text, item) in enumerate(zip(texts, items)):
            if (text, i) not in judged:
                judged[(text, i)] = task.judge(text, item)
            marks.append(judged[(text, i)])
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
    console: Callable[[str], None] | None = None,
    progress_stream: TextIO | None = None,
) -> TaskEval:
    """Score one task of a loaded checkpoint at every depth, with dynamics (and rho at `rho_depths`).
    Generation (math benchmarks) reports progress with its rate and ETA: a bar redrawn on
    `progress_stream` (a terminal) when given, else a line to `console` now and then
    (`stars.evaluation.progress.Progress`)."""
    depths = sorted({int(d) for d in depths})
    if not depths:
        raise EvalInputError("depths is empty; give e.g. 1-16")
    entry = eval_task(task)
    trained_on = loaded.task.get("task")
    if trained_on is not None and trained_on != entry.trained_on:
        raise EvalInputError(
            f"{task!r} scores checkpoints trained on {entry.trained_on!r}; this checkpoint was trained on "
            f"{trained_on!r} (its stars_task.json)"
        )
    model = loaded.model
    device = next(model.parameters()).device
    start = time.perf_counter()
    if isinstance(entry, TeacherForcedTask):
        problems, tok = entry.load(loaded.task, limit)
        correct, dyn = teacher_forced(entry, model, problems, tok, depths, batch_size)
        acc = {d: float(c.float().mean()) for d, c in correct.items()}
        n, budget = len(problems), None
        rho_ids = _rho_batch(entry.rho_sequences(problems[: 8 * RHO_SAMPLES], tok), device)
    else:
        tokenizer = loaded.tokenizer()
        items = entry.load(benchmark_path, limit)
        budget = max_new_tokens or entry.max_new_tokens
        progress = Progress(f"[stars] {task} step {loaded.step} at {len(depths)} depths: generated",
                            console=console, stream=progress_stream)
        correct_lists, dyn, prompts = generative(
            entry, model, tokenizer, items, depths, budget, batch_size=batch_size,
            system_prompt=loaded.task.get("system_prompt"), progress=progress.update,
        )
        acc = {d: sum(c) / len(c) for d, c in correct_lists.items()}
        n = len(items)
        rho_ids = _rho_batch(prompts, device)
    rho = rho_by_depth(model, rho_ids, rho_depths, rho_iters) if rho_depths else {}
    dynamics = {**dyn, "rho": rho}
    return TaskEval(
        task=task, mode=entry.mode, n=n, acc=acc, dynamics=dynamics, summary=summary_metrics(task, acc),
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
    console: Callable[[str], None] | None = None,
    progress_stream: TextIO | None = None,
) -> CheckpointEval:
    """Load a checkpoint once and score every task at every depth.

    `tasks` defaults to the checkpoint's training task when that is addition. The spectral radius is
    estimated for the first `rho_tasks` tasks only (it is the expensive part and a property of the
    block, not of the task). `benchmark_paths` maps a math benchmark to a local copy."""
    loaded = load_checkpoint(ckpt_dir, device)
    tasks = list(tasks) if tasks else _default_tasks(loaded)
    if not tasks:
        raise EvalInputError(
            f"no task to score for {str(ckpt_dir)!r} (trained on {loaded.task.get('task', 'an unknown task')!r}); "
            f"name one: {', '.join(eval_task_names())}"
        )
    for task in tasks:
        eval_task(task)  # an unknown name fails before any scoring
    rho_depths = list(rho_depths)
    depths = sorted({int(d) for d in depths})
    result = CheckpointEval(str(ckpt_dir), loaded.step, depths)
    for i, task in enumerate(tasks):
        result.tasks[task] = evaluate_task(
            loaded, task, depths, rho_depths=rho_depths if i < rho_tasks else (), rho_iters=rho_iters,
            limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
            benchmark_path=(benchmark_paths or {}).get(task), console=console, progress_stream=progress_stream,
        )
    return result
