"""JSRR step-time overhead and all-depth readout cost of a small LoopLM on CPU. Prints JSON.

    python benchmarks/bench_objective.py [--threads 2] [--repeats 15]

- `jsrr_overhead[mode][fraction][depth]`: time of a train step (forward, backward, AdamW) with the
  STARS loss / the same step with plain CE, same depth and batch, for the three penalty modes (`vjp`
  double backward, `jvp` forward mode, `fd` central difference). Targets at depth 6: <= 1.3 on the
  whole batch, <= 1.1 with a quarter of the batch.
- `penalty_in_loop_steps[mode]`: the whole-batch penalty's extra time at depth 6 in units of one loop
  step of the CE train step ((ce@12 - ce@2) / 10). Any exact or consistent penalty needs two block
  applications forward and backward (vjp: forward, J^T v, double backward; jvp: primal + tangent;
  fd: two points) = 2 loop steps of matmul work, so at depth 6 the floor is ~1 + 2/6 = 1.33x when the
  step is all loop (as here: vocab 15, no prelude/coda). `fd` sits at that floor.
- `readout_ratio`: `forward_depths(1..16)` / one `model(depth=16)`. Target <= 1.15.
"""

from __future__ import annotations

import argparse
import json

import torch

from stars.model import LoopLM, LoopLMConfig
from stars.objective import JSRR_MODES, stars_loss
from timing import paired_times  # benchmarks/timing.py (this script's directory)


def small_model() -> LoopLM:
    """The reference's d128 addition model: 2-layer block, 4 heads, post_sandwich LayerNorm."""
    torch.manual_seed(0)
    cfg = LoopLMConfig(vocab_size=15, d_model=128, n_heads=4, n_block=2, injection="add",
                       max_position_embeddings=32, norm_position="post_sandwich")
    return LoopLM(cfg)


def train_step_fn(model, opt, ids, depth, weight, mode="vjp", fraction=1.0):
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        out = stars_loss(model, ids, ids, depth=depth, jsrr_weight=weight, jsrr_mode=mode,
                         jsrr_fraction=fraction, generator=gen)
        out.total.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=17, help="tokens per sequence (4-digit addition: 17)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = small_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 15, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    result: dict = {"threads": args.threads, "batch": args.batch, "seq": args.seq,
                    "params": sum(p.numel() for p in model.parameters()), "step_seconds": {},
                    "jsrr_overhead": {}}
    variants = [(mode, fraction) for mode in JSRR_MODES for fraction in (1.0, 0.25)]
    for depth in (2, 6, 12):
        fns = [train_step_fn(model, opt, ids, depth, 0.0)]
        fns += [train_step_fn(model, opt, ids, depth, 0.1, mode, fraction) for mode, fraction in variants]
        base, *times = paired_times(fns, args.repeats)
        result["step_seconds"][f"ce@{depth}"] = round(base, 4)
        for (mode, fraction), t in zip(variants, times):
            result["step_seconds"][f"{mode}/{fraction}@{depth}"] = round(t, 4)
            overhead = result["jsrr_overhead"].setdefault(mode, {}).setdefault(str(fraction), {})
            overhead[str(depth)] = round(t / base, 3)

    steps = result["step_seconds"]
    loop_step = (steps["ce@12"] - steps["ce@2"]) / 10
    result["penalty_in_loop_steps"] = {
        mode: round((steps[f"{mode}/1.0@6"] - steps["ce@6"]) / loop_step, 2) for mode in JSRR_MODES
    }

    model.eval()
    with torch.no_grad():
        one, all_depths = paired_times(
            [lambda: model(ids, depth=16), lambda: model.forward_depths(ids, range(1, 17))], args.repeats
        )
    result["readout_seconds"] = {"depth16": round(one, 4), "forward_depths_1_16": round(all_depths, 4)}
    result["readout_ratio"] = round(all_depths / one, 3)
    result["targets_met"] = {"readout_ratio<=1.15": result["readout_ratio"] <= 1.15}
    for mode, overhead in result["jsrr_overhead"].items():
        result["targets_met"][f"jsrr_{mode}_whole@6<=1.3"] = overhead["1.0"]["6"] <= 1.3
        result["targets_met"][f"jsrr_{mode}_quarter@6<=1.1"] = overhead["0.25"]["6"] <= 1.1
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
