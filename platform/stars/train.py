"""The per-worker STARS training loop: pure PyTorch; Ray and MLflow reach it only through `TrainHooks`.

Everything a step does is a function of (spec, step): the depth comes from the loop sampler, the
batch rows from a seeded permutation per epoch, and dropout/JSRR randomness from a generator seeded by
(seed, step, rank). A run resumed from a checkpoint therefore repeats nothing and skips nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stars.checkpoint import MODEL_DIR, load_trainer_state, save_checkpoint, step_dir_name
from stars.errors import UserError
from stars.model import LoopLM, LoopLMConfig, load_pretrained
from stars.objective import LoopSampler, stars_loss
from stars.spec import CheckpointModel, JobSpec
from stars.spec.stars import CeLoss
from stars.tasks import TrainingData, training_task


# ---- what a worker is given --------------------------------------------------------------------------
@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class TrainHooks:
    """The loop's only ways out. The Ray layer fills these; the defaults run in a plain process."""

    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m  # e.g. wrap in DDP
    report: Callable[[dict[str, float], str | None], None] = lambda metrics, ckpt_dir: None
    log_metrics: Callable[[dict[str, float], int], None] | None = None  # rank 0 only (MLflow)
    # Rank 0 only, at every logged step, resumed steps included: live metrics (the Ray dashboard).
    publish_metrics: Callable[[dict[str, float], int], None] | None = None
    last_logged_step: Callable[[], int] = lambda: 0  # metrics up to here are already in the store
    console: Callable[[str], None] = print


# ---- building blocks from the spec ----------------------------------------------------------------------
def weights_dtype(spec: JobSpec) -> torch.dtype:
    """`model.dtype` as a torch dtype: what the weights (the optimiser's master weights) are kept in."""
    return getattr(torch, spec.model.dtype)


def build_model(spec: JobSpec, task: TrainingData) -> LoopLM:
    """A new LoopLM from the spec's architecture, or a saved one (a LoopLM or an Ouro checkpoint,
    `stars.model.load_pretrained`), with weights in `model.dtype` (float32 by default: fp32 master
    weights; `train.precision: bf16` autocasts the compute)."""
    m = spec.model
    if isinstance(m, CheckpointModel):
        return load_pretrained(m.pretrained, dtype=weights_dtype(spec))
    torch.manual_seed(spec.seed)
    cfg = LoopLMConfig(vocab_size=task.vocab_size, pad_token_id=task.pad_token_id,
                       eos_token_id=task.eos_token_id, bos_token_id=task.bos_token_id,
                       **m.looplm_config_kwargs())
    return LoopLM(cfg).to(weights_dtype(spec))


def build_sampler(spec: JobSpec) -> LoopSampler:
    """The job's loop sampler with its seed bound: `sampler(step) -> depth` (`stars.spec.stars`)."""
    return spec.stars.loop_sampling.bind(spec.seed)


def total_steps(spec: JobSpec, n_train: int) -> int:
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    return spec.train.epochs * math.ceil(n_train / spec.train.global_batch_size)


def lr_multiplier(spec: JobSpec, steps: int) -> Callable[[int], float]:
    """LR factor at optimizer step s (0-based): linear warmup, then constant / cosine / warmup-stable-decay."""
    tr = spec.train
    warmup = tr.warmup_steps or int(tr.warmup_fraction * steps)
    floor = tr.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if tr.schedule == "constant":
            return 1.0
        if tr.schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay = max(1, int(tr.decay_fraction * steps))  # wsd
        start = steps - decay
        if s < start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (s - start + 1) / decay)

    return factor


class BatchPlan:
    """Rows of each (step, micro-batch, rank): consecutive slices of an endless stream of seeded
    per-epoch permutations. A pure function of the step, so resuming needs no data-loader state."""

    def __init__(self, n: int, seed: int, global_batch: int, micro_batch: int, world_size: int):
        self.n, self.seed = n, seed
        self.global_batch, self.micro_batch, self.world_size = global_batch, micro_batch, world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def rows(self, step: int, micro: int, rank: int) -> list[int]:
        start = step * self.global_batch + (micro * self.world_size + rank) * self.micro_batch
        out = []
        for pos in range(start, start + self.micro_batch):
            epoch, offset = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


# ---- the loop ---------------------------------------------------------------------------------------------
class StarsObjective(nn.Module):
    """The STARS loss of one micro-batch as a module, so DDP wraps one `forward` (its gradient hooks
    need that). Returns (CE, JSRR) with their graphs; the loop weights them over the global batch."""

    def __init__(self, model: LoopLM):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], *, depth: int, jsrr_weight: float, jsrr_mode: str,
                jsrr_fraction: float, power_iters: int, backprop_depth: int | None,
                generator: torch.Generator, ce_loss: CeLoss = "last_step"):
        out = stars_loss(self.model, batch["input_ids"], batch["labels"], depth=depth, jsrr_weight=jsrr_weight,
                         jsrr_mode=jsrr_mode, attention_mask=batch.get("attention_mask"),
                         power_iters=power_iters, jsrr_fraction=jsrr_fraction, backprop_depth=backprop_depth,
                         generator=generator, ce_loss=ce_loss)
        jsrr = out.jsrr if out.jsrr is not None else torch.zeros((), device=out.ce.device)
        return out.ce, jsrr


