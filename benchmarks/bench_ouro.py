"""An Ouro-shaped LoopLM on one device: train-step throughput, peak step memory with and without
gradient checkpointing, 16-depth shared-prefill generation and (CUDA only) MFU. Prints JSON.

    python benchmarks/bench_ouro.py [--preset tiny|1.4b] [--device cpu|cuda] [--dtype auto|fp32|bf16]
                                    [--peak-tflops 989] [--gradient-checkpointing]

The model is `LoopLMConfig.ouro_layout(...)` (docs/science.md, section 6), randomly initialised, with
float32 master weights; `--dtype bf16` (the default on CUDA) runs the compute under `torch.autocast`,
as `train.precision: bf16` does. Presets: `tiny` (d128, 2-layer block, vocab 1024, batch 4 x 128
tokens; seconds on 2 CPU cores) and `1.4b` (Ouro-1.4B: d2048, 24 layers, 16 heads, d_ff 5632,
vocab 49152, rope theta 1e6; micro-batch 1 x 2048 tokens).

- `train`: tokens/s of one training step as `stars.train` runs it (zero_grad, forward at the depth,
  `stars.objective.stars_loss`, backward, grad-norm clipping, AdamW) at depths 4 and 8 with plain
  cross-entropy, and at depth 4 with the JSRR penalty on. Best of `--repeats` after `--warmup`
  excluded steps, variants interleaved (benchmarks/timing.py); CUDA is synchronised before every
  clock read.
- `memory`: peak memory of one training step at the deepest depth, without and with gradient
  checkpointing. CUDA: `torch.cuda.max_memory_allocated` (tensor bytes). CPU: the process's peak
  resident set (VmHWM) during the step, after returning freed heap to the OS and resetting the
  high-water mark (`/proc/self/clear_refs`); see `cpu_step_memory`.
- `generation`: greedy decoding at depths 1..16 sharing one prefill (`LoopLM.generate_greedy_depths`),
  new tokens per second summed over the 16 depths, prefill included.
- `mfu` (CUDA only): 6 * params_in_loop * depth * tokens per step / step time / `--peak-tflops`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stars.model import LoopLM, LoopLMConfig
from stars.objective import JSRR_MODES, stars_loss
from timing import paired_times  # benchmarks/timing.py (this script's directory)

GENERATION_DEPTHS = list(range(1, 17))
# What `stars.spec.train` / `stars.spec.stars` default to, so a step here costs what a STARS step costs.
LR, BETAS, GRAD_CLIP, JSRR_WEIGHT = 3e-4, (0.9, 0.95), 1.0, 0.1
# Dense bf16 tensor-core peaks (no sparsity), matched against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0}
DEFAULT_PEAK_TFLOPS = 312.0
StepFn = Callable[[], None]


@dataclass(frozen=True)
class Preset:
    overrides: dict  # LoopLMConfig.ouro_layout overrides
    batch: int
    seq: int
    repeats: int
    warmup: int
    gen_batch: int
    gen_prompt_tokens: int
    gen_new_tokens: int
    gen_repeats: int
    threads: int | None  # None: torch's default (all cores)
    depths: tuple[int, ...] = field(default=(4, 8))


PRESETS = {
    # Ouro's layout shrunk; d_ff keeps Ouro's 5632 / 2048 = 2.75 ratio.
    "tiny": Preset(dict(vocab_size=1024, d_model=128, n_heads=4, n_kv_heads=4, d_ff=352, n_block=2),
                   batch=4, seq=128, repeats=5, warmup=1, gen_batch=4, gen_prompt_tokens=32,
                   gen_new_tokens=16, gen_repeats=3, threads=1),
    "1.4b": Preset({}, batch=1, seq=2048, repeats=10, warmup=2, gen_batch=1, gen_prompt_tokens=256,
                   gen_new_tokens=32, gen_repeats=1, threads=None),
}


# ---- the model and one training step ------------------------------------------------------------------
def build_model(preset: Preset, device: torch.device) -> LoopLM:
    torch.manual_seed(0)
    with device:  # initialise on the device: 1.4B float32 parameters are slow to fill on a CPU
        return LoopLM(LoopLMConfig.ouro_layout(**preset.overrides)).float().train()


def random_tokens(model: LoopLM, batch: int, seq: int, device: torch.device, seed: int) -> torch.Tensor:
    low = 3  # above pad/bos/eos
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, model.config.vocab_size, (batch, seq), generator=gen).to(device)


def autocast_for(device: torch.device, dtype: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A fresh autocast context per use (one torch.autocast object must not be entered twice at once)."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def train_step(model: LoopLM, optimizer: torch.optim.Optimizer, ids: torch.Tensor, depth: int, autocast,
               jsrr_mode: str | None = None) -> StepFn:
    """One optimizer step as `stars.train.train_loop` takes it (one micro-batch, no accumulation)."""
    generator = torch.Generator().manual_seed(0)  # v of the JSRR penalty, drawn on the CPU as in training

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = stars_loss(model, ids, ids, depth=depth, jsrr_weight=JSRR_WEIGHT if jsrr_mode else 0.0,
                              jsrr_mode=jsrr_mode or "vjp", generator=generator)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def synchronised(fn: StepFn, device: torch.device) -> StepFn:
    """fn followed by a CUDA sync, so a clock read after it sees the GPU work done (CPU: fn itself)."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def free_after_oom(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- measurements ---------------------------------------------------------------------------------------
