"""Depth-curve evaluation cost on CPU: one-pass teacher forcing and shared-prefill generation. Prints JSON.

    python benchmarks/bench_eval.py [--threads 2] [--repeats 5]

- `teacher_forced`: scoring 500 addition problems at depths 1..16 from one `forward_depths` pass per
  batch vs 16 separate scorings (one pass of depth d each): 16 vs 1+2+...+16 = 136 loop steps.
  Target: `ratio` (one pass / 16 passes) <= 1/6.
- `generation`: greedy decoding at depths 1..16 with one prompt prefill shared by all depths
  (`generate_greedy_depths`) vs a prefill per depth (`generate_greedy`): the prefill costs
  16 instead of 136 loop steps per prompt token, decoding (k steps per new token at depth k) is the
  same. So the saving is large for long prompts and short answers and small for long answers:
  `addition` (10-token prompts, 7 new tokens), `long_prompt_short_answer` (~128-token prompts,
  16 new tokens) and `long_prompt_long_answer` (~128-token prompts, 64 new tokens).
Timings are best-of-`repeats`, variants interleaved (see bench_objective.py).
"""

from __future__ import annotations

import argparse
import json

import torch

from stars.evaluation import generate_depths, teacher_forced
from stars.model import LoopLM, LoopLMConfig
from stars.tasks import eval_task
from stars.tasks.addition import AdditionTokenizer, generate_problems
from timing import paired_times  # benchmarks/timing.py (this script's directory)

DEPTHS = list(range(1, 17))


def addition_model() -> LoopLM:
    """The reference's d128 addition model: 2-layer block, 4 heads, post_sandwich LayerNorm."""
    torch.manual_seed(0)
    cfg = LoopLMConfig(vocab_size=15, d_model=128, n_heads=4, n_block=2, injection="add",
                       max_position_embeddings=32, norm_position="post_sandwich", pad_token_id=13, eos_token_id=14)
    return LoopLM(cfg).eval()


def text_model() -> LoopLM:
    """A d128 RoPE LoopLM over a 400-token vocabulary (the tiny chat tokenizer's size)."""
    torch.manual_seed(0)
    cfg = LoopLMConfig(vocab_size=400, d_model=128, n_heads=4, n_block=2, positions="rope",
                       max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    return LoopLM(cfg).eval()


def generation_case(model: LoopLM, prompts: list[list[int]], new_tokens: int, batch: int, repeats: int,
                    eos: int | None) -> dict:
    def shared():
        return generate_depths(model, prompts, DEPTHS, new_tokens, batch_size=batch, eos_token_id=eos)

    def naive():
        return generate_depths(model, prompts, DEPTHS, new_tokens, batch_size=batch, eos_token_id=eos,
                               shared_prefill=False)

    assert shared()[0] == naive()[0]  # token for token
    t_shared, t_naive = paired_times([shared, naive], repeats)
    return {"prompts": len(prompts), "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1),
            "new_tokens": new_tokens, "batch_size": batch, "shared_prefill_s": round(t_shared, 4),
            "per_depth_prefill_s": round(t_naive, 4), "speedup": round(t_naive / t_shared, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--batch", type=int, default=500, help="teacher-forced batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "repeats": args.repeats, "depths": "1-16", "torch": torch.__version__}

    model = addition_model()
    tok = AdditionTokenizer(4)
    problems = generate_problems(args.problems, 4, seed=0)

    def one_pass():
        return teacher_forced(eval_task("addition"), model, problems, tok, DEPTHS, args.batch)

    def sixteen_passes():
        return {d: teacher_forced(eval_task("addition"), model, problems, tok, [d], args.batch)[0][d] for d in DEPTHS}

    together, separate = one_pass()[0], sixteen_passes()
    assert all(torch.equal(together[d], separate[d]) for d in DEPTHS)
    t_one, t_sixteen = paired_times([one_pass, sixteen_passes], args.repeats)
    result["teacher_forced"] = {
        "problems": len(problems), "batch_size": args.batch, "params": sum(p.numel() for p in model.parameters()),
        "one_pass_s": round(t_one, 4), "sixteen_passes_s": round(t_sixteen, 4),
        "ratio": round(t_one / t_sixteen, 4), "target_ratio": round(1 / 6, 4), "meets_target": t_one / t_sixteen <= 1 / 6,
    }

    gen: dict = {}
    prompts = [tok.encode_prompt(p.num1, p.num2) for p in problems[:256]]
    gen["addition"] = generation_case(model, prompts, 7, 256, args.repeats, tok.eos_token_id)
    text = text_model()
    g = torch.Generator().manual_seed(0)
    long_prompts = [torch.randint(3, 400, (int(n),), generator=g).tolist()
                    for n in torch.randint(96, 161, (16,), generator=g)]
    # eos -1: never emitted, so every depth decodes the full budget in both variants
    gen["long_prompt_short_answer"] = generation_case(text, long_prompts, 16, 16, args.repeats, -1)
    gen["long_prompt_long_answer"] = generation_case(text, long_prompts, 64, 16, max(2, args.repeats // 2), -1)
    result["generation"] = gen
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