class ExitGateError(UserError):
    """`stars.ce_loss: gate_weighted` on a model without an exit gate."""


def _freeze_or_require_gate(model: LoopLM, ce_loss: CeLoss) -> None:
    """The exit gate trains only when the loss uses it. Frozen otherwise, so it gets no gradient and
    DDP does not need `find_unused_parameters` (which costs a graph walk every step)."""
    if ce_loss == "gate_weighted" and model.exit_gate is None:
        raise ExitGateError(
            "stars.ce_loss is 'gate_weighted' but the model has no exit gate; use an Ouro checkpoint or "
            "model.exit_gate: true, or stars.ce_loss: last_step"
        )
    if model.exit_gate is not None:
        model.exit_gate.requires_grad_(ce_loss == "gate_weighted")


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the CE averages over (labels are shifted inside the model)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _global_count(n: int, worker: WorkerContext) -> int:
    if worker.world_size == 1 or not torch.distributed.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.long, device=worker.device)
    torch.distributed.all_reduce(t)
    return int(t.item())


@dataclass
class TrainSummary:
    steps: int
    final_loss: float
    first_loss: float
    resumed_from: int
    history: list[tuple[int, int]]  # (step, depth) of every optimizer step of the whole run
    checkpoint_dir: str | None = None


class TrainingDiverged(RuntimeError):
    """The loss of a step was not finite (NaN or inf); training stopped before applying it.

    Its message, "diverged at step N: ...", is what a sweep reports for the trial. A restart from the
    last checkpoint replays the same steps (every random draw is a function of the step), so it would
    diverge again: lower the learning rate or fix the data instead."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"diverged at step {step}: loss {loss}")
        self.step, self.loss = step, loss

    def __reduce__(self):  # crosses process boundaries (Ray) with its own arguments
        return type(self), (self.step, self.loss)


def _finite_on_every_rank(loss: float, worker: WorkerContext) -> bool:
    """Whether every rank's loss of this step is finite (all ranks must stop at the same step, or the
    ones that go on wait forever in the next collective)."""
    bad = not math.isfinite(loss)
    if worker.world_size == 1 or not torch.distributed.is_initialized():
        return not bad
    flag = torch.tensor([int(bad)], dtype=torch.long, device=worker.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not bool(flag.item())


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.default_rng([seed, step, rank]).integers(2**62))


def train_loop(
    spec: JobSpec,
    worker: WorkerContext | None = None,
    hooks: TrainHooks | None = None,
    resume_dir: str | Path | None = None,
    checkpoint_root: str | Path | None = None,
) -> TrainSummary:
    """Train per the spec on this worker. `resume_dir`: a checkpoint to continue from.
    `checkpoint_root`: where this worker writes checkpoints before reporting them (rank 0 only)."""
    worker = worker or WorkerContext()
    hooks = hooks or TrainHooks()
    tr, js = spec.train, spec.stars.jsrr
    task = training_task(spec.data.task).build(spec)
    model = build_model(spec, task) if resume_dir is None else load_pretrained(
        Path(resume_dir) / MODEL_DIR, dtype=weights_dtype(spec)
    )
    _freeze_or_require_gate(model, spec.stars.ce_loss)
    if tr.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(worker.device).train()
    objective = hooks.prepare_model(StarsObjective(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=tuple(tr.betas), eps=tr.eps,
                                  weight_decay=tr.weight_decay)
    steps = total_steps(spec, len(task.train_data))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(spec, steps))
    sampler = build_sampler(spec)
    micro = tr.micro_batch_size or tr.global_batch_size // worker.world_size
    accum = tr.global_batch_size // (micro * worker.world_size)
    plan = BatchPlan(len(task.train_data), spec.seed, tr.global_batch_size, micro, worker.world_size)

    start, history, resumes = 0, [], []
    if resume_dir is not None:
        state = load_trainer_state(resume_dir)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["step"], list(state["history"])
        resumes = [*state.get("resumes", []), start]
        hooks.console(f"[stars] resumed from step {start} ({resume_dir})")
    logged_until = hooks.last_logged_step() if worker.rank == 0 else 0
    autocast = torch.autocast(worker.device.type, dtype=torch.bfloat16, enabled=tr.precision == "bf16")
    first_loss = last_loss = float("nan")
    window_tokens, window_start, last_ckpt = 0, time.perf_counter(), None

    for step in range(start, steps):
        depth = sampler(step)
        gen = torch.Generator().manual_seed(_step_seed(spec.seed, step, worker.rank))
        torch.manual_seed(_step_seed(spec.seed + 1, step, worker.rank))  # dropout
        jsrr_weight = js.weight if step >= js.start_step else 0.0
        optimizer.zero_grad(set_to_none=True)
        batches = [task.train_data.batch(plan.rows(step, m, worker.rank)) for m in range(accum)]
        # CE is a mean over supervised tokens of the WHOLE global batch (not a mean of micro-batch
        # means, which over-weights short micro-batches); DDP averages over ranks, hence * world.
        n_global = _global_count(sum(supervised_tokens(b) for b in batches), worker)
        ce_sum = jsrr_sum = 0.0
        for m, cpu_batch in enumerate(batches):
            batch = {k: v.to(worker.device) for k, v in cpu_batch.items()}
            window_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            share = supervised_tokens(cpu_batch) / max(n_global, 1)
            sync = m == accum - 1 or not hasattr(objective, "no_sync")
            with (objective.no_sync() if not sync else contextlib.nullcontext()), autocast:
                ce, jsrr = objective(batch, depth=depth, jsrr_weight=jsrr_weight, jsrr_mode=js.mode,
                                     jsrr_fraction=js.batch_fraction, power_iters=js.power_iters,
                                     backprop_depth=sampler.backprop_depth, generator=gen,
                                     ce_loss=spec.stars.ce_loss)
                loss = (1 - jsrr_weight) * ce * share * worker.world_size + jsrr_weight * jsrr / accum
            loss.backward()
            ce_sum += float(ce.detach()) * share * worker.world_size
            jsrr_sum += float(jsrr.detach()) / accum
        # Logged per rank (rank 0): its share of the global-batch CE and its mean penalty.
        last_loss = (1 - jsrr_weight) * ce_sum + jsrr_weight * jsrr_sum
        if not _finite_on_every_rank(last_loss, worker):
            # Stop before the update: NaN/inf would only spread. Every rank raises at the same step.
            raise TrainingDiverged(step + 1, last_loss)
        if tr.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        done = step + 1
        history.append((done, depth))
        if step == start:
            first_loss = last_loss

        if done % tr.log_every == 0 or done == steps:
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": last_loss, "train/ce": ce_sum, "train/jsrr": jsrr_sum,
                "train/depth": float(depth), "train/lr": lr,
                "train/tokens_per_s": window_tokens * worker.world_size / max(elapsed, 1e-9),
                "train/epoch": plan.epoch_of(done),
            }
            window_tokens, window_start = 0, time.perf_counter()
            if worker.rank == 0:
                if hooks.log_metrics is not None and done > logged_until:
                    hooks.log_metrics(metrics, done)
                if hooks.publish_metrics is not None:
                    hooks.publish_metrics(metrics, done)
                hooks.console(
                    f"[stars] step {done}/{steps} depth {depth:2d} loss {metrics['train/loss']:.4f} "
                    f"ce {metrics['train/ce']:.4f} jsrr {metrics['train/jsrr']:.4f} lr {lr:.2e} "
                    f"{metrics['train/tokens_per_s']:,.0f} tok/s"
                )
        every = tr.checkpoint_every
        if (every and done % every == 0) or done == steps:
            report = {"step": done, "train/loss": last_loss, "train/depth": depth}
            if done == steps:
                report["ddp/param_checksums"] = rank_checksums(model, worker, hooks.console)
            ckpt_dir = None
            if worker.rank == 0:
                root = Path(checkpoint_root or os.path.join(spec.resources.storage_path, spec.name, "local"))
                ckpt_dir = str(root / step_dir_name(done))
                state = {"step": done, "history": history, "resumes": resumes, "depth": depth,
                         "loss": last_loss}
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, state, task.description, task.tokenizer)
                last_ckpt = ckpt_dir
            hooks.report(report, ckpt_dir)

    return TrainSummary(steps=steps, final_loss=last_loss, first_loss=first_loss, resumed_from=start,
                        history=history, checkpoint_dir=last_ckpt)


def param_checksum(model: nn.Module) -> float:
    """A position-weighted sum of every parameter (float64): equal across ranks iff weights agree."""
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
        return float((sums * torch.arange(1, len(sums) + 1, dtype=torch.float64)).sum())


def rank_checksums(model: nn.Module, worker: WorkerContext, console) -> list[float]:
    """Every rank's parameter checksum (DDP keeps replicas identical; a mismatch means a bug such as
    ranks drawing different depths). Reported with the final checkpoint."""
    mine = param_checksum(model)
    if worker.world_size == 1 or not torch.distributed.is_initialized():
        return [mine]
    gathered: list[float] = [0.0] * worker.world_size
    torch.distributed.all_gather_object(gathered, mine)
    if len(set(gathered)) > 1 and worker.rank == 0:
        console(f"[stars] WARNING: DDP replicas diverged; parameter checksums per rank: {gathered}")
    return gathered