def train_throughput(model, optimizer, ids, args, autocast, device) -> dict:
    """Tokens/s per variant; a variant that runs out of GPU memory in warmup is reported, not timed."""
    first = args.depths[0]
    variants = {f"ce@{d}": (d, None) for d in args.depths}
    variants[f"ce+jsrr@{first}"] = (first, args.jsrr_mode)
    steps = {name: synchronised(train_step(model, optimizer, ids, d, autocast, mode), device)
             for name, (d, mode) in variants.items()}
    failed: dict[str, str] = {}
    for name, fn in steps.items():
        try:
            for _ in range(args.warmup):
                fn()
        except torch.cuda.OutOfMemoryError:
            failed[name] = "out of memory (try --gradient-checkpointing)"
        if name in failed:
            free_after_oom(optimizer, device)
    timed = [name for name in steps if name not in failed]
    seconds = dict(zip(timed, paired_times([steps[n] for n in timed], args.repeats, warmup=0)))
    tokens = ids.numel()
    result: dict = {}
    for name, (depth, mode) in variants.items():
        entry: dict = {"depth": depth}
        if mode:
            entry["jsrr"] = {"weight": JSRR_WEIGHT, "mode": mode, "batch_fraction": 1.0, "power_iters": 1}
        if name in failed:
            entry["error"] = failed[name]
        else:
            entry.update(step_s=round(seconds[name], 6), tokens_per_s=round(tokens / seconds[name], 1))
        result[name] = entry
    return result


def cuda_step_memory(step: StepFn, device: torch.device) -> dict:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return {"peak_bytes": torch.cuda.max_memory_allocated(device), "at_step_start_bytes": start}


def _proc_status_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1)) * 1024


def cpu_step_memory(step: StepFn) -> dict:
    """Peak resident set of this process during `step` (Linux).

    Before the step: garbage-collect, `malloc_trim(0)` so memory freed by earlier work is returned to
    the OS instead of being reused silently (which would hide part of the step's peak), then write 5
    to /proc/self/clear_refs, which resets VmHWM (the peak RSS) to the current RSS. So `peak_bytes` is
    the step's own high-water mark, `at_step_start_bytes` the RSS it started from (interpreter and
    libraries, weights, AdamW state, batch); the difference is what the step itself adds
    (activations, gradients, temporaries, allocator slack)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _proc_status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return {"peak_bytes": _proc_status_bytes("VmHWM"), "at_step_start_bytes": start}


CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated over one step after reset_peak_memory_stats (tensor "
                      "bytes; the caching allocator's reserve is not counted)")
CPU_MEMORY_METHOD = ("process peak RSS (VmHWM) over one step, after gc + malloc_trim(0) and a high-water "
                     "reset via /proc/self/clear_refs; includes the interpreter and libraries")


def step_memory(model, optimizer, ids, depth, autocast, device) -> dict:
    """Peak memory of one CE training step at `depth`, without and with gradient checkpointing.

    Each configuration first takes one unmeasured step (AdamW state exists, kernels are loaded);
    gradients are dropped before the measured step, which starts from weights + AdamW state + batch."""
    result: dict = {"depth": depth, "method": CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD}
    for name, checkpointing in (("without_checkpointing", False), ("with_checkpointing", True)):
        if checkpointing:
            model.gradient_checkpointing_enable()
        step = train_step(model, optimizer, ids, depth, autocast)
        try:
            step()
            optimizer.zero_grad(set_to_none=True)
            measured = cuda_step_memory(step, device) if device.type == "cuda" else cpu_step_memory(step)
        except torch.cuda.OutOfMemoryError:
            measured = {"error": "out of memory"}
        finally:
            model.gradient_checkpointing_disable()
        if "error" in measured:
            free_after_oom(optimizer, device)
        else:
            measured["step_adds_bytes"] = measured["peak_bytes"] - measured["at_step_start_bytes"]
            measured["peak_gib"] = round(measured["peak_bytes"] / 2**30, 3)
        result[name] = measured
    without, with_ = result["without_checkpointing"], result["with_checkpointing"]
    if "error" not in without and "error" not in with_:
        result["checkpointing_saves_bytes"] = without["peak_bytes"] - with_["peak_bytes"]
    return result


def generation(model: LoopLM, args, autocast, device: torch.device) -> dict:
    prompt = random_tokens(model, args.gen_batch, args.gen_prompt_tokens, device, seed=1)

    def generate(new_tokens: int) -> StepFn:
        # eos -1 is never produced, so every depth decodes its whole budget.
        def run() -> None:
            with autocast():
                model.generate_greedy_depths(prompt, GENERATION_DEPTHS, new_tokens, eos_token_id=-1)

        return synchronised(run, device)

    model.eval()
    generate(2)()  # warmup (excluded): kernels, cache shapes
    (seconds,) = paired_times([generate(args.gen_new_tokens)], args.gen_repeats, warmup=0)
    model.train()
    new_tokens = args.gen_batch * args.gen_new_tokens * len(GENERATION_DEPTHS)
    return {
        "depths": "1-16", "batch": args.gen_batch, "prompt_tokens": args.gen_prompt_tokens,
        "new_tokens_per_depth": args.gen_new_tokens, "seconds": round(seconds, 4),
        "new_tokens_per_s": round(new_tokens / seconds, 1),
        "includes": "one prefill of the prompt to depth 16 shared by all depths, then greedy decoding at "
                    "each depth with its KV cache; new tokens summed over the 16 depths (batch x new "
                    f"tokens x 16); best of {args.gen_repeats} after one excluded 2-token warmup",
    }


def peak_tflops(given: float | None, device: torch.device) -> tuple[float, str]:
    if given is not None:
        return given, "--peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops, f"dense bf16 peak of {key} (from device name {name!r})"
    return DEFAULT_PEAK_TFLOPS, f"default (A100/A800 dense bf16); device {name!r} unknown: pass --peak-tflops"


def model_flops_per_step(params_in_loop: int, depth: int, tokens: int) -> int:
    """6 (forward 2 + backward 4) FLOPs per loop parameter per token per loop step."""
    return 6 * params_in_loop * depth * tokens


# ---- entry point ------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="compute dtype (bf16 = autocast; weights stay float32); auto: bf16 on cuda, fp32 on cpu")
    # One thread for `tiny`: its ops are too small to split, and on a busy 2-core machine a second
    # OpenMP thread that other processes keep off the CPU made each decode-sized op ~300x slower
    # (SDPA of 1 query over 40 keys: 6 ms with 2 threads vs 0.02 ms with 1).
    parser.add_argument("--threads", type=int, help="torch CPU threads (preset: tiny 1, 1.4b all cores)")
    parser.add_argument("--depths", type=int, nargs="+", help="training depths (preset: 4 8)")
    parser.add_argument("--batch", type=int, help="training sequences per step (preset)")
    parser.add_argument("--seq", type=int, help="training tokens per sequence (preset)")
    parser.add_argument("--repeats", type=int, help="timed training steps per variant; best is kept (preset)")
    parser.add_argument("--warmup", type=int, help="excluded training steps per variant, >= 1 (preset)")
    parser.add_argument("--jsrr-mode", choices=JSRR_MODES, default="vjp")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="checkpoint loop steps in the throughput runs (the memory runs measure both)")
    parser.add_argument("--gen-batch", type=int, help="prompts generated together (preset)")
    parser.add_argument("--gen-prompt-tokens", type=int, help="prompt length (preset)")
    parser.add_argument("--gen-new-tokens", type=int, help="new tokens per depth (preset)")
    parser.add_argument("--gen-repeats", type=int, help="timed generation runs; best is kept (preset)")
    parser.add_argument("--peak-tflops", type=float,
                        help="device peak for MFU (default from the GPU name: 989 H100/H200, 312 A100/A800)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for name in ("threads", "depths", "batch", "seq", "repeats", "warmup", "gen_batch", "gen_prompt_tokens",
                 "gen_new_tokens", "gen_repeats"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
        value = getattr(args, name)
        if value is not None and (min(value) if isinstance(value, (list, tuple)) else value) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    autocast = autocast_for(device, args.dtype)
    model = build_model(PRESETS[args.preset], device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS)
    ids = random_tokens(model, args.batch, args.seq, device, seed=0)
    cfg = model.config
    params_in_loop = sum(p.numel() for p in model.block_parameters())
    result: dict = {
        "preset": args.preset, "device": args.device,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": args.threads, "compute_dtype": args.dtype,
        "weights_dtype": "float32",
        "model": {"layout": "LoopLMConfig.ouro_layout", "d_model": cfg.d_model, "n_block": cfg.n_block,
                  "n_heads": cfg.n_heads, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size,
                  "rope_theta": cfg.rope_theta, "params": sum(p.numel() for p in model.parameters()),
                  "params_in_loop": params_in_loop},
        "batch": args.batch, "seq": args.seq, "tokens_per_step": ids.numel(),
    }

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train = train_throughput(model, optimizer, ids, args, autocast, device)
    model.gradient_checkpointing_disable()
    result["train"] = {
        "includes": "zero_grad; forward at the depth under the compute dtype; shifted next-token "
                    "cross-entropy (stars.objective.stars_loss); backward; clip_grad_norm_(1.0); AdamW step "
                    "on float32 weights. No data loading, LR schedule or gradient accumulation. ce+jsrr adds "
                    "the JSRR penalty (one more block application at the detached final state and its "
                    "Jacobian product) with total = 0.9 CE + 0.1 JSRR",
        "timing": f"best of {args.repeats} steps after {args.warmup} excluded per variant, variants interleaved",
        "gradient_checkpointing": args.gradient_checkpointing,
        **train,
    }
    result["memory"] = step_memory(model, optimizer, ids, max(args.depths), autocast, device)
    result["generation"] = generation(model, args, autocast, device)

    if device.type == "cuda":
        peak, source = peak_tflops(args.peak_tflops, device)
        mfu: dict = {"formula": "6 * params_in_loop * depth * tokens_per_step / step_s / (peak_tflops * 1e12); "
                                "the LM head, embeddings, attention scores, the JSRR penalty and checkpointing's "
                                "recompute are not counted",
                     "peak_tflops": peak, "peak_tflops_source": source}
        for name, entry in train.items():
            if name.startswith("ce@") and "step_s" in entry:
                flops = model_flops_per_step(params_in_loop, entry["depth"], ids.numel())
                mfu[name] = round(flops / entry["step_s"] / (peak * 1e12), 4)
        result["mfu"] = mfu
    else:
        result["mfu"] = None  # CUDA only: a CPU has no meaningful peak to compare against
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
